"""Overload (issue 6) and the metrics the pipeline feeds, without the kernel: real outputs (JSONL sink,
Prometheus registry), the pipeline's sampling driven with drop totals and a clock we choose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agent.capture.names import syscall_number
from agent.events import SYSCALL_DTYPE
from agent.pipeline import OVERLOAD_INTERVAL_NS, OVERLOAD_RULE, Pipeline
from agent.proc import ProcessTable
from agent.respond import JsonlConfig, OutputConfig, build_outputs

S = 1_000_000_000


def make_pipeline(tmp_path: Path) -> tuple[Pipeline, Path]:
    alerts = tmp_path / "alerts.jsonl"
    cfg = OutputConfig(console=None, jsonl=JsonlConfig(str(alerts)), fold_window=0)
    outputs = build_outputs(cfg, state_dir=tmp_path)
    return Pipeline(table=ProcessTable(), outputs=outputs), alerts


def read_alerts(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def drops(ring: int = 0, queue: int = 0) -> dict[str, int]:
    return {"ringbuf_full": ring, "detail_reserve_failed": 0, "pending_full": 0, "userspace_queue_overflow": queue}


def test_no_drops_no_alert(tmp_path: Path) -> None:
    pipeline, alerts = make_pipeline(tmp_path)
    pipeline.sample(drops(), now_ns=1 * S)
    pipeline.sample(drops(), now_ns=40 * S)
    pipeline.outputs.close()
    assert read_alerts(alerts) == []
    assert pipeline.metrics.value("sysgram_drops_total", stage="ringbuf_full") == 0


def test_drops_raise_one_alert_per_30s_with_counts_by_stage(tmp_path: Path) -> None:
    pipeline, alerts = make_pipeline(tmp_path)
    pipeline.sample(drops(ring=5), now_ns=10 * S)  # first loss: alert at once
    pipeline.sample(drops(ring=9, queue=2), now_ns=11 * S)  # within 30 s: counted, not alerted
    pipeline.sample(drops(ring=9, queue=7), now_ns=10 * S + OVERLOAD_INTERVAL_NS - 1)
    pipeline.sample(drops(ring=12, queue=7), now_ns=10 * S + OVERLOAD_INTERVAL_NS)  # window over: alert
    pipeline.sample(drops(ring=12, queue=7), now_ns=100 * S)  # nothing new: no alert
    pipeline.outputs.close()
    found = [a for a in read_alerts(alerts) if a["rule"] == OVERLOAD_RULE]
    assert len(found) == 2
    first, second = (a["output_fields"] for a in found)
    assert isinstance(first, dict) and isinstance(second, dict)
    assert first["sysgram.n_drops"] == 5 and first["sysgram.n_drops_ringbuf_full"] == 5
    # the second covers everything lost since the first, the suppressed samples included
    assert second["sysgram.n_drops"] == 14
    assert second["sysgram.n_drops_ringbuf_full"] == 7 and second["sysgram.n_drops_userspace_queue_overflow"] == 7
    assert all("sysgram_internal" in a["tags"] and a["priority"] == "Critical" for a in found)  # type: ignore[operator]
    # the metrics count every lost event once, by stage
    m = pipeline.metrics
    assert m.value("sysgram_drops_total", stage="ringbuf_full") == 12
    assert m.value("sysgram_drops_total", stage="userspace_queue_overflow") == 7
    assert m.value("sysgram_alerts_total", rule=OVERLOAD_RULE, priority="Critical") == 2


def test_syscall_batches_count_as_events(tmp_path: Path) -> None:
    pipeline, _ = make_pipeline(tmp_path)
    batch = np.zeros(7, dtype=SYSCALL_DTYPE)
    batch["tgid"] = batch["tid"] = 4242
    batch["nr"] = syscall_number("getppid")
    batch["ts"] = np.arange(7)
    pipeline.handle([batch])
    pipeline.handle([batch[:3]])
    pipeline.outputs.close()
    assert pipeline.metrics.value("sysgram_events_total") == 10
    # the overload alert's n_evts is the events seen since the last one
    pipeline2, alerts2 = make_pipeline(tmp_path / "b")
    pipeline2.handle([batch])
    pipeline2.sample(drops(queue=3), now_ns=S)
    pipeline2.outputs.close()
    (alert,) = read_alerts(alerts2)
    fields = alert["output_fields"]
    assert isinstance(fields, dict)
    assert fields["sysgram.n_evts"] == 7 and fields["sysgram.n_drops_perc"] == 30.0

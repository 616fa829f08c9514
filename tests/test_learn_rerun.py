"""The learn-then-rerun measurement's counting and its live step's timing, with a stand-in agent (the real
run needs ~4 minutes of root: it is a measurement, `python -m training.learn_rerun`, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.learn_rerun import ANOMALY_RULE, count_alerts


def test_counts_anomaly_alerts_by_executable_and_reads_the_suppressed_count(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.jsonl"
    rows = [
        {"rule": ANOMALY_RULE, "output_fields": {"proc.exe": "/usr/bin/find"}},
        {"rule": ANOMALY_RULE, "output_fields": {"proc.exe": "/usr/bin/find"}},
        {"rule": ANOMALY_RULE, "output_fields": {"proc.exe": ""}},
        {"rule": "Read sensitive file untrusted", "output_fields": {"proc.exe": "/usr/bin/cat"}},
    ]
    alerts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = ('sysgram: stats {"events": 10, "model": {"anomalies": 3, "anomalies_suppressed": 7, '
           '"processes": 40}}\n')
    result = count_alerts(alerts, log)
    assert result == {"anomaly_alerts": 3, "by_exe": {"/usr/bin/find": 2, "?": 1}, "anomalies_suppressed": 7}


def test_no_alerts_file_means_no_alerts(tmp_path: Path) -> None:
    result = count_alerts(tmp_path / "missing.jsonl", "")
    assert result == {"anomaly_alerts": 0, "by_exe": {}, "anomalies_suppressed": 0}


def test_run_live_stops_a_ready_agent_after_the_time_and_refuses_one_never_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import training.learn_rerun as lr

    # a stand-in agent: says ready, then reports how it was stopped (SIGINT, as sysgram run expects)
    agent = (
        "import signal, sys, time\n"
        "print('sysgram: ready (stand-in)', file=sys.stderr, flush=True)\n"
        "signal.signal(signal.SIGINT, lambda *_: (print('sysgram: stats {}', file=sys.stderr), sys.exit(0)))\n"
        "time.sleep(60)\n"
        "sys.exit(3)\n"
    )
    monkeypatch.setattr(lr, "SYSGRAM", [sys.executable, "-c", agent])
    workload = 'touch "$2/ran"; sleep 100'
    done = lr._run_live(workload, str(tmp_path), [], seconds=1)
    assert done.returncode == 0 and "sysgram: stats" in done.stderr
    assert (tmp_path / "ran").exists()  # the workload ran beside it (and was stopped: the call returned)
    # an agent that never gets ready is killed, and the step fails
    monkeypatch.setattr(lr, "SYSGRAM", [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(lr, "STEP_TIMEOUT", 2)
    never = lr._run_live(workload, str(tmp_path), [], seconds=1)
    assert never.returncode != 0

"""`sysgram bench score` helpers: the traffic they push and the figures they derive (no timing asserted)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.model import load_model, window_keys
from agent.model.bench import SHIPPED, adfa_stream, cached_rate, distinct_windows, raw_rate


def test_distinct_windows_are_distinct_and_cover_the_traffic() -> None:
    model = load_model(SHIPPED)
    rows, exe_of = adfa_stream(20_000)
    assert len(rows) == 20_000 and set(np.unique(rows["tgid"]).tolist()) == set(exe_of)
    tokens, programs = distinct_windows(model, rows, exe_of, limit=10**9)
    keys = window_keys(tokens, programs)
    assert len(np.unique(keys)) == len(tokens) < len(rows)  # repeated windows collapse
    few, _ = distinct_windows(model, rows, exe_of, limit=100)
    assert np.array_equal(few, tokens[:100])


def test_raw_rate_is_the_median_of_timed_passes_after_an_untimed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.model import bench

    model = load_model(SHIPPED)
    rows, exe_of = adfa_stream(20_000)
    tokens, programs = distinct_windows(model, rows, exe_of, limit=3000)
    # a clock that each pass moves on by a set time: the untimed pass and the first timed one are slow
    clock = [0.0]
    took = iter([10.0, 4.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    scored: list[int] = []
    real = model.score

    def timed_score(t: np.ndarray, p: np.ndarray) -> np.ndarray:
        scored.append(len(t))
        clock[0] += next(took)
        return real(t, p)

    monkeypatch.setattr(model, "score", timed_score)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    rate = raw_rate(model, tokens, programs)
    assert scored == [len(tokens)] * (1 + bench.RAW_PASSES)  # every pass scores every window
    assert rate == pytest.approx(len(tokens) / 0.1)  # the slow first timed pass does not set the figure


def test_cached_rate_reports_the_hit_rate_of_the_measured_part() -> None:
    model = load_model(SHIPPED)
    rows, exe_of = adfa_stream(40_000, seed=3)
    runs = model.session_runs
    rate, hit_rate, overhead_us = cached_rate(model, rows, exe_of)
    assert rate > 0 and overhead_us > 0 and 0 < hit_rate < 1
    assert model.session_runs > runs
    assert model.score.__func__ is type(model).score  # type: ignore[attr-defined]  # the timer is removed


def test_bench_score_measures_a_hosts_own_model_and_what_naming_new_syscalls_costs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.model import bench
    from agent.model.bench import run
    from training.synthetic import synthetic_traces
    from training.train import TrainConfig, train_model

    own = tmp_path / "own.onnx"  # (without root/BPF, run() falls back to ADFA-LD traffic)
    cfg = TrainConfig(n=8, epochs=2, threads=1, min_program_syscalls=500, net={"hidden": 16, "bottleneck": 8, "dim": 4},
                      min_windows=16)
    train_model(synthetic_traces(20, seed=2), own, cfg, progress=False)
    sets_seen: list[bool] = []  # whether each measured run had the per-program sets
    real = bench.cached_rate

    def spying(model: Any, *args: Any) -> tuple[float, float, float]:
        sets_seen.append(model.made is not None)
        return real(model, *args)

    monkeypatch.setattr(bench, "cached_rate", spying)
    figures = {f.name: f for f in run(quick=True, model_path=str(own))}
    known = load_model(own).known_keys
    assert figures["model"].value == f"own.onnx: {len(known):,} known windows" and len(known) > 0
    naming = figures["of which naming new syscalls (least of each, alternated)"]
    assert isinstance(naming.value, float) and naming.target.startswith("with: ")
    assert sets_seen == [True] + [False, True] * bench.NAMING_ROUNDS  # alternated, sets restored after each
    rate = figures["effective windows/s through the cache"].value
    assert isinstance(rate, int) and rate > 0


def test_bench_model_option_is_for_the_score_part_and_a_missing_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    assert main(["bench", "rules", "--model", str(tmp_path / "m.onnx")]) == 2
    assert "--model is for the score part" in capsys.readouterr().err
    assert main(["bench", "score", "--model", str(tmp_path / "absent.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "absent.onnx") in err


def test_cached_rate_tells_the_detector_of_each_exec_before_the_rows_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.model._detector import AnomalyDetector
    from agent.model.bench import BATCH

    model = load_model(SHIPPED)
    rows, exe_of = adfa_stream(4 * BATCH, seed=4)
    rows["ts"] = np.arange(len(rows))
    pid = int(rows["tgid"][-1])
    execs = [(BATCH // 2, pid, pid), (3 * BATCH + 7, pid, pid)]  # one in the warm-up, one measured
    seen: list[tuple[int, int, int, int]] = []  # (exec ts, pid, first and last row ts of the next batch)
    real_exec, real_push = AnomalyDetector.on_exec, AnomalyDetector.push
    told: list[tuple[int, int]] = []

    def on_exec(self: AnomalyDetector, tgid: int, tids: list[int], ts: int | None = None) -> None:
        told.append((int(ts or 0), tgid))
        real_exec(self, tgid, tids, ts)

    def push(self: AnomalyDetector, batch: np.ndarray, *args: object) -> list:
        seen.extend((t, p, int(batch["ts"].min()), int(batch["ts"].max())) for t, p in told)
        told.clear()
        return real_push(self, batch, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(AnomalyDetector, "on_exec", on_exec)
    monkeypatch.setattr(AnomalyDetector, "push", push)
    cached_rate(model, rows, exe_of, execs)
    assert [(t, p, p) for t, p, _, _ in seen] == execs
    assert all(first <= t <= last for t, _, first, last in seen)  # told just before the batch holding it

"""Start-up thresholds: a process's first span is judged against what held-out start-ups reached, not against
the whole-trace means of the routine (a fresh program's first windows score higher than its routine)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelError
from agent.model import AnomalyDetector, Model, load_model
from tests.test_model_runtime import ALPHA, copy_model, model, model_path, rows  # noqa: F401 (fixtures)
from training.synthetic import HABITS, habit_trace
from training.train import startup_thresholds


def test_startup_buckets_follow_the_highest_running_mean_in_each_bucket() -> None:
    # 40 start-up windows at 3.0, then a routine at 1.0 (running mean falls from 3.0 towards 1.0)
    traces = [np.r_[np.full(40, 3.0), np.full(400, 1.0)] for _ in range(3)]
    buckets = startup_thresholds(traces, min_windows=16, routine=1.2, far=0.01)
    bounds = [b for b, _ in buckets]
    assert bounds == [32, 64, 128, 256][:len(bounds)] and len(bounds) >= 3
    peaks = {32: 3.0, 64: 3.0, 128: (40 * 3.0 + 24 * 1.0) / 64, 256: (40 * 3.0 + 88 * 1.0) / 128}
    for bound, threshold in buckets:  # fewer than 1/FAR traces: 1.05 x the highest
        assert threshold == pytest.approx(max(1.2, 1.05 * peaks[int(bound)]))
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(buckets))


def test_no_startup_buckets_when_start_ups_look_like_the_routine() -> None:
    flat = [np.full(300, 1.0) for _ in range(200)]
    assert startup_thresholds(flat, min_windows=16, routine=1.5, far=0.01) == []
    assert startup_thresholds([np.full(10, 9.0)], min_windows=16, routine=1.0, far=0.01) == []  # too short


def _with_thresholds(base: Model, routine: float, startup: tuple[tuple[int, float], ...]) -> Model:
    th = base.sidecar.thresholds
    th = replace(th, process={k: routine for k in th.process},
                 process_startup={k: startup for k in th.process})
    return replace(base, sidecar=replace(base.sidecar, thresholds=th))


def test_first_span_is_judged_by_startup_thresholds_then_by_the_routine(model: Model) -> None:  # noqa: F811
    strict = _with_thresholds(model, routine=0.0, startup=((64, 1e9),))
    det = AnomalyDetector(strict, cache_size=4096, alert_every_ns=10**15, min_windows=16)
    normal = habit_trace(HABITS[ALPHA], 200, np.random.default_rng(5))
    assert det.push(rows(normal[:40], tgid=30), {30: ALPHA}) == []  # 40 windows < 64: start-up threshold
    state = det.state(30)
    assert state is not None and state.threshold == 1e9 and not state.is_anomalous
    found = det.push(rows(normal[40:], tgid=30, ts0=10**6), {30: ALPHA})  # past 64 windows: routine (0)
    assert len(found) == 1 and found[0].process_threshold == 0.0
    # without start-up thresholds the same start alerts at once
    plain = AnomalyDetector(_with_thresholds(model, routine=0.0, startup=()), cache_size=4096, min_windows=16)
    assert len(plain.push(rows(normal[:40], tgid=31), {31: ALPHA})) == 1


@pytest.mark.parametrize("bad", [{"*": [[64]]}, {"*": [[64, 1.0], [32, 2.0]]}, {"*": "x"}, [1, 2], {"*": []}])
def test_malformed_startup_thresholds_are_refused(model_path: Path, tmp_path: Path, bad: object) -> None:  # noqa: F811
    path = copy_model(model_path, tmp_path)
    side = path.with_suffix(".json")
    raw = json.loads(side.read_text())
    raw["thresholds"]["process_startup"] = bad
    side.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="process_startup") as err:
        load_model(path)
    assert str(side) in str(err.value)


def test_trained_sidecar_round_trips_startup_thresholds(model_path: Path) -> None:  # noqa: F811
    raw = json.loads(model_path.with_suffix(".json").read_text())
    startup = raw["thresholds"]["process_startup"]
    loaded = load_model(model_path).sidecar.thresholds
    assert {k: [list(b) for b in v] for k, v in loaded.process_startup.items()} == startup
    for program, buckets in startup.items():
        assert all(t > raw["thresholds"]["process"][program] for _, t in buckets)

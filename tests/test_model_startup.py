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
from training.synthetic import ATTACK, HABITS, habit_trace
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
    det.on_fork(30, 30)
    assert det.push(rows(normal[:40], tgid=30), {30: ALPHA}) == []  # 40 windows < 64: start-up threshold
    state = det.state(30)
    assert state is not None and state.threshold == 1e9 and not state.is_anomalous
    found = det.push(rows(normal[40:], tgid=30, ts0=10**6), {30: ALPHA})  # past 64 windows: routine (0)
    assert len(found) == 1 and found[0].process_threshold == 0.0
    # without start-up thresholds the same start alerts at once
    plain = AnomalyDetector(_with_thresholds(model, routine=0.0, startup=()), cache_size=4096, min_windows=16)
    plain.on_fork(31, 31)
    assert len(plain.push(rows(normal[:40], tgid=31), {31: ALPHA})) == 1
    # an exec is a start too
    det.on_exec(32, [32], ts=0)
    assert det.push(rows(normal[:40], tgid=32, ts0=10), {32: ALPHA}) == []
    assert det.state(32).threshold == 1e9  # type: ignore[union-attr]


def test_a_process_first_seen_mid_life_is_judged_as_routine_once_it_has_span_memory_windows(model: Model) -> None:  # noqa: F811
    strict = _with_thresholds(model, routine=0.0, startup=((64, 1e9),))
    det = AnomalyDetector(strict, cache_size=4096, alert_every_ns=10**15, min_windows=16, span_memory=100)
    normal = habit_trace(HABITS[ALPHA], 400, np.random.default_rng(5))
    # running before the agent: no fork, no exec; its first n-1 syscalls only fill its first window
    assert det.push(rows(normal[:model.n - 1], tgid=40), {40: ALPHA}) == []
    assert det.state(40) is None and det.stats["windows"] == 0
    assert det.stats["context_only_rows"] == model.n - 1
    # no start to allow for, no earlier span to steady the mean: judged once it has span_memory windows
    first = model.n - 1
    assert det.push(rows(normal[first:first + 99], tgid=40, ts0=10**6), {40: ALPHA}) == []
    assert det.state(40).windows == 99 and not det.state(40).is_anomalous  # type: ignore[union-attr]
    found = det.push(rows(normal[first + 99:first + 100], tgid=40, ts0=2 * 10**6), {40: ALPHA})
    assert len(found) == 1 and found[0].process_threshold == 0.0  # routine threshold: no start-up grace
    assert found[0].process_windows == 100 and len(found[0].window) == model.n  # full windows: no padding


def _scores(det: AnomalyDetector, names: list[str], pid: int, ts0: int) -> float:
    det.push(rows(names, tgid=pid, ts0=ts0), {pid: ALPHA})
    state = det.state(pid)
    assert state is not None
    return state.score


def test_a_new_span_carries_the_last_ones_mean_so_a_short_burst_does_not_carry_it_over(model: Model) -> None:  # noqa: F811
    rng = np.random.default_rng(11)
    normal = habit_trace(HABITS[ALPHA], 3000, rng)
    burst = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=12)]
    span = 10**9
    probe = AnomalyDetector(model, cache_size=4096, min_windows=16, span_ns=span, span_memory=0)
    probe.on_fork(60, 60)
    routine = _scores(probe, normal[:2000], 60, 0)
    burst_mean = _scores(probe, burst + normal[2000:2020], 60, 2 * span)  # a new span opens on the burst
    threshold = (routine + burst_mean) / 2  # the burst alone, over a fresh span's few windows, would exceed it
    for carry, alerts in ((None, False), (0, True)):
        det = AnomalyDetector(_with_thresholds(model, routine=threshold, startup=()), cache_size=4096,
                              min_windows=16, span_ns=span, alert_every_ns=10**15, span_memory=carry)
        det.on_fork(61, 61)
        assert det.push(rows(normal[:2000], tgid=61), {61: ALPHA}) == []
        found = det.push(rows(burst + normal[2000:2020], tgid=61, ts0=2 * span), {61: ALPHA})
        assert bool(found) is alerts  # carry 0: the old tumbling span, judged on its first 32 windows
    # a sustained change still shows through the carried mean, within about span_memory windows
    det = AnomalyDetector(_with_thresholds(model, routine=threshold, startup=()), cache_size=4096, min_windows=16,
                          span_ns=span, alert_every_ns=10**15)
    det.on_fork(62, 62)
    det.push(rows(normal[:2000], tgid=62), {62: ALPHA})
    attack = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=det.span_memory)]
    found = det.push(rows(attack, tgid=62, ts0=2 * span), {62: ALPHA})
    assert len(found) == 1 and "earlier spans' mean, worth" in found[0].explanation


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


def test_a_young_process_keeps_its_start_up_thresholds_across_spans(model: Model) -> None:  # noqa: F811
    # its first span carried into the next still holds its start: judged by the start-up buckets on its
    # lifetime, not by the routine after a few windows of the new span
    startup = _with_thresholds(model, routine=0.0, startup=((64, 1e9),))
    det = AnomalyDetector(startup, cache_size=4096, alert_every_ns=10**15, min_windows=16, span_ns=10**6)
    normal = habit_trace(HABITS[ALPHA], 300, np.random.default_rng(8))
    det.on_fork(70, 70)
    assert det.push(rows(normal[:40], tgid=70), {70: ALPHA}) == []
    assert det.push(rows(normal[40:60], tgid=70, ts0=10**7), {70: ALPHA}) == []  # a new span, lifetime 60
    assert det.state(70).threshold == 1e9  # type: ignore[union-attr]
    found = det.push(rows(normal[60:80], tgid=70, ts0=10**8), {70: ALPHA})  # lifetime 80: the routine
    assert len(found) == 1 and found[0].process_threshold == 0.0


def test_a_mid_life_process_waits_for_span_memory_windows_across_spans(model: Model) -> None:  # noqa: F811
    strict = _with_thresholds(model, routine=0.0, startup=())
    det = AnomalyDetector(strict, cache_size=4096, alert_every_ns=10**15, min_windows=16, span_ns=10**6,
                          span_memory=100)
    normal = habit_trace(HABITS[ALPHA], 400, np.random.default_rng(9))
    first = model.n - 1
    det.push(rows(normal[:first], tgid=71), {71: ALPHA})  # context only
    assert det.push(rows(normal[first:first + 40], tgid=71, ts0=10**6), {71: ALPHA}) == []
    # the span rolls over after 40 windows; 60 more make 100 in all, only then is it judged
    assert det.push(rows(normal[first + 40:first + 99], tgid=71, ts0=10**8), {71: ALPHA}) == []
    assert len(det.push(rows(normal[first + 99:first + 100], tgid=71, ts0=10**8 + 10**5), {71: ALPHA})) == 1

"""Process thresholds from few held-out traces: a prediction bound with a spread pooled over programs, not
1.05 x the largest (which, from k traces, is only about the 1 - 1/(k+1) quantile)."""

from __future__ import annotations

import numpy as np
import pytest

from training.train import LOG_FLOOR, MIN_POOLED_DOF, SpreadPrior, _far_threshold, startup_thresholds

FAR = 0.01


def _programs(rng: np.random.Generator, count: int) -> list[float]:
    """Each program's typical mean NLL per window: from nearly perfectly predicted to loose."""
    return list(np.exp(rng.uniform(np.log(0.002), np.log(0.5), count)))


def _traces(rng: np.random.Generator, typical: float, sigma: float, k: int) -> np.ndarray:
    # a process's mean varies around its program's typical one, multiplicatively (above LOG_FLOOR)
    return np.exp(np.log(typical + LOG_FLOOR) + rng.normal(0.0, sigma, k)) - LOG_FLOOR


def test_many_traces_give_the_plain_quantile() -> None:
    values = np.linspace(0.0, 1.0, 1001)
    assert _far_threshold(values, FAR, SpreadPrior(4.0, 1000)) == pytest.approx(np.quantile(values, 1 - FAR))


def test_without_a_prior_few_traces_give_just_above_the_largest() -> None:
    values = np.array([0.02, 0.03, 0.025])
    assert _far_threshold(values, FAR) == pytest.approx(0.0315)


def test_a_thin_pool_lends_no_spread() -> None:
    """A learn of one program run a few times: Student's t over a handful of degrees of freedom would put
    the threshold out of reach (session 5: 109,597 nats per window for a tiny test model)."""
    values = np.array([1.9, 2.0, 0.001])
    thin = SpreadPrior.pooled([values])
    assert thin.dof < MIN_POOLED_DOF
    assert _far_threshold(values, FAR, thin) == pytest.approx(2.1)
    assert _far_threshold(values, FAR, SpreadPrior(thin.variance, MIN_POOLED_DOF)) > 100


def test_pooled_spread_ignores_programs_with_one_trace_and_counts_degrees_of_freedom() -> None:
    prior = SpreadPrior.pooled([np.array([0.5]), np.array([0.0, 0.0, 0.0]), np.array([1.0, 3.0])])
    logs = np.log(np.array([1.0, 3.0]) + LOG_FLOOR)
    assert prior.dof == 2 + 1
    assert prior.variance == pytest.approx(((logs - logs.mean()) ** 2).sum() / 3)
    assert SpreadPrior.pooled([np.array([0.5])]) == SpreadPrior()


def test_a_program_always_alike_still_gets_the_pooled_spread() -> None:
    """Twelve identical held-out runs show no spread; the next run of the same program on another day
    differs a little (session 5's python3: 1-50% above its held-out mean). The bound leaves room for that,
    and more room the wider programs spread in general."""
    same = np.full(12, 0.0436)
    narrow = _far_threshold(same, FAR, SpreadPrior(0.05, 900))
    wide = _far_threshold(same, FAR, SpreadPrior(0.2, 900))
    assert 1.05 * 0.0436 < narrow < wide
    assert wide > 1.5 * 0.0436


def test_a_program_with_a_wide_spread_of_its_own_is_judged_by_it() -> None:
    """A narrow pooled prior counts for 10 traces; a program's own 59 degrees of freedom outweigh it."""
    rng = np.random.default_rng(3)
    wide = _traces(rng, 0.1, 1.0, 60)
    narrow = _traces(rng, 0.1, 0.05, 60)
    prior = SpreadPrior(0.0025, 900)  # sigma 0.05
    assert _far_threshold(wide, FAR, prior) > 3 * _far_threshold(narrow, FAR, prior)
    own_prior = _far_threshold(wide, FAR, SpreadPrior(1.0, 900))
    assert _far_threshold(wide, FAR, prior) == pytest.approx(own_prior, rel=0.35)


def test_bounds_hold_the_false_alarm_rate_where_the_largest_does_not() -> None:
    """Programs whose process means spread alike; 12 held-out traces each, as a 30 s learn gives. New runs
    over the threshold at the rate of 1e-3: about that with the pooled bound (the normal quantile in
    place of Student's t gives ~3.6e-3, leaving out the sqrt(1 + 1/k) of a new trace ~1.7e-3); about 1/13
    with 1.05 x the largest."""
    far = 1e-3
    rng = np.random.default_rng(7)
    sigma, k = 0.4, 12
    typical = _programs(rng, 60)
    held = [_traces(rng, t, sigma, k) for t in typical]
    prior = SpreadPrior.pooled(held)
    assert prior.variance == pytest.approx(sigma**2, rel=0.15)
    pooled_alarms, largest_alarms = [], []
    for t, h in zip(typical, held, strict=True):
        new = _traces(rng, t, sigma, 200_000)
        pooled_alarms.append(np.mean(new > _far_threshold(h, far, prior)))
        largest_alarms.append(np.mean(new > _far_threshold(h, far)))
    assert 0.0006 < np.mean(pooled_alarms) < 0.0015
    assert np.mean(largest_alarms) > 0.04


def test_startup_buckets_take_their_own_pooled_spread() -> None:
    traces = [np.r_[np.full(40, 3.0), np.full(400, 1.0)] for _ in range(3)]
    plain = startup_thresholds(traces, min_windows=16, routine=1.2, far=FAR)
    priors = [SpreadPrior(0.3, 500)] * 4
    widened = startup_thresholds(traces, min_windows=16, routine=1.2, far=FAR, priors=priors)
    assert [b for b, _ in widened] == [b for b, _ in plain]
    assert all(w > p for (_, w), (_, p) in zip(widened, plain, strict=True))


def _held_out(rng: np.random.Generator, programs: int, k: int, windows: int) -> dict[str, list[np.ndarray]]:
    """Per program, k held-out traces' window scores around a program-typical level, the means spread alike."""
    out = {}
    for p, typical in enumerate(_programs(rng, programs)):
        means = _traces(rng, typical, 0.4, k)
        out[f"/usr/bin/p{p}"] = [np.full(windows, max(m, 0.0)) for m in means]
    return out


def test_process_thresholds_pool_over_the_programs_not_the_generic_slot_nor_short_traces() -> None:
    from training.train import TrainConfig, process_thresholds

    cfg = TrainConfig(min_windows=32)
    judged = _held_out(np.random.default_rng(11), 10, 12, 64)
    base, _, prior = process_thresholds(judged, judged, cfg)
    assert prior.dof == 10 * 11
    # "*" holds every trace again: it is judged, but adds nothing to the pool
    wild = {**judged, "*": [np.full(64, v) for v in (0.0, 50.0, 0.0, 80.0)]}
    with_generic, _, prior_g = process_thresholds(wild, wild, cfg)
    assert prior_g == prior and all(with_generic[p] == base[p] for p in judged)
    # a program whose traces are all too short to be judged falls back to them, out of the pool
    short = {**judged, "/usr/bin/brief": [np.full(8, v) for v in (0.0, 40.0, 0.01)]}
    with_short, _, prior_s = process_thresholds(short, short, cfg)
    assert prior_s == prior and all(with_short[p] == base[p] for p in judged)
    assert "/usr/bin/brief" in with_short
    # identical runs of one program: the pooled spread still widens its threshold
    same = {**judged, "/usr/bin/same": [np.full(64, 0.05)] * 12}
    th, _, _ = process_thresholds(same, same, cfg)
    assert th["/usr/bin/same"] > 1.5 * 0.05


def test_startup_buckets_come_only_from_traces_that_start_a_process() -> None:
    from training.train import TrainConfig, process_thresholds

    cfg = TrainConfig(min_windows=16)
    startups = [np.r_[np.full(40, 3.0), np.full(400, 0.1)] for _ in range(5)]
    fragments = [np.full(440, 0.1) for _ in range(5)]  # halves of cut traces: no start-up in them
    judged = {"/usr/bin/d": startups + fragments}
    _, with_startups, _ = process_thresholds(judged, {"/usr/bin/d": startups}, cfg)
    _, without, _ = process_thresholds(judged, {"/usr/bin/d": []}, cfg)
    assert with_startups["/usr/bin/d"] and without["/usr/bin/d"] == []


def test_a_program_with_a_slot_but_no_judged_held_out_trace_is_named_with_zero() -> None:
    from training.train import thinly_calibrated

    calibration = {"programs": {"*": {"judged_traces": 40}, "/usr/bin/a": {"judged_traces": 25},
                                "/usr/bin/b": {"judged_traces": 3}}}
    assert thinly_calibrated(["*", "/usr/bin/a", "/usr/bin/b", "/usr/sbin/daemon"], calibration) == (
        ("/usr/sbin/daemon", 0), ("/usr/bin/b", 3))

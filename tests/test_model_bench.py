"""`sysgram bench score` helpers: the traffic they push and the figures they derive (no timing asserted)."""

from __future__ import annotations

import numpy as np

from agent.model import load_model, window_keys
from agent.model.bench import SHIPPED, adfa_stream, cached_rate, distinct_windows


def test_distinct_windows_are_distinct_and_cover_the_traffic() -> None:
    model = load_model(SHIPPED)
    rows, exe_of = adfa_stream(20_000)
    assert len(rows) == 20_000 and set(np.unique(rows["tgid"]).tolist()) == set(exe_of)
    tokens, programs = distinct_windows(model, rows, exe_of, limit=10**9)
    keys = window_keys(tokens, programs)
    assert len(np.unique(keys)) == len(tokens) < len(rows)  # repeated windows collapse
    few, _ = distinct_windows(model, rows, exe_of, limit=100)
    assert np.array_equal(few, tokens[:100])


def test_cached_rate_reports_the_hit_rate_of_the_measured_part() -> None:
    model = load_model(SHIPPED)
    rows, exe_of = adfa_stream(40_000, seed=3)
    runs = model.session_runs
    rate, hit_rate, overhead_us = cached_rate(model, rows, exe_of)
    assert rate > 0 and overhead_us > 0 and 0 < hit_rate < 1
    assert model.session_runs > runs
    assert model.score.__func__ is type(model).score  # type: ignore[attr-defined]  # the timer is removed

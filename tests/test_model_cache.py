"""The vectorised score cache: bounded, approximately LRU, and never changing a result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.capture.names import syscall_number
from agent.events import SYSCALL_DTYPE
from agent.model import AnomalyDetector, Model, ScoreCache, ThreadWindows, load_model, window_keys

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "sysgram-default.onnx"


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(SHIPPED)


def distinct_keys(count: int, seed: int) -> np.ndarray:
    keys = np.unique(np.random.default_rng(seed).integers(1, 2**63, size=count * 2, dtype=np.int64))
    return keys[:count].astype(np.uint64)


def stream(rows: int, threads: int, seed: int, names: list[str], loop: bool = False) -> np.ndarray:
    """Rows of ``threads`` threads (two per process) picking syscalls from ``names`` at random, or (``loop``)
    cycling through them with a rare random change (so windows repeat, as real traffic's do)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(rows, dtype=SYSCALL_DTYPE)
    out["ts"] = np.arange(rows, dtype=np.uint64) * 1000
    out["tid"] = rng.integers(threads, size=rows) + 500
    out["tgid"] = out["tid"] // 2 * 2
    numbers = np.array([syscall_number(n) for n in names])
    pick = rng.integers(len(numbers), size=rows)
    if loop:
        pick = np.where(rng.random(rows) < 0.01, pick, np.arange(rows) % len(numbers))
    out["nr"] = numbers[pick]
    return out


COMMON = ["read", "write", "openat", "close", "newfstatat", "mmap", "futex", "epoll_wait"]


def test_lookup_finds_what_was_inserted_and_nothing_else() -> None:
    cache = ScoreCache(1000)
    keys = distinct_keys(600, seed=1)
    scores = np.random.default_rng(2).random(600)
    cache.insert(keys[:400], scores[:400])
    found, got = cache.lookup(keys)
    assert found[:400].all() and not found[400:].any()
    assert np.array_equal(got[:400], scores[:400])
    assert len(cache) == 400
    # a key of 0 (the table's empty marker) is still a key
    cache.insert(np.array([0], dtype=np.uint64), np.array([7.5]))
    assert cache.lookup(np.array([0], dtype=np.uint64))[0].all()


def test_the_cache_never_holds_more_than_its_size() -> None:
    size = 512
    cache = ScoreCache(size)
    rng = np.random.default_rng(3)
    for step in range(40):
        keys = distinct_keys(int(rng.integers(1, 300)), seed=100 + step)
        found, _ = cache.lookup(keys)
        cache.insert(keys[~found], np.full(int((~found).sum()), float(step)))
        assert len(cache) <= size
    assert cache.evictions > 0
    # more new keys than room at once: the latest are kept, the bound holds
    many = distinct_keys(3 * size, seed=7)
    cache.insert(many, np.arange(3 * size, dtype=np.float64))
    assert len(cache) == size
    found, got = cache.lookup(many)
    assert found[-size:].all() and not found[:-size].any()
    assert np.array_equal(got[-size:], np.arange(2 * size, 3 * size))


def test_recently_used_entries_survive_eviction() -> None:
    cache = ScoreCache(256)
    hot = distinct_keys(50, seed=11)
    cache.insert(hot, np.arange(50.0))
    for step in range(20):
        cache.lookup(hot)  # used in every batch
        cold = distinct_keys(60, seed=200 + step)
        found, _ = cache.lookup(cold)
        cache.insert(cold[~found], np.zeros(int((~found).sum())))
    assert cache.evictions > 0
    found, got = cache.lookup(hot)
    assert found.all() and np.array_equal(got, np.arange(50.0))


def test_zero_size_cache_holds_nothing() -> None:
    cache = ScoreCache(0)
    keys = distinct_keys(10, seed=5)
    cache.insert(keys, np.ones(10))
    assert len(cache) == 0 and not cache.lookup(keys)[0].any()


def test_keys_hashed_from_the_buffer_equal_window_keys() -> None:
    batch = stream(3000, threads=9, seed=4, names=COMMON)
    tables = {c: np.arange(600, dtype=np.int64) for c in (False, True)}
    win = ThreadWindows(7, tables).build(batch)
    programs = np.random.default_rng(0).integers(0, 4, size=len(win))
    keys = win.keys(programs)
    assert np.array_equal(keys, window_keys(win.tokens, programs))
    # a different program makes a different key for the same window
    assert not np.array_equal(keys, win.keys(programs + 1))
    assert len(np.unique(keys)) == len(np.unique(np.c_[win.tokens, programs], axis=0))


def announce(detector: AnomalyDetector, data: np.ndarray) -> None:
    """Every thread of ``data`` is seen starting (its fork), so its first windows are padded as in training."""
    for tgid, tid in {(int(a), int(b)) for a, b in zip(data["tgid"], data["tid"], strict=True)}:
        detector.on_fork(tgid, tid)


def scores_by_row(detector: AnomalyDetector, batches: list[np.ndarray], exe_of: dict[int, str]) -> np.ndarray:
    """Every window's score, in stream order, as the detector computed it (through its cache or not)."""
    out = []
    for batch in batches:
        win = detector.windows.build(batch)
        tgids = batch["tgid"][win.rows]
        programs = np.array([detector.model.program_id(exe_of[int(t)]) for t in tgids], dtype=np.int64)
        scores = np.empty(len(batch))
        scores[win.rows] = detector._scores(win, programs)[0]
        out.append(scores)
    return np.concatenate(out)


def straight_through(model: Model, data: np.ndarray, exe: str) -> np.ndarray:
    """The reference: every window of ``data`` scored straight through the model, no cache, no dedup."""
    win = ThreadWindows(model.n, model.nr_tokens).build(data)
    programs = np.full(len(win.tokens), model.program_id(exe), dtype=np.int64)
    want = np.empty(len(data))
    want[win.rows] = model.window_scores(model.score(win.tokens, programs), win.tokens)
    return want


def test_cached_scores_equal_uncached_scoring(model: Model) -> None:
    data = stream(6000, threads=1, seed=8, names=COMMON, loop=True)
    exe_of = {int(t): "/usr/bin/python3.11" for t in np.unique(data["tgid"])}
    batches = np.array_split(data, 7)
    cached = AnomalyDetector(model, cache_size=4096)
    announce(cached, data)
    got = scores_by_row(cached, batches, exe_of)
    assert cached.stats["cache_hits"] > cached.stats["windows_scored"]  # the cache did the work
    assert np.allclose(got, straight_through(model, data, "/usr/bin/python3.11"), rtol=0, atol=1e-9)


def test_detector_verdicts_are_the_same_with_and_without_cache(model: Model) -> None:
    data = stream(4000, threads=8, seed=9, names=COMMON)
    exe_of = {int(t): "/usr/bin/bash" for t in np.unique(data["tgid"])}
    cached, uncached = AnomalyDetector(model, cache_size=2048), AnomalyDetector(model, cache_size=0)
    for batch in np.array_split(data, 5):
        assert [a.pid for a in cached.push(batch, exe_of)] == [a.pid for a in uncached.push(batch, exe_of)]
    for pid in exe_of:
        a, b = cached.state(pid), uncached.state(pid)
        assert a is not None and b is not None
        assert (a.windows, a.window, a.is_anomalous) == (b.windows, b.window, b.is_anomalous)
        assert a.score == pytest.approx(b.score, abs=1e-9)


def test_an_evicted_window_is_scored_again_with_the_same_result(model: Model) -> None:
    det = AnomalyDetector(model, cache_size=64)
    exe_of = {600: "/usr/bin/bash"}
    first = stream(300, threads=1, seed=12, names=COMMON)
    first["tid"] = first["tgid"] = 600
    announce(det, first)
    det.push(first, exe_of)
    scored = det.stats["windows_scored"]
    assert 64 < scored <= 300 and len(det.cache) <= 64
    for seed in range(13, 18):  # other windows push the first ones out
        other = stream(300, threads=1, seed=seed, names=COMMON)
        other["tid"] = other["tgid"] = 600
        det.push(other, exe_of)
    assert det.stats["cache_evictions"] > 0
    det.on_exec(600, [600])
    before = det.stats["windows_scored"]
    again = scores_by_row(det, [first], exe_of)
    assert det.stats["windows_scored"] - before > 0  # they had been evicted: onnxruntime again
    ref = AnomalyDetector(model, cache_size=0)
    announce(ref, first)
    assert np.allclose(again, scores_by_row(ref, [first], exe_of), rtol=0, atol=1e-9)


def test_runs_of_one_repeated_window_score_as_every_window_does(model: Model) -> None:
    # long constant runs (a getppid loop) in two threads, between bursts of varied syscalls
    parts = []
    for k, name in enumerate(["getppid", "futex", "read"]):
        burst = stream(200, threads=2, seed=30 + k, names=COMMON)
        loop = np.zeros(3000, dtype=SYSCALL_DTYPE)
        loop["tid"] = 501 + (np.arange(3000) // 700) % 2
        loop["tgid"] = 500
        loop["nr"] = syscall_number(name)
        parts += [burst, loop]
    data = np.concatenate(parts)
    data["ts"] = np.arange(len(data), dtype=np.uint64) * 1000
    exe_of = {int(t): "/usr/bin/python3.11" for t in np.unique(data["tgid"])}
    det = AnomalyDetector(model, cache_size=4096)
    announce(det, data)
    got = scores_by_row(det, np.array_split(data, 3), exe_of)
    assert det.stats["windows_scored"] + det.stats["cache_hits"] == len(data)
    assert np.allclose(got, straight_through(model, data, "/usr/bin/python3.11"), rtol=0, atol=1e-9)

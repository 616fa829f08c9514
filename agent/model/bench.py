"""``sysgram bench score``: raw ONNX windows/s on one core, windows/s through the cache, training time."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from agent.bench import Figure
from agent.events import FLAG_COMPAT, SYSCALL_DTYPE
from agent.model._detector import AnomalyDetector
from agent.model._model import Model, load_model

PART = "score"
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "sysgram-default.onnx"
ADFA = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "adfa-ld" / "Validation_Data_Master"


def realistic_stream(rows: int, seed: int = 0) -> np.ndarray:
    """Syscall rows from real traces (ADFA-LD validation, i386 numbers) interleaved across 64 threads.

    Falls back to a synthetic repetitive loop when ../shared is absent.
    """
    rng = np.random.default_rng(seed)
    traces: list[np.ndarray] = []
    if ADFA.is_dir():
        for f in sorted(ADFA.glob("*.txt"))[:400]:
            traces.append(np.array(f.read_text().split(), dtype=np.uint16))
        flags = FLAG_COMPAT
    else:
        loop = np.array([0, 1, 3, 0, 1, 3, 8, 9, 3, 257, 0, 3], dtype=np.uint16)
        traces = [np.tile(loop, 50) for _ in range(16)]
        flags = 0
    out = np.zeros(rows, dtype=SYSCALL_DTYPE)
    threads = 64
    chunk = 256
    pos = 0
    while pos < rows:
        t = int(rng.integers(len(traces)))
        tid = int(rng.integers(threads)) + 1000
        trace = traces[t][:chunk]
        k = min(len(trace), rows - pos)
        out["nr"][pos:pos + k] = trace[:k]
        out["tid"][pos:pos + k] = tid
        out["tgid"][pos:pos + k] = tid
        out["flags"][pos:pos + k] = flags
        pos += k
    out["ts"] = np.arange(rows, dtype=np.uint64) * 1000
    return out


def raw_rate(model: Model, windows: int) -> float:
    """Windows/s straight through onnxruntime on one thread (every window scored)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, model.sidecar.vocab_size, size=(windows, model.n)).astype(np.int64)
    programs = np.zeros(windows, dtype=np.int64)
    model.score(tokens[:1024], programs[:1024])  # warm-up
    started = time.perf_counter()
    model.score(tokens, programs)
    return windows / (time.perf_counter() - started)


def cached_rate(model: Model, rows: int) -> tuple[float, float]:
    stream = realistic_stream(rows)
    detector = AnomalyDetector(model, cache_size=65536)
    exe_of = {int(t): "/usr/bin/bench" for t in np.unique(stream["tgid"])}
    batch = 65536
    detector.push(stream[:batch], exe_of)  # warm the cache as a running agent would be
    started = time.perf_counter()
    for s in range(batch, rows, batch):
        detector.push(stream[s:s + batch], exe_of)
    elapsed = time.perf_counter() - started
    stats = detector.stats
    windows = rows - batch
    return windows / elapsed, stats["cache_hits"] / max(stats["windows"], 1)


def training_seconds_per_million(windows: int) -> float | str:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch not installed"
    from training.net import NetConfig
    from training.train import TrainConfig, fit

    rng = np.random.default_rng(0)
    n = 16
    data = rng.integers(3, 120, size=(windows, n)).astype(np.int64)
    progs = np.zeros(windows, dtype=np.int64)
    cfg = TrainConfig(n=n, epochs=1, threads=2)
    started = time.perf_counter()
    fit(data, progs, data[:0], progs[:0], NetConfig(vocab_size=123, n=n, programs=1), cfg, progress=False)
    return (time.perf_counter() - started) * 1_000_000 / windows


def run(quick: bool) -> list[Figure]:
    if not SHIPPED.exists():
        return [Figure(PART, "status", f"no model at {SHIPPED}")]
    model = load_model(SHIPPED, threads=1)
    figures = [
        Figure(PART, "raw ONNX windows/s (1 core, 4 passes)", round(raw_rate(model, 20_000 if quick else 200_000)),
               "windows/s", ">= 200,000"),
    ]
    rate, hit_rate = cached_rate(model, 300_000 if quick else 3_000_000)
    figures.append(Figure(PART, "windows/s through cache (ADFA-LD traffic)", round(rate), "windows/s",
                          ">= 1,000,000"))
    figures.append(Figure(PART, "cache hit rate", round(hit_rate, 4), "fraction"))
    train = training_seconds_per_million(100_000 if quick else 1_000_000)
    figures.append(Figure(PART, "training time per 1M windows (1 epoch, 2 threads)",
                          round(train, 1) if isinstance(train, float) else train, "s"))
    return figures

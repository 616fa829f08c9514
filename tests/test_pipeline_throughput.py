"""The pipeline's fast path: batches sliced for the detector, process lookups from run heads, priority."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import agent.pipeline as pipeline_module
from agent.capture.names import syscall_number
from agent.events import SYSCALL_DTYPE
from agent.model import AnomalyDetector, Model, load_model
from agent.pipeline import Pipeline, boost_priority, restore_priority
from agent.proc import ProcessTable
from agent.proc.info import ProcessInfo

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "sysgram-default.onnx"
NAMES = ["read", "write", "openat", "close", "newfstatat", "mmap", "futex", "getppid"]


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(SHIPPED)


def traffic(rows: int, seed: int) -> np.ndarray:
    """Runs of one thread (as the capture hands them over), from three processes, some runs constant."""
    rng = np.random.default_rng(seed)
    out = np.zeros(rows, dtype=SYSCALL_DTYPE)
    numbers = np.array([syscall_number(n) for n in NAMES])
    at = 0
    while at < rows:
        length = min(int(rng.integers(1, 400)), rows - at)
        tid = int(rng.choice([7001, 7002, 7101, 7201]))
        out["tid"][at:at + length] = tid
        out["tgid"][at:at + length] = tid // 100 * 100
        if rng.random() < 0.5:
            out["nr"][at:at + length] = numbers[int(rng.integers(len(numbers)))]
        else:
            out["nr"][at:at + length] = numbers[rng.integers(len(numbers), size=length)]
        at += length
    out["ts"] = np.arange(rows, dtype=np.uint64) * 100
    return out


def pipeline_with(model: Model) -> Pipeline:
    table = ProcessTable()
    for pid, exe in ((7000, "/usr/bin/bash"), (7100, "/usr/bin/python3.11"), (7200, "/usr/sbin/nginx")):
        table.add(ProcessInfo(pid=pid, ppid=1, comm=os.path.basename(exe), exe=exe))
    return Pipeline(table=table, detector=AnomalyDetector(model, cache_size=4096, min_windows=1))


def test_a_batch_sliced_for_the_detector_gives_what_one_push_gives(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = traffic(5000, seed=1)
    whole = pipeline_with(model)
    whole.handle([data])
    monkeypatch.setattr(pipeline_module, "DETECTOR_SLICE_ROWS", 333)
    sliced = pipeline_with(model)
    sliced.handle([data])
    assert sliced.detector.stats["batches"] == -(-5000 // 333) and whole.detector.stats["batches"] == 1
    assert sliced.detector.stats["syscalls"] == whole.detector.stats["syscalls"] == 5000
    # its threads were running before (no fork seen): their first n-1 syscalls are context, however sliced
    for key in ("windows", "context_only_rows"):
        assert sliced.detector.stats[key] == whole.detector.stats[key]
    assert whole.detector.stats["windows"] + whole.detector.stats["context_only_rows"] == 5000
    for pid in (7000, 7100, 7200):
        a, b = whole.detector.state(pid), sliced.detector.state(pid)
        assert a is not None and b is not None
        assert (a.exe, a.windows) == (b.exe, b.windows)
        assert a.score == pytest.approx(b.score, abs=1e-9)  # the same windows, the same mean


def test_every_window_is_either_a_cache_hit_or_scored(model: Model) -> None:
    p = pipeline_with(model)
    for seed in range(3):
        p.handle([traffic(3000, seed=10 + seed)])
    stats = p.detector.stats
    assert stats["windows"] + stats["context_only_rows"] == 9000  # threads found running: context first
    assert stats["windows_scored"] + stats["cache_hits"] == stats["windows"]  # bench e2e's "unscored" check
    assert stats["windows_scored"] < stats["windows"]


def test_processes_unknown_to_the_table_are_read_once_per_batch(model: Model) -> None:
    p = pipeline_with(model)
    mine = os.getpid()
    batch = traffic(600, seed=4)
    batch["tgid"][:300] = mine  # a process the table has not seen: read from /proc
    batch["tid"][:300] = mine
    p.handle([batch])
    info = p.table.get(mine)
    assert info is not None and info.exe
    state = p.detector.state(mine)
    assert state is not None and state.exe == info.exe


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_priority_is_set_on_every_thread_inherited_and_restored() -> None:
    if os.geteuid() != 0:
        pytest.skip("lowering nice needs root (CAP_SYS_NICE)")
    started, stop = threading.Event(), threading.Event()
    tids: list[int] = []

    def idle() -> None:
        tids.append(threading.get_native_id())
        started.set()
        stop.wait(10)

    before = threading.Thread(target=idle)
    before.start()
    started.wait(5)
    main = threading.get_native_id()
    old = {main: nice_of(main), tids[0]: nice_of(tids[0])}
    target = min(old.values()) - 3
    previous = boost_priority(target)
    try:
        assert nice_of(main) == target and nice_of(tids[0]) == target  # a thread already running
        started.clear()
        after = threading.Thread(target=idle)
        after.start()
        started.wait(5)
        assert nice_of(tids[1]) == target  # a thread started since inherits it
        assert previous[main] == old[main] and previous[tids[0]] == old[tids[0]]
    finally:
        restore_priority(previous)
        stop.set()
    assert nice_of(main) == old[main]
    before.join()

"""Process churn (issue 6: no memory growth over 100,000 process lifetimes), without the kernel: the shipped
model, a real process table and detector, fed through ``Pipeline.handle`` in the order live capture hands
events over. A group's process events come before its syscall rows, and the capture holds compact rows back
to order them across CPUs, so a process's last syscalls reach the pipeline after its exit event."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.capture.names import syscall_number
from agent.capture.source import Chunk
from agent.events import SYSCALL_DTYPE, ProcEvent
from agent.memory import release_free_memory
from agent.model import AnomalyDetector, Model, load_model
from agent.model._detector import EXIT_SETTLE_NS, EXITED_KEEP_MAX
from agent.pipeline import Pipeline
from agent.proc import ProcessTable
from agent.proc.info import ProcessInfo

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "sysgram-default.onnx"
PARENT, EXE = 500, "/usr/local/bin/churn"
MS = 1_000_000
CHILD = ["rt_sigprocmask", "getpid", "close", "openat", "read", "close", "exit_group"]


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(SHIPPED)


def churn_pipeline(model: Model, tmp_path: Path) -> Pipeline:
    table = ProcessTable(proc_root=str(tmp_path / "no-proc"))  # only what the events say
    table.add(ProcessInfo(pid=PARENT, ppid=1, comm="churn", exe=EXE))
    return Pipeline(table=table, detector=AnomalyDetector(model))


def lifetime(pid: int, ts: int) -> tuple[list[ProcEvent], np.ndarray]:
    """One fork+exit lifetime: its process events, and the child's syscall rows (before its exit)."""
    rows = np.zeros(len(CHILD), dtype=SYSCALL_DTYPE)
    rows["ts"] = ts + 1000 + np.arange(len(CHILD)) * 1000
    rows["tgid"] = rows["tid"] = pid
    rows["nr"] = [syscall_number(n) for n in CHILD]
    events = [ProcEvent("fork", ts, pid, pid, ppid=PARENT), ProcEvent("exit", ts + 10_000, pid, pid)]
    return events, rows


def churn(pipeline: Pipeline, lifetimes: int, first_pid: int = 1000, t0: int = 10**12, per_group: int = 50,
          gap_ns: int = MS // 4) -> int:
    """``lifetimes`` processes; each group's rows are handed over with the next group (late). -> last ts."""
    held: list[np.ndarray] = []
    ts = t0
    for start in range(0, lifetimes, per_group):
        chunks: list[Chunk] = []
        rows: list[np.ndarray] = []
        for pid in range(first_pid + start, first_pid + min(start + per_group, lifetimes)):
            events, r = lifetime(pid, ts)
            chunks += events
            rows.append(r)
            ts += gap_ns
        pipeline.handle([*chunks, *held])  # process events first, then the rows released by now
        held = [np.concatenate(rows)]
    pipeline.handle(held)
    return ts


def test_exited_threads_leave_no_state_behind_when_their_syscalls_come_after_their_exit(
    model: Model, tmp_path: Path
) -> None:
    pipeline = churn_pipeline(model, tmp_path)
    det = pipeline.detector
    n = 3 * EXITED_KEEP_MAX
    end = churn(pipeline, n)
    stats = det.stats
    assert stats["syscalls"] == n * len(CHILD)  # every row was scored
    # the stream's own clock settles exits: only the last EXIT_SETTLE_NS of them still have windows
    assert stats["threads"] <= EXIT_SETTLE_NS // (MS // 4) + 2 * 50
    assert stats["processes"] <= EXITED_KEEP_MAX + 1  # the latest exits, for a late Falco alert
    pipeline.reap(end + EXIT_SETTLE_NS + 1)  # the housekeeping clock settles the rest on a quiet stream
    stats = det.stats
    assert stats["threads"] == 0 and stats["exits_settling"] == 0 and stats["threads_evicted"] == 0
    # the state the late rows made is the exit's: the latest exits are readable, the older ones are gone
    assert det.state(1000 + n - 1) is not None and det.state(1000) is None
    assert stats["processes"] <= EXITED_KEEP_MAX


def test_an_exited_thread_keeps_its_windows_for_its_late_syscalls(model: Model, tmp_path: Path) -> None:
    events, rows = lifetime(2000, 10**12)
    first, late = rows[:4], rows[4:]
    in_order = churn_pipeline(model, tmp_path)
    in_order.handle([events[0], first, late, events[1]])
    live_like = churn_pipeline(model, tmp_path)
    live_like.handle([events[0], first])
    live_like.handle([events[1], late])  # the exit overtakes the last rows
    a, b = in_order.detector.state(2000), live_like.detector.state(2000)
    assert a is not None and b is not None
    assert (a.windows, a.window) == (b.windows, b.window)
    assert b.score == pytest.approx(a.score, abs=1e-9)  # the late windows continue from the carried tokens


def test_a_new_process_with_a_reused_pid_starts_its_own_aggregate(model: Model, tmp_path: Path) -> None:
    pipeline = churn_pipeline(model, tmp_path)
    events, rows = lifetime(3000, 10**12)
    pipeline.handle([*events, rows])
    old = pipeline.detector.state(3000)
    assert old is not None and old.windows == len(CHILD)  # kept for a while after the exit
    again, rows2 = lifetime(3000, 10**12 + 5 * EXIT_SETTLE_NS)  # the pid comes round again, same program
    pipeline.handle([again[0]])
    assert pipeline.detector.state(3000) is None  # the fork says the old state is no longer this pid's
    pipeline.handle([rows2])
    new = pipeline.detector.state(3000)
    assert new is not None and new.windows == len(CHILD)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def test_memory_freed_after_a_burst_goes_back_to_the_os() -> None:
    if not release_free_memory():
        pytest.skip("not glibc: no malloc_trim")
    burst = [bytes(1000) + bytes([i % 256]) for i in range(40_000)]  # ~40 MB on the C heap (over 512 bytes)
    survivors = burst[::16]  # a few stay: the freed memory is holes, not the heap's top, which glibc keeps
    del burst
    before = _rss_mb()
    assert release_free_memory()
    assert before - _rss_mb() > 15
    assert len(survivors) == 2500

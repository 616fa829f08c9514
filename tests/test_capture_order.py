"""Compact batches back into per-thread order: partial time stamps, runs, the cross-CPU watermark."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from agent.capture import _layout as L
from agent.capture._batches import BatchOrderer, decode
from agent.capture.names import syscall_number
from tests.conftest import requires_bpf


def batch(cpu: int, base: int, end: int, recs: Sequence[tuple[int, int, int | None]]) -> bytes:
    """recs: (tid, nr, stamp time or None)."""
    header = np.zeros(1, L.BATCH_HEADER)
    header["base_ts"], header["end_ts"], header["count"], header["cpu"] = base, end, len(recs), cpu
    body = np.zeros(len(recs), L.SC_REC)
    for i, (tid, nr, ts) in enumerate(recs):
        body[i]["tgid"], body[i]["tid"], body[i]["nr"] = tid, tid, nr
        if ts is not None:
            body[i]["flags"] = L.REC_STAMPED
            body[i]["ts_delta"] = ts - base
    return header.tobytes() + body.tobytes()


def test_runs_are_ordered_by_their_stamp_and_times_interpolated() -> None:
    # Thread 7 runs on CPU 1 at t=100..130, then on CPU 0 at t=200..; CPU 0's batch arrives first.
    cpu0 = batch(0, 200, 300, [(7, 3, 200), (7, 4, None), (9, 5, 250), (9, 6, None)])
    cpu1 = batch(1, 100, 400, [(7, 1, 100), (7, 2, None)])
    rows, keys, headers = decode([cpu0, cpu1])
    assert rows["nr"].tolist() == [1, 2, 3, 4, 5, 6]
    assert rows["tid"].tolist() == [7, 7, 7, 7, 9, 9]
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    # Inside a run, times lie between the run's stamp and the next stamp (or the batch's send time).
    assert rows["ts"].tolist()[0] == 100 and 100 < rows["ts"][1] <= 400
    assert rows["ts"][2] == 200 and 200 < rows["ts"][3] < 250
    assert rows["ts"][4] == 250 and 250 < rows["ts"][5] <= 300
    assert headers["cpu"].tolist() == [0, 1]


def test_a_runs_tail_is_not_spread_over_the_time_its_cpu_went_on_without_it() -> None:
    """A fork child's pre-exec rows on CPU 0 (stamp at 1,000), then CPU 0 idles 3 ms before thread 9's
    syscall; the child's last rows must stay near their run's start, not be dated up to 3 ms later, past
    the exec. A run continued by the same thread keeps the exact interpolation to its next stamp."""
    from agent.capture._batches import TAIL_NS_PER_ROW

    child = [(7, 1, 1_000)] + [(7, 2 + i, None) for i in range(10)]
    cpu0 = batch(0, 1_000, 9_000_000, [*child, (9, 50, 3_001_000), (9, 51, None)])
    rows, _, _ = decode([cpu0])
    tail = rows["ts"][rows["tid"] == 7].astype(np.int64)
    assert tail[0] == 1_000 and (np.diff(tail) > 0).all()
    assert tail[-1] <= 1_000 + 10 * TAIL_NS_PER_ROW  # not ~3,001,000
    # the batch's last run (thread 9) is capped the same way: its end is only the batch's send time
    nine = rows["ts"][rows["tid"] == 9].astype(np.int64)
    assert nine[0] == 3_001_000 and nine[1] <= 3_001_000 + TAIL_NS_PER_ROW
    # the same thread split by STAMP_EVERY (the batch's 64th record) or stamped for its execve went straight
    # on: its next stamp is its own next syscall, so times spread to it
    split = batch(1, 0, 10**9, [(5, 1, 0)] + [(5, 2, None)] * 63 + [(5, 3, 640_000), (5, 4, None)])
    same, _, _ = decode([split])
    assert same["ts"][:65].tolist() == [10_000 * i for i in range(65)]
    execve = syscall_number("execve")
    to_exec = batch(1, 0, 10**9, [(5, 1, 0), (5, 2, None), (5, execve, 300_000), (5, 4, None)])
    assert decode([to_exec])[0]["ts"][:3].tolist() == [0, 150_000, 300_000]
    # the same thread back on this CPU after running elsewhere (its earlier run ended at a context switch)
    back = batch(1, 0, 10**9, [(5, 1, 0), (5, 2, None), (5, 3, None), (5, 4, 3_000_000), (5, 5, None)])
    assert decode([back])[0]["ts"][:4].tolist() == [0, TAIL_NS_PER_ROW, 2 * TAIL_NS_PER_ROW, 3_000_000]
    # runs arriving out of order (CPU 1's batch first) are capped the same way once sorted
    cpu1 = batch(1, 5_000, 10**9, [(8, 9, 5_000), (8, 9, None)])
    mixed, _, _ = decode([cpu1, cpu0])
    assert mixed["tid"].tolist()[:11] == [7] * 11 and mixed["ts"][10] <= 1_000 + 10 * TAIL_NS_PER_ROW


def test_32_bit_syscalls_keep_their_flag_and_their_execve_stamp() -> None:
    """The kernel flags a syscall made through a 32-bit gate (REC_COMPAT): the row carries FLAG_COMPAT, and
    an i386 execve (11) is a stamp the thread went straight on to, while a native 11 (munmap) is not."""
    from agent.capture._batches import TAIL_NS_PER_ROW
    from agent.events import FLAG_COMPAT

    execve32 = syscall_number("execve", compat=True)
    raw = batch(1, 0, 10**9, [(5, 1, 0), (5, 2, None), (5, execve32, 300_000), (5, 4, None)])
    recs = np.frombuffer(raw, L.SC_REC, offset=L.BATCH_HEADER.itemsize).copy()
    plain = decode([raw])[0]
    assert not (plain["flags"] & FLAG_COMPAT).any()
    assert plain["ts"][:3].tolist() == [0, TAIL_NS_PER_ROW, 300_000]  # munmap: not a stamp it went on to
    recs["flags"] |= L.REC_COMPAT
    flagged = decode([raw[: L.BATCH_HEADER.itemsize] + recs.tobytes()])[0]
    assert (flagged["flags"] & FLAG_COMPAT).all()
    assert flagged["ts"][:3].tolist() == [0, 150_000, 300_000]


def test_full_batches_decode_vectorised_like_partial_ones() -> None:
    base = 1_000
    recs = [(5, i % 300, base + 10 * i if i % 64 == 0 else None) for i in range(L.BATCH_SIZE)]
    full = batch(0, base, base + 10 * L.BATCH_SIZE, recs)
    later = 10 * L.BATCH_SIZE + 7
    full2 = batch(0, base + later, base + later + 10 * L.BATCH_SIZE,
                  [(t, nr, None if ts is None else ts + later) for t, nr, ts in recs])
    rows_full, _, _ = decode([full, full2])
    rows_mixed, _, _ = decode([full, batch(1, base, base + 5, recs[:3])])
    assert len(rows_full) == 2 * L.BATCH_SIZE and len(rows_mixed) == L.BATCH_SIZE + 3
    assert rows_full["nr"][: L.BATCH_SIZE].tolist() == [i % 300 for i in range(L.BATCH_SIZE)]
    ts = rows_full["ts"][: L.BATCH_SIZE].astype(np.int64)
    assert (np.diff(ts) >= 0).all() and ts[0] == base and ts[64] == base + 640


def test_rows_wait_for_every_cpu_then_leave_in_order() -> None:
    orderer = BatchOrderer()
    # CPU 0 reports up to t=300; CPU 1 has reported nothing newer than t=50: rows after 50 wait.
    out = orderer.add([batch(1, 10, 50, [(3, 1, 10)]), batch(0, 200, 300, [(7, 3, 200), (7, 4, None)])])
    assert out["nr"].tolist() == [1] and orderer.held == 2
    # CPU 1's late batch (an earlier run of thread 7) arrives: it goes first.
    out = orderer.add([batch(1, 100, 400, [(7, 2, 100)])])
    assert out["nr"].tolist() == [2, 3, 4] and orderer.held == 0
    # An empty batch (the ticker's flush of an idle CPU) moves the watermark too.
    orderer.add([batch(0, 500, 600, [(7, 5, 500)])])
    assert orderer.held == 1
    assert orderer.add([batch(1, 0, 700, [])])["nr"].tolist() == [5]


def test_a_silent_cpu_holds_rows_back_no_longer_than_max_hold() -> None:
    orderer = BatchOrderer(max_hold_ns=1_000)
    orderer.add([batch(1, 0, 10, [])])
    out = orderer.add([batch(0, 100, 5_000, [(7, 1, 100), (7, 2, 4_500)])])
    assert out["nr"].tolist() == [1]  # 4,500 is within max_hold of the newest report: still held
    assert orderer.drain()["nr"].tolist() == [2]


def test_rows_after_the_last_detail_read_wait_for_the_details_but_not_past_max_hold() -> None:
    orderer = BatchOrderer(max_hold_ns=1_000)
    both = [batch(0, 100, 900, [(7, 1, 100), (7, 2, 400)]), batch(1, 0, 900, [])]
    # the reader stopped at a detail of t=300 (its budget): rows after it wait for the rest of the details
    assert orderer.add(both, hold_after=300)["nr"].tolist() == [1]
    assert orderer.add([], hold_after=None)["nr"].tolist() == [2]  # the details caught up
    assert orderer.add([batch(0, 1_000, 1_100, [(7, 3, 1_000)]), batch(1, 0, 1_100, [])], hold_after=50).size == 0
    out = orderer.add([batch(0, 2_500, 3_000, []), batch(1, 0, 3_000, [])], hold_after=50)
    assert out["nr"].tolist() == [3]  # held by the details' lag no longer than max_hold


def test_a_turn_cut_short_holds_rows_after_the_latest_detail_stamp_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # A syscall detail's stamp is its entry time, so records leave the ring out of stamp order: the cut is
    # the latest stamp read, not the last record's (a blocking accept's could be seconds back).
    import ctypes

    import agent.capture.source as source_module

    monkeypatch.setattr(source_module, "DETAIL_TURN_BUDGET", 3)
    source = source_module.LiveSource(detail_syscalls=set())
    answers = []
    for ts in (5_000, 9_000, 2_000):  # the third spends the budget
        record = np.zeros(1, L.PROC_EVENT)
        record["h"]["kind"], record["h"]["tgid"], record["h"]["tid"] = L.K_EXIT, 42, 42
        record["h"]["aux"], record["h"]["ts"] = 1, ts
        raw = record.tobytes()
        buffer = ctypes.create_string_buffer(raw, len(raw))
        answers.append(source._on_detail(None, ctypes.addressof(buffer), len(raw)))
    assert answers == [0, 0, -1]  # -1: libbpf stops this ring's consumption for the turn
    assert source._details_cut_at == 9_000


@requires_bpf
@pytest.mark.bpf
def test_a_thread_hopping_between_cpus_keeps_its_order(tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs for the thread to migrate between")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "sysgram-migrate"
    subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).parent / "migrate.c")], check=True)
    from agent.capture.names import syscall_number
    from agent.capture.source import LiveSource

    source = LiveSource(detail_syscalls=set())
    source.start()
    try:
        rounds, hop = 20_000, 37
        child = subprocess.Popen([str(exe), str(rounds), str(hop)])
        child.wait(timeout=60)
        time.sleep(0.1)
    finally:
        source.stop()
        groups = []
        while (group := source.get(0.0)) is not None:
            groups.append(group)
        drops = source.drops()
        source.close()
    rows = np.concatenate([c for g in groups for c in g if isinstance(c, np.ndarray)])
    mine = rows[rows["tgid"] == child.pid]
    pattern = [syscall_number(n) for n in ("getppid", "getuid", "getgid", "geteuid")]
    affinity = syscall_number("sched_setaffinity")
    nrs = mine["nr"][np.isin(mine["nr"], pattern)]
    assert sum(drops.values()) == 0
    assert len(nrs) == 4 * rounds
    bad = np.flatnonzero((nrs.reshape(-1, 4) != np.array(pattern)).any(axis=1))
    assert not len(bad), f"{len(bad)} rounds out of order, first at {bad[:5]}: {nrs[4 * bad[0] - 8: 4 * bad[0] + 12]}"
    # The hops really happened (the test means nothing otherwise).
    assert int((mine["nr"] == affinity).sum()) == -(-rounds // hop)
    assert (np.diff(mine["ts"].astype(np.int64)) >= 0).mean() > 0.99


def test_queued_syscall_details_are_bounded_but_process_events_are_kept() -> None:
    from agent.capture.source import LiveSource
    from agent.events import DetailEvent, ProcEvent

    source = LiveSource(detail_syscalls=set(), queue_max_details=5)

    def detail(i: int) -> DetailEvent:
        return DetailEvent(i, 10, 10, "openat", 257, 3, {"name": f"/tmp/{i}"})

    source._details = [detail(i) for i in range(4)]
    source._hand_over()
    source._details = [*(detail(i) for i in range(4, 8)), ProcEvent("exit", 9, 10, 10)]
    source._hand_over()  # 4 more would make 8 > 5: these details are dropped and counted, the exit is kept
    assert source.drops()["detail_queue_overflow"] == 4
    first, second = source.get(0.0), source.get(0.0)
    assert first is not None and second is not None
    assert [c.ts for c in first if isinstance(c, DetailEvent)] == [0, 1, 2, 3] and len(first) == 4
    assert [type(c).__name__ for c in second] == ["ProcEvent"]
    source._details = [detail(i) for i in range(8, 12)]  # the queue drained: room again
    source._hand_over()
    group = source.get(0.0)
    assert group is not None and len(group) == 4

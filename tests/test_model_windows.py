"""Windows: vectorised per-thread windows, carry-over across batches, UNK counting, compat numbers, exec."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from agent.capture.names import name_table, syscall_number
from agent.events import FLAG_COMPAT, SYSCALL_DTYPE
from agent.model import PAD, SPECIALS, UNK, AnomalyDetector, ThreadWindows, load_model, windows_of_trace

ROOT = Path(__file__).resolve().parents[1]

VOCAB = [*SPECIALS, "read", "write", "openat", "close", "mmap", "futex"]
TOKEN = {name: i for i, name in enumerate(VOCAB)}


def tables() -> dict[bool, np.ndarray]:
    return {c: np.array([TOKEN.get(str(nm), UNK) for nm in name_table(c)], dtype=np.int64) for c in (False, True)}


def batch_of(rows: list[tuple[int, int, str]], compat: bool = False) -> np.ndarray:
    out = np.zeros(len(rows), dtype=SYSCALL_DTYPE)
    for i, (tgid, tid, name) in enumerate(rows):
        out[i] = (i, tgid, tid, syscall_number(name, compat), FLAG_COMPAT if compat else 0)
    return out


def naive_windows(seq: list[int], n: int) -> list[list[int]]:
    padded = [PAD] * (n - 1) + seq
    return [padded[k:k + n] for k in range(len(seq))]


def test_windows_match_a_per_thread_reference() -> None:
    rng = np.random.default_rng(3)
    names = VOCAB[3:]
    rows = [(int(t) // 2 + 100, int(t), names[int(rng.integers(len(names)))]) for t in rng.integers(1, 6, 200)]
    tw = ThreadWindows(4, tables())
    win = tw.build(batch_of(rows))
    assert win.tokens.shape == (200, 4)
    for tid in {r[1] for r in rows}:
        seq = [TOKEN[r[2]] for r in rows if r[1] == tid]
        got = win.tokens[[i for i, r in enumerate(win.rows) if rows[r][1] == tid]]
        assert got.tolist() == naive_windows(seq, 4)
    # each window ends at the batch row it is attributed to
    ends = [TOKEN[rows[r][2]] for r in win.rows]
    assert win.tokens[:, -1].tolist() == ends


def test_threads_carry_their_last_syscalls_across_batches() -> None:
    rng = np.random.default_rng(5)
    names = VOCAB[3:]
    rows = [(7, int(t), names[int(rng.integers(len(names)))]) for t in rng.integers(1, 4, 300)]
    whole = ThreadWindows(5, tables()).build(batch_of(rows))
    split = ThreadWindows(5, tables())
    parts = [split.build(batch_of(rows[a:b])) for a, b in ((0, 17), (17, 18), (18, 150), (150, 300))]
    offsets = [0, 17, 18, 150]
    by_row_split = {int(r) + off: tuple(w) for p, off in zip(parts, offsets, strict=True)
                    for r, w in zip(p.rows, p.tokens.tolist(), strict=True)}
    by_row_whole = {int(r): tuple(w) for r, w in zip(whole.rows, whole.tokens.tolist(), strict=True)}
    assert by_row_split == by_row_whole


def test_reset_starts_a_thread_from_padding_again() -> None:
    tw = ThreadWindows(3, tables())
    tw.build(batch_of([(1, 1, "read"), (1, 1, "write")]))
    tw.reset(1)
    win = tw.build(batch_of([(1, 1, "close")]))
    assert win.tokens.tolist() == [[PAD, PAD, TOKEN["close"]]]
    kept = tw.build(batch_of([(1, 1, "mmap")]))
    assert kept.tokens.tolist() == [[PAD, TOKEN["close"], TOKEN["mmap"]]]


def test_unknown_syscalls_become_unk_and_are_counted() -> None:
    win = ThreadWindows(3, tables()).build(batch_of([(1, 1, "read"), (1, 1, "ptrace"), (1, 1, "bpf")]))
    assert win.unknown == 2
    assert win.tokens[-1].tolist() == [TOKEN["read"], UNK, UNK]


def test_compat_rows_use_i386_numbers() -> None:
    # i386 read is 3, x86_64 read is 0: the same name must give the same token
    native = ThreadWindows(2, tables()).build(batch_of([(1, 1, "read"), (1, 1, "mmap")]))
    compat = ThreadWindows(2, tables()).build(batch_of([(1, 1, "read"), (1, 1, "mmap")], compat=True))
    assert syscall_number("read", True) != syscall_number("read", False)
    assert native.tokens.tolist() == compat.tokens.tolist()


def test_windows_of_trace_pads_short_traces() -> None:
    w = windows_of_trace(np.array([5, 6]), 4)
    assert w.tolist() == [[PAD, PAD, PAD, 5], [PAD, PAD, 5, 6]]
    assert windows_of_trace(np.array([], dtype=np.int64), 4).shape == (0, 4)


def test_rows_before_an_exec_belong_to_the_old_program() -> None:
    names = ["rt_sigaction", "rt_sigaction", "execve", "brk", "mmap", "openat"]
    batch = np.zeros(len(names), dtype=SYSCALL_DTYPE)
    batch["tgid"] = batch["tid"] = 42
    batch["nr"] = [syscall_number(n) for n in names]
    tables = {c: np.arange(600, dtype=np.int64) for c in (False, True)}  # token = syscall number
    tw = ThreadWindows(4, tables)
    tw.exec(42)
    win = tw.build(batch)
    assert win.rows.tolist() == [3, 4, 5]  # the new program's windows start after its execve
    assert win.tokens[0].tolist() == [PAD, PAD, PAD, syscall_number("brk")]
    assert tw.dropped == 3
    # without an exec event (a failed execve), nothing is left out
    plain = ThreadWindows(4, tables).build(batch)
    assert plain.rows.tolist() == list(range(len(names)))
    # the exec applies once: the thread's next batch is all its own
    later = tw.build(batch)
    assert len(later) == len(names)


def test_rows_stamped_before_the_exec_are_left_out_however_they_are_batched() -> None:
    # the exec event comes first; the child's pre-exec rows (a PATH search: failed execves, then the one that
    # worked) arrive split over two batches, the first without any execve
    tables = {c: np.arange(600, dtype=np.int64) for c in (False, True)}
    exec_ts = 10_000

    def rows_of(items: list[tuple[str, int]]) -> np.ndarray:
        batch = np.zeros(len(items), dtype=SYSCALL_DTYPE)
        batch["tgid"] = batch["tid"] = 42
        batch["nr"] = [syscall_number(n) for n, _ in items]
        batch["ts"] = [t for _, t in items]
        return batch

    tw = ThreadWindows(4, tables)
    tw.exec(42, exec_ts)
    first = tw.build(rows_of([("rt_sigaction", 100), ("close", 200)]))
    assert len(first) == 0 and tw.dropped == 2  # all the old program's; still waiting for the exec
    second = tw.build(rows_of([("execve", 300), ("execve", 400), ("execve", 500), ("brk", 10_050),
                               ("mmap", 10_060)]))
    assert second.rows.tolist() == [3, 4] and tw.dropped == 5
    assert second.tokens[0].tolist() == [PAD, PAD, PAD, syscall_number("brk")]
    later = tw.build(rows_of([("read", 10_100), ("execve", 10_200)]))  # a later, failed execve: kept
    assert len(later) == 2


def test_the_detector_scores_a_new_program_from_after_its_execve() -> None:
    model = load_model(ROOT / "models" / "sysgram-default.onnx")
    names = ["rt_sigaction", "rt_sigprocmask", "execve", "brk", "mmap", "openat", "read", "close"]
    batch = np.zeros(len(names), dtype=SYSCALL_DTYPE)
    batch["tgid"] = batch["tid"] = 77
    batch["nr"] = [syscall_number(n) for n in names]
    det = AnomalyDetector(model)
    det.on_exec(77, [77])
    det.push(batch, {77: "/usr/bin/cat"})
    state = det.state(77)
    assert state is not None and state.windows == 5 and det.stats["pre_exec_rows"] == 3
    assert "execve" not in state.window and "rt_sigaction" not in state.window


def test_interleaved_runs_give_process_major_windows_and_thread_facts() -> None:
    rng = np.random.default_rng(21)
    names = VOCAB[3:]
    rows: list[tuple[int, int, str]] = []
    for _ in range(60):  # runs of one thread, in any order, as the capture hands them over
        tid = int(rng.choice([305, 301, 402, 303, 401]))
        rows += [(tid // 100, tid, names[int(rng.integers(len(names)))]) for _ in range(int(rng.integers(1, 9)))]
    batch = batch_of(rows)
    win = ThreadWindows(4, tables()).build(batch)
    # windows are grouped by (tgid, tid); batch order within a thread
    keys = [(rows[r][0], rows[r][1], int(r)) for r in win.rows]
    assert keys == sorted(keys)
    threads = sorted({(r[0], r[1]) for r in rows})
    assert list(zip(win.thread_tgids.tolist(), win.thread_tids.tolist(), strict=True)) == threads
    for k, (_tgid, tid) in enumerate(threads):
        mine = [i for i, r in enumerate(rows) if r[1] == tid]
        start = int(win.thread_starts[k])
        assert win.rows[start:start + len(mine)].tolist() == mine
        assert int(win.thread_last_rows[k]) == mine[-1]
        assert win.tokens[start:start + len(mine)].tolist() == naive_windows([TOKEN[rows[i][2]] for i in mine], 4)


def test_thread_facts_name_the_batch_rows_when_pre_exec_rows_are_left_out() -> None:
    tw = ThreadWindows(3, tables())
    tw.exec(9)
    rows = [(9, 9, "read"), (8, 8, "write"), (9, 9, "execve"), (9, 9, "openat"), (8, 8, "close"), (9, 9, "mmap")]
    win = tw.build(batch_of(rows))
    assert win.rows.tolist() == [1, 4, 3, 5]  # process 8 first; process 9 from after its execve
    assert win.thread_tids.tolist() == [8, 9] and win.thread_last_rows.tolist() == [4, 5]


def test_carried_tokens_are_bounded_when_exits_are_lost() -> None:
    tw = ThreadWindows(4, tables(), max_threads=100)
    for start in range(0, 1000, 250):  # 1000 threads, none of whose exits is ever seen (lost to drops)
        tw.build(batch_of([(tid, tid, "read") for tid in range(start, start + 250) for _ in range(2)]))
        assert len(tw) <= 100
    assert tw.evicted == 900
    # the latest threads still carry their tokens; an evicted one starts from padding again
    kept = tw.build(batch_of([(999, 999, "write")]))
    assert kept.tokens.tolist() == [[PAD, TOKEN["read"], TOKEN["read"], TOKEN["write"]]]
    fresh = tw.build(batch_of([(0, 0, "write")]))
    assert fresh.tokens.tolist() == [[PAD, PAD, PAD, TOKEN["write"]]]


def test_a_thread_first_seen_mid_life_gets_windows_only_once_its_first_window_is_full() -> None:
    rng = np.random.default_rng(31)
    names = VOCAB[3:]
    n = 5
    rows = [(int(t) // 10, int(t), names[int(rng.integers(len(names)))]) for t in rng.integers(10, 40, 400)]
    # threads 10-39; those in 10-19 were seen starting (announced), the others run since before the agent
    tw = ThreadWindows(n, tables(), unseen="mid-life")
    for tid in range(10, 20):
        tw.start(tid)
    cuts = (0, 3, 4, 40, 41, 250, 400)  # batches smaller than n-1 leave the context to the next batch
    parts = [(a, tw.build(batch_of(rows[a:b]))) for a, b in itertools.pairwise(cuts)]
    got = {int(r) + a: tuple(w) for a, p in parts for r, w in zip(p.rows, p.tokens.tolist(), strict=True)}
    want: dict[int, tuple[int, ...]] = {}
    for tid in {r[1] for r in rows}:
        mine = [i for i, r in enumerate(rows) if r[1] == tid]
        windows = naive_windows([TOKEN[rows[i][2]] for i in mine], n)
        skip = 0 if tid < 20 else n - 1  # announced: padded start; mid-life: its first n-1 are context
        want.update({mine[k]: tuple(windows[k]) for k in range(skip, len(mine))})
    assert got == want
    assert tw.context_only == sum(min(n - 1, sum(r[1] == tid for r in rows)) for tid in range(20, 40))
    # thread facts describe only the windows kept: a thread with none in a batch is not listed
    for a, p in parts:
        for k, tid in enumerate(p.thread_tids.tolist()):
            end = int(p.thread_starts[k + 1]) if k + 1 < len(p.thread_tids) else len(p)
            assert end > int(p.thread_starts[k])
            assert {rows[int(r) + a][1] for r in p.rows[int(p.thread_starts[k]):end]} == {tid}
            assert int(p.thread_last_rows[k]) == int(p.rows[end - 1])


def test_an_exec_or_a_fork_makes_a_start_and_an_evicted_thread_returns_mid_life() -> None:
    tw = ThreadWindows(3, tables(), unseen="mid-life", max_threads=2)
    assert len(tw.build(batch_of([(1, 1, "read"), (1, 1, "write")]))) == 0  # mid-life: context only
    assert tw.build(batch_of([(1, 1, "close")])).tokens.tolist() == [[TOKEN["read"], TOKEN["write"], TOKEN["close"]]]
    tw.exec(1)
    assert tw.build(batch_of([(1, 1, "mmap")])).tokens.tolist() == [[PAD, PAD, TOKEN["mmap"]]]
    tw.start(2)
    assert tw.build(batch_of([(2, 2, "futex")])).tokens.tolist() == [[PAD, PAD, TOKEN["futex"]]]
    tw.build(batch_of([(3, 3, "read"), (4, 4, "read")]))  # two more threads push 1 and 2 out
    assert tw.evicted >= 2
    assert len(tw.build(batch_of([(1, 1, "read")]))) == 0  # back without its carry: mid-life again


def test_unseen_mode_is_checked() -> None:
    import pytest

    with pytest.raises(ValueError, match="unseen"):
        ThreadWindows(3, tables(), unseen="sometimes")


def timed_batch(rows: list[tuple[int, int, str]], times: list[int]) -> np.ndarray:
    out = batch_of(rows)
    out["ts"] = times
    return out


def test_a_dead_threads_late_rows_are_not_the_start_of_a_new_thread_with_its_id() -> None:
    """The capture holds rows back up to 250 ms; fork and exit events are not held. A thread id reused at
    once (pid_max 32768 wraps in minutes on a busy host) can see the dead thread's last rows after the fork."""
    old = [(50, 50, "read"), (50, 50, "write"), (50, 50, "close")]
    new = [(50, 50, "openat"), (50, 50, "mmap")]
    tw = ThreadWindows(4, tables())
    tw.start(50, reused_since=100)
    win = tw.build(timed_batch(old + new, [90, 95, 99, 101, 102]))
    assert win.tokens.tolist() == naive_windows([TOKEN["openat"], TOKEN["mmap"]], 4)
    assert tw.dropped == 3
    # no reuse: every row is the new thread's
    fresh = ThreadWindows(4, tables())
    fresh.start(50)
    assert len(fresh.build(timed_batch(old + new, [90, 95, 99, 101, 102]))) == 5


def test_the_detector_drops_late_rows_only_when_the_id_was_just_freed() -> None:
    model = load_model(ROOT / "models" / "sysgram-default.onnx")
    exe = {50: "/usr/bin/true"}
    rows = [(50, 50, "read"), (50, 50, "write"), (50, 50, "close"), (50, 50, "openat"), (50, 50, "mmap")]
    det = AnomalyDetector(model)
    det.on_fork(50, 50, 0)
    det.push(timed_batch(rows[:2], [10, 20]), exe)
    det.on_exit(50, 40)  # its last row (ts 30) is still held back by the capture
    det.on_process_exit(50, 40)
    det.on_fork(50, 50, 45)  # the id, reused at once
    det.push(timed_batch(rows[2:], [30, 50, 60]), exe)
    assert det.stats["pre_exec_rows"] == 1 and det.stats["windows"] == 2 + 2
    # a fork of an id with no exit pending: nothing dropped
    det2 = AnomalyDetector(model)
    det2.on_fork(51, 51, 100)
    det2.push(timed_batch([(51, 51, "read"), (51, 51, "close")], [90, 110]), {51: "/usr/bin/true"})
    assert det2.stats["pre_exec_rows"] == 0 and det2.stats["windows"] == 2


def test_rows_before_an_exec_or_reused_fork_are_dropped_as_one_row_at_a_time_would() -> None:
    """The vectorised drop against its plain definition, on random batches (runs of threads, timed and
    untimed pending threads, 32-bit execve rows)."""
    model = load_model(ROOT / "models" / "sysgram-default.onnx")
    execve = {False: syscall_number("execve"), True: syscall_number("execve", compat=True)}
    rng = np.random.default_rng(11)

    def by_hand(batch: np.ndarray, pending: dict[int, int | None]) -> tuple[np.ndarray, dict[int, int | None]]:
        keep, left = np.ones(len(batch), dtype=bool), dict(pending)
        for tid, until in pending.items():
            mine = [i for i in range(len(batch)) if int(batch["tid"][i]) == tid]
            if not mine:
                continue
            if until is not None:
                for i in mine:
                    keep[i] = keep[i] and int(batch["ts"][i]) > until
                if any(int(batch["ts"][i]) > until for i in mine):
                    del left[tid]
                continue
            del left[tid]
            execs = [i for i in mine if int(batch["nr"][i]) == execve[bool(batch["flags"][i] & FLAG_COMPAT)]]
            for i in mine:
                keep[i] = keep[i] and not (execs and i <= execs[-1])
        return keep, left

    for _ in range(500):
        size = int(rng.integers(1, 200))
        batch = np.zeros(size, dtype=SYSCALL_DTYPE)
        batch["tid"] = batch["tgid"] = np.repeat(rng.integers(1, 12, size=size), rng.integers(1, 6, size=size))[:size]
        batch["ts"] = np.sort(rng.integers(0, 1000, size=size))
        batch["flags"] = np.where(rng.random(size) < 0.2, FLAG_COMPAT, 0)
        batch["nr"] = np.where(rng.random(size) < 0.1, [execve[bool(f)] for f in batch["flags"]], 0)
        pending = {int(t): (None if rng.random() < 0.25 else int(rng.integers(0, 1000)))
                   for t in rng.choice(np.arange(1, 15), size=int(rng.integers(1, 8)), replace=False)}
        windows = ThreadWindows(model.n, model.nr_tokens)
        windows._earlier_rows = dict(pending)
        kept = windows._drop_earlier_rows(batch)
        keep, left = by_hand(batch, pending)
        assert np.array_equal(np.arange(size) if kept is None else kept, np.flatnonzero(keep))
        assert windows._earlier_rows == left

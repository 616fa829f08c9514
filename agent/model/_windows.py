"""Sliding windows of syscall tokens per thread, vectorised over whole batches.

A thread's window ending at syscall k holds its syscalls k-n+1..k. A thread seen starting (its fork or
exec) has its first windows padded on the left with PAD (so a short-lived thread is still scored). A thread
first seen mid-life (running before the agent started, or its fork lost) has no start to pad: its first n-1
syscalls are context only, as in training. Each thread's last n-1 tokens carry over to the next batch. A batch's windows are not materialised: they are views into one token buffer, hashed
straight from it; only the windows that must be scored or shown are copied out (:meth:`Windows.take`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from agent.capture.names import syscall_number
from agent.events import FLAG_COMPAT
from agent.model._sidecar import PAD, UNK

# A window's key is a polynomial in a secret odd base mod 2^64: over a token buffer every window's value
# comes from one prefix sum (a rolling hash, ~5 array passes instead of 2n), and a base drawn at start-up
# means nobody can plan a malicious window whose key collides with a benign cached one.
_KEY_BASE = int.from_bytes(os.urandom(8), "little") | 1
_KEY_BASE_INV = pow(_KEY_BASE, -1, 1 << 64)
_PROGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xFF51AFD7ED558CCD)
_COMPAT_BIT = 16  # token tables are indexed by nr | compat << 16 (nr is 16 bits)


def _power_series(base: int, size: int) -> np.ndarray:
    out = np.full(size, base, dtype=np.uint64)
    out[0] = 1
    np.multiply.accumulate(out, out=out)  # wraps mod 2^64, as wanted
    return out


class _Powers:
    """B^j and B^-j mod 2^64 for j < size, grown on demand (bounded by the largest buffer hashed)."""

    def __init__(self) -> None:
        self._both = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))  # swapped whole: thread-safe

    def at_least(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        both = self._both
        if len(both[0]) < size:
            size = max(size, 2 * len(both[0]), 1024)
            both = self._both = (_power_series(_KEY_BASE, size), _power_series(_KEY_BASE_INV, size))
        return both


_POWERS = _Powers()


def _finish(h: np.ndarray, programs: np.ndarray) -> np.ndarray:
    """Mix in the program, then multiply and fold the high half down (the cache indexes by the low bits)."""
    h ^= np.asarray(programs).astype(np.uint64, copy=False) * _PROGRAM_MIX
    h *= _MIX
    h ^= h >> np.uint64(32)
    return h


def window_keys(tokens: np.ndarray, programs: np.ndarray) -> np.ndarray:
    """A 64-bit key per (program, window [n] of tokens) (collisions are negligible at cache sizes)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if not len(tokens):
        return np.zeros(0, dtype=np.uint64)
    n = tokens.shape[1]
    up, _ = _POWERS.at_least(n)
    return _finish(tokens.view(np.uint64) @ up[n - 1::-1], programs)


def run_heads(values: np.ndarray) -> np.ndarray:
    """Indices where a run of equal consecutive values begins (np.r_ costs ~30 us a call: not here)."""
    heads = np.empty(len(values), dtype=bool)
    if len(values):
        heads[0] = True
        np.not_equal(values[1:], values[:-1], out=heads[1:])
    return np.flatnonzero(heads)


def run_indices(firsts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices of the runs that begin at ``firsts`` and are ``lengths`` long, run after run, in one pass."""
    offsets = np.cumsum(lengths) - lengths  # where each run begins in the output
    return np.repeat(firsts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _none() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)  # arrays inside: identity, not element-wise, equality
class Windows:
    """Windows of one batch, grouped by process then thread (tgid, tid order; batch order within a thread).

    Window i is ``buffer[starts[i]:starts[i] + n]``. Per thread (in window order): where its windows begin,
    its tgid and tid, and the batch row of its last window (so that per-process figures need no per-window
    gathers).
    """

    buffer: np.ndarray  # int64: each thread's carried n-1 tokens, then its tokens from this batch
    starts: np.ndarray  # int64 [N]: where each window begins in ``buffer``
    rows: np.ndarray  # int64 [N]: the batch row each window ends at
    unknown: int  # syscalls in the batch outside the vocabulary
    n: int
    thread_starts: np.ndarray = field(default_factory=_none)  # int64 [T]: index of each thread's first window
    thread_tgids: np.ndarray = field(default_factory=_none)
    thread_tids: np.ndarray = field(default_factory=_none)
    thread_last_rows: np.ndarray = field(default_factory=_none)  # int64 [T]: batch row of its last window

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, index: np.ndarray | slice) -> np.ndarray:
        """The windows at ``index`` as an int64 [k, n] array (a copy)."""
        return sliding_window_view(self.buffer, self.n)[self.starts[index]]

    @property
    def tokens(self) -> np.ndarray:
        """Every window, int64 [N, n] (materialises them all: tests and small batches)."""
        return self.take(slice(None))

    def keys(self, programs: np.ndarray) -> np.ndarray:
        """``window_keys(self.tokens, programs)`` without building the windows: one prefix sum over the
        buffer gives every window's polynomial, then the batch's windows are picked out."""
        if not len(self.starts):
            return np.zeros(0, dtype=np.uint64)
        n, size = self.n, len(self.buffer)
        up, down = _POWERS.at_least(size + 1)
        prefix = np.empty(size + 1, dtype=np.uint64)
        prefix[0] = 0
        np.cumsum(self.buffer.view(np.uint64) * down[:size], out=prefix[1:])
        every = prefix[n:] - prefix[:-n]  # window k's terms, each scaled by B^-k ...
        every *= up[n - 1:size]  # ... back to sum(token_i * B^(n-1-i))
        return _finish(every[self.starts], programs)


def token_table(nr_tokens: dict[bool, np.ndarray]) -> np.ndarray:
    """One int64 lookup table, nr | compat << 16 -> token; numbers outside the model's tables -> UNK."""
    table = np.full(2 << _COMPAT_BIT, UNK, dtype=np.int64)
    for compat, tokens in nr_tokens.items():
        base = int(compat) << _COMPAT_BIT
        count = min(len(tokens), 1 << _COMPAT_BIT)
        table[base:base + count] = tokens[:count]
    return table


def _tokens(batch: np.ndarray, table: np.ndarray) -> np.ndarray:
    index = batch["nr"].astype(np.intp)
    compat = batch["flags"] & FLAG_COMPAT
    if compat.any():
        index |= compat.astype(np.intp) << _COMPAT_BIT
    return table[index]


def tokens_of_batch(batch: np.ndarray, nr_tokens: dict[bool, np.ndarray]) -> np.ndarray:
    """Syscall rows -> token ids; compat rows through the i386 table; numbers out of range -> UNK."""
    return _tokens(batch, token_table(nr_tokens))


def _segments(tokens: np.ndarray, lengths: np.ndarray, carry: np.ndarray, n: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated segments (each preceded by its n-1 carried tokens): the buffer, where each window starts
    in it, and each segment's new carry."""
    m = n - 1
    groups = len(lengths)
    seg = lengths + m
    seg_start = np.zeros(groups, dtype=np.int64)
    np.cumsum(seg[:-1], out=seg_start[1:])
    buf = np.empty(int(seg.sum()), dtype=np.int64)
    buf[(seg_start[:, None] + np.arange(m)).ravel()] = carry.ravel()
    # token k of the batch sits m + (its group's index) * m places further than in a plain concatenation
    starts = np.arange(len(tokens), dtype=np.int64) + np.repeat(np.arange(groups, dtype=np.int64) * m, lengths)
    buf[starts + m] = tokens
    ends = seg_start + seg
    new_carry = buf[ends[:, None] - m + np.arange(m)]
    return buf, starts, new_carry


def windows_of_trace(tokens: np.ndarray, n: int) -> np.ndarray:
    """All windows [len, n] of one thread's token sequence, PAD before its start (training/eval)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if not len(tokens):
        return np.zeros((0, n), dtype=np.int64)
    carry = np.full((1, n - 1), PAD, dtype=np.int64)
    buf, starts, _ = _segments(tokens, np.array([len(tokens)]), carry, n)
    return sliding_window_view(buf, n)[starts]


_MAX_EARLIER_PENDING = 4096
_MAX_STARTING = 65536


def _exec_numbers(compat: bool) -> np.ndarray:
    return np.array([nr for nr in (syscall_number("execve", compat), syscall_number("execveat", compat)) if nr >= 0],
                    dtype=np.int64)


class ThreadWindows:
    """Per-thread window state across batches.

    ``unseen``: what a thread with no carried tokens that was not announced by :meth:`start` or :meth:`exec`
    is taken to be: ``"start"`` (padded, as a new thread) or ``"mid-life"`` (its first n-1 syscalls are
    context only: windows padded as a process start would look unlike anything the model knows, and the
    process would be judged on them). The detector uses ``"mid-life"``; it announces the threads it sees
    start.

    After :meth:`exec` at time ``ts``, the thread's rows stamped at or before ``ts`` are still the old
    program's (the capture hands the exec event on at once and holds syscall rows back to order them, so they
    can arrive in any number of batches after the event): they are left out until the first row after the
    exec, as training leaves them out of the new program's traces (which start after the exec). Without a
    time, the rows up to the last execve in the next batch holding the thread's rows are left out.
    """

    def __init__(self, n: int, nr_tokens: dict[bool, np.ndarray], max_threads: int = 65536,
                 unseen: str = "start") -> None:
        if unseen not in ("start", "mid-life"):
            raise ValueError(f"unseen: expected 'start' or 'mid-life', got {unseen!r}")
        self.n = n
        self.unseen_is_mid_life = unseen == "mid-life"
        self.max_threads = max_threads  # threads whose exit was lost (drops) must not grow memory for ever
        self.evicted = 0
        self.nr_tokens = nr_tokens
        self._table = token_table(nr_tokens)
        # Each thread's carried n-1 tokens as bytes of its own (uint16 when the tokens fit): a row view of the
        # batch's carry array would keep that whole array alive for as long as any one of its threads lives.
        self._carry_dtype = np.uint16 if int(self._table.max()) < (1 << 16) - 1 else np.int64  # max: the context token
        self._carry_width = (n - 1) * np.dtype(self._carry_dtype).itemsize
        self._pad = np.full(n - 1, PAD, dtype=self._carry_dtype).tobytes()
        # a mid-life thread's carry until n-1 real syscalls fill it: no window begins on this token
        self._context_token = int(np.iinfo(self._carry_dtype).max)
        self._unseen = np.full(n - 1, self._context_token, dtype=self._carry_dtype).tobytes() \
            if self.unseen_is_mid_life else self._pad
        self._carry: dict[int, bytes] = {}
        self._starting: dict[int, None] = {}  # announced threads whose first rows have not come yet (oldest first)
        # tid -> the time up to which its rows are an earlier program's (its exec; None: unknown, found by
        # the execve row) or an earlier thread's (a fork reusing the id); insertion-ordered: oldest go first
        self._earlier_rows: dict[int, int | None] = {}
        self._exec_nrs = {compat: _exec_numbers(compat) for compat in (False, True)}
        self.dropped = 0  # rows left out as the program's before an exec, or a dead thread's whose id was reused
        self.context_only = 0  # syscalls of threads first seen mid-life that only filled their first window

    def __len__(self) -> int:
        return len(self._carry)

    def _drop_earlier_rows(self, batch: np.ndarray) -> np.ndarray | None:
        """Rows to keep when threads with an earlier program's or thread's rows pending (an exec, or a fork
        that reused the id) have rows in the batch (None: keep all). Vectorised: a host starting hundreds
        of programs a second has that many pending in every batch."""
        pending = sorted(self._earlier_rows.items())
        if not pending:
            return None
        pending_tids = np.array([tid for tid, _ in pending], dtype=np.int64)
        # -1: no time known (an exec without one, rare): found by its execve row below
        untils = np.array([-1 if until is None else until for _, until in pending], dtype=np.int64)
        tids = batch["tid"].astype(np.int64, copy=False)
        # rows come in runs of one thread: look the runs up, then expand the few that are pending
        heads = run_heads(tids)
        at = np.minimum(np.searchsorted(pending_tids, tids[heads]), len(pending_tids) - 1)
        hit = np.flatnonzero(pending_tids[at] == tids[heads])
        if not len(hit):
            return None
        lengths = np.diff(np.append(heads, len(tids)))[hit]
        rows = run_indices(heads[hit], lengths)
        which = np.repeat(at[hit], lengths)
        keep = np.ones(len(batch), dtype=bool)
        until = untils[which]
        timed = until >= 0
        # rows stamped up to the exec (or fork) are the earlier program's (or thread's) ...
        before = timed & (batch["ts"][rows].astype(np.int64) <= until)
        keep[rows[before]] = False
        # ... until the new program's (or thread's) first row is in: then nothing more is pending for it
        done = np.bincount(which[timed & ~before], minlength=len(pending_tids)) > 0
        untimed = np.bincount(which[~timed], minlength=len(pending_tids)) > 0
        for tid in pending_tids[done | untimed].tolist():
            del self._earlier_rows[tid]
        if untimed.any():  # the rows up to the thread's last execve row in this batch
            compat = (batch["flags"] & FLAG_COMPAT).astype(bool)
            is_exec = np.where(compat, np.isin(batch["nr"], self._exec_nrs[True]),
                               np.isin(batch["nr"], self._exec_nrs[False]))
            for tid in pending_tids[untimed].tolist():
                thread = tids == tid
                execs = np.flatnonzero(is_exec & thread)
                if len(execs):
                    keep[thread & (np.arange(len(batch)) <= execs[-1])] = False
        return None if keep.all() else np.flatnonzero(keep)

    def build(self, batch: np.ndarray) -> Windows:
        kept = self._drop_earlier_rows(batch) if self._earlier_rows and len(batch) else None
        tokens = _tokens(batch, self._table)
        tid, tgid = batch["tid"], batch["tgid"]
        if kept is not None:  # the three columns used, not the whole record (a copy of every field)
            self.dropped += len(batch) - len(kept)
            tokens, tid, tgid = tokens[kept], tid[kept], tgid[kept]
        if not len(tokens):
            return Windows(np.zeros(self.n, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0, self.n)
        # Rows come in runs of one thread (the capture hands over per-CPU runs): order the runs, not the
        # rows, into process-major (tgid, tid) order, so that the detector can reduce per process.
        size = len(tokens)
        boundary = np.empty(size, dtype=bool)
        boundary[0] = True
        np.not_equal(tid[1:], tid[:-1], out=boundary[1:])
        boundary[1:] |= tgid[1:] != tgid[:-1]
        run_first = np.flatnonzero(boundary)
        run_len = np.diff(np.append(run_first, size))
        run_key = (tgid[run_first].astype(np.uint64) << np.uint64(32)) | tid[run_first].astype(np.uint64)
        run_order = np.argsort(run_key, kind="stable")
        order: np.ndarray | None = None
        if (run_order[1:] < run_order[:-1]).any():
            run_first, run_len, run_key = run_first[run_order], run_len[run_order], run_key[run_order]
            order = run_indices(run_first, run_len)
            tokens = tokens[order]
        thread_run = run_heads(run_key)  # the first run of each thread
        lengths = np.add.reduceat(run_len, thread_run)
        thread_key = run_key[thread_run]
        thread_tids = (thread_key & np.uint64(0xFFFFFFFF)).astype(np.int64)
        thread_ids = thread_tids.tolist()
        carried = self._carry
        carry = np.frombuffer(b"".join([carried.get(t) or self._first_carry(t) for t in thread_ids]),
                              dtype=self._carry_dtype).reshape(len(thread_ids), self.n - 1)
        buf, starts, new_carry = _segments(tokens, lengths, carry, self.n)
        raw, w = new_carry.astype(self._carry_dtype).tobytes(), self._carry_width
        self._carry.update(zip(thread_ids, [raw[i * w:(i + 1) * w] for i in range(len(thread_ids))], strict=True))
        if len(self._carry) > self.max_threads:  # the first seen go first: they return as unseen threads
            for old in list(islice(self._carry, len(self._carry) - self.max_threads)):
                del self._carry[old]
                self.evicted += 1
        rows = np.arange(size, dtype=np.int64) if order is None else order
        thread_starts = np.cumsum(lengths) - lengths
        last_rows = rows[thread_starts + lengths - 1]
        if kept is not None:  # rows of the batch as given, not of the kept part
            rows, last_rows = kept[rows], kept[last_rows]
        thread_tgids = (thread_key >> np.uint64(32)).astype(np.int64)
        unknown = int(np.count_nonzero(tokens == UNK))
        if self.unseen_is_mid_life and len(carry) and (carry[:, 0] == self._context_token).any():
            # context tokens lead a mid-life thread's stream: the windows that begin on one are left out,
            # so each such thread keeps a suffix of its windows (maybe none)
            keep = buf[starts] != self._context_token
            self.context_only += int(len(keep) - np.count_nonzero(keep))
            counts = np.add.reduceat(keep.astype(np.int64), thread_starts)
            starts, rows = starts[keep], rows[keep]
            live = counts > 0
            counts = counts[live]
            thread_starts = np.cumsum(counts) - counts
            thread_tgids, thread_tids, last_rows = thread_tgids[live], thread_tids[live], last_rows[live]
        return Windows(buf, starts, rows, unknown, self.n,
                       thread_starts=thread_starts, thread_tgids=thread_tgids,
                       thread_tids=thread_tids, thread_last_rows=last_rows)

    def _first_carry(self, tid: int) -> bytes:
        """What a thread with nothing carried starts from: padding if it was announced, else context."""
        if tid in self._starting:  # announced: its first rows are its start
            del self._starting[tid]
            return self._pad
        return self._unseen

    def start(self, tid: int, reused_since: int | None = None) -> None:
        """A new thread (its fork was seen): its first rows are its start, padded. Whatever an earlier
        thread with this id left is not its own: with ``reused_since`` (the fork's time, given when an
        earlier thread with this id ended moments ago), its rows up to then are dropped as they come in
        (the capture holds rows back for up to 250 ms, so a dead thread's last rows can follow the fork)."""
        self.forget(tid)
        self._announce(tid)
        if reused_since is not None:
            self._expect_earlier_rows(tid, reused_since)

    def _expect_earlier_rows(self, tid: int, ts: int | None) -> None:
        self._earlier_rows.pop(tid, None)  # re-inserted: the newest goes last
        self._earlier_rows[tid] = ts
        if len(self._earlier_rows) > _MAX_EARLIER_PENDING:  # exits lost to drops must not make every batch slower
            del self._earlier_rows[next(iter(self._earlier_rows))]

    def _announce(self, tid: int) -> None:
        self._starting.pop(tid, 0)
        self._starting[tid] = None
        if len(self._starting) > _MAX_STARTING:  # forks whose thread never made a syscall we saw
            del self._starting[next(iter(self._starting))]

    def reset(self, tid: int) -> None:
        """Forget this thread's carried tokens: it starts again as an unseen thread."""
        self._carry.pop(tid, None)

    def exec(self, tid: int, ts: int | None = None) -> None:
        """The thread runs a new program since ``ts``: fresh windows, and its rows from before are skipped."""
        self._carry.pop(tid, None)
        self._announce(tid)  # the new program's first row is its start
        self._expect_earlier_rows(tid, ts)

    def forget(self, tid: int) -> None:
        self._carry.pop(tid, None)
        self._earlier_rows.pop(tid, None)
        self._starting.pop(tid, None)

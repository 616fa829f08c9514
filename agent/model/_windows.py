"""Sliding windows of syscall tokens per thread, vectorised over whole batches.

A thread's window ending at syscall k holds its syscalls k-n+1..k; a thread's first windows are padded
on the left with PAD (so a short-lived thread is still scored). Each thread's last n-1 tokens carry over
to the next batch. A batch's windows are not materialised: they are views into one token buffer, hashed
straight from it; only the windows that must be scored or shown are copied out (:meth:`Windows.take`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from agent.capture.names import syscall_number
from agent.events import FLAG_COMPAT
from agent.model._sidecar import PAD, UNK

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0xFF51AFD7ED558CCD)


_PROGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)


def _fnv(columns: list[np.ndarray]) -> np.ndarray:
    """FNV-1a over token columns (int64 arrays of equal length), one hash per row."""
    h = np.full(len(columns[0]), _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in columns:
            h ^= col.view(np.uint64)  # tokens are small non-negative ints: reinterpreting is free
            h *= _FNV_PRIME
    return h


def _finish(h: np.ndarray, programs: np.ndarray) -> np.ndarray:
    """Mix in the program, then a murmur-style finaliser (so that the low bits can index a hash table)."""
    with np.errstate(over="ignore"):
        h = h ^ (programs.astype(np.uint64) * _PROGRAM_MIX)
        h ^= h >> np.uint64(33)
        h *= _MIX
        h ^= h >> np.uint64(33)
    return h


def window_keys(tokens: np.ndarray, programs: np.ndarray) -> np.ndarray:
    """A 64-bit hash per (program, window [n] of tokens), vectorised (collisions are negligible at cache sizes)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if not len(tokens):
        return np.zeros(0, dtype=np.uint64)
    return _finish(_fnv([np.ascontiguousarray(tokens[:, j]) for j in range(tokens.shape[1])]),
                   np.asarray(programs))


@dataclass(frozen=True, eq=False)  # arrays inside: identity, not element-wise, equality
class Windows:
    """Windows of one batch, grouped by process then thread (tgid, tid order; batch order within a thread).

    Window i is ``buffer[starts[i]:starts[i] + n]``.
    """

    buffer: np.ndarray  # int64: each thread's carried n-1 tokens, then its tokens from this batch
    starts: np.ndarray  # int64 [N]: where each window begins in ``buffer``
    rows: np.ndarray  # int64 [N]: the batch row each window ends at
    unknown: int  # syscalls in the batch outside the vocabulary
    n: int

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
        """``window_keys(self.tokens, programs)`` without building the windows: the hash of every window of
        the buffer comes from n contiguous slices (no gathers), then the batch's windows are picked out."""
        if not len(self.starts):
            return np.zeros(0, dtype=np.uint64)
        span = len(self.buffer) - self.n + 1
        every = _fnv([self.buffer[j:j + span] for j in range(self.n)])
        return _finish(every[self.starts], programs)


def tokens_of_batch(batch: np.ndarray, nr_tokens: dict[bool, np.ndarray]) -> np.ndarray:
    """Syscall rows -> token ids; compat rows through the i386 table; numbers out of range -> UNK."""
    native, compat = nr_tokens[False], nr_tokens[True]
    nr = batch["nr"].astype(np.int64)
    inside = nr < len(native)
    nr_safe = np.where(inside, nr, 0)
    tok = np.where(batch["flags"] & FLAG_COMPAT, compat[nr_safe], native[nr_safe])
    tok[~inside] = UNK
    return tok


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


_MAX_EXEC_PENDING = 4096


def _exec_numbers(compat: bool) -> np.ndarray:
    return np.array([nr for nr in (syscall_number("execve", compat), syscall_number("execveat", compat)) if nr >= 0],
                    dtype=np.int64)


class ThreadWindows:
    """Per-thread window state across batches.

    After :meth:`exec`, the thread's rows up to and including its last execve in the next batch that holds
    its rows are still the old program's (a batch can span the exec): they are left out, as training leaves
    them out of the new program's traces (which start after the exec).
    """

    def __init__(self, n: int, nr_tokens: dict[bool, np.ndarray]) -> None:
        self.n = n
        self.nr_tokens = nr_tokens
        self._pad = np.full(n - 1, PAD, dtype=np.int64)
        self._carry: dict[int, np.ndarray] = {}
        self._exec_pending: dict[int, None] = {}  # an ordered set: the oldest go first when it is full
        self._exec_nrs = {compat: _exec_numbers(compat) for compat in (False, True)}
        self.dropped = 0  # rows left out as belonging to the program before an exec

    def __len__(self) -> int:
        return len(self._carry)

    def _after_exec(self, batch: np.ndarray) -> np.ndarray | None:
        """Rows to keep when threads that exec'ed have rows in the batch (None: keep all)."""
        pending = np.fromiter(self._exec_pending, dtype=np.int64, count=len(self._exec_pending))
        mine = np.isin(batch["tid"], pending)
        if not mine.any():
            return None
        keep = np.ones(len(batch), dtype=bool)
        compat = (batch["flags"] & FLAG_COMPAT).astype(bool)
        is_exec = np.where(compat, np.isin(batch["nr"], self._exec_nrs[True]),
                           np.isin(batch["nr"], self._exec_nrs[False]))
        for tid in np.unique(batch["tid"][mine]).tolist():
            self._exec_pending.pop(tid, None)
            execs = np.flatnonzero(is_exec & (batch["tid"] == tid))
            if len(execs):
                keep[(batch["tid"] == tid) & (np.arange(len(batch)) <= execs[-1])] = False
        return None if keep.all() else np.flatnonzero(keep)

    def build(self, batch: np.ndarray) -> Windows:
        kept = self._after_exec(batch) if self._exec_pending and len(batch) else None
        if kept is not None:
            self.dropped += len(batch) - len(kept)
            rows, batch = kept, batch[kept]
        if not len(batch):
            return Windows(np.zeros(self.n, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0, self.n)
        tokens = tokens_of_batch(batch, self.nr_tokens)
        # process-major order, so that the detector can aggregate per process with reduceat
        thread_key = (batch["tgid"].astype(np.uint64) << np.uint64(32)) | batch["tid"].astype(np.uint64)
        order = np.argsort(thread_key, kind="stable")
        sorted_keys = thread_key[order]
        first = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        lengths = np.diff(np.r_[first, len(order)])
        thread_ids = batch["tid"][order[first]].tolist()
        carry = np.stack([self._carry.get(t, self._pad) for t in thread_ids])
        buf, starts, new_carry = _segments(tokens[order], lengths, carry, self.n)
        self._carry.update(zip(thread_ids, new_carry, strict=True))
        batch_rows = order.astype(np.int64) if kept is None else rows[order]
        return Windows(buf, starts, batch_rows, int((tokens == UNK).sum()), self.n)

    def reset(self, tid: int) -> None:
        """Start this thread's windows from PAD again."""
        self._carry.pop(tid, None)

    def exec(self, tid: int) -> None:
        """The thread runs a new program: fresh windows, and its pre-exec rows in the next batch are skipped."""
        self._carry.pop(tid, None)
        self._exec_pending[tid] = None
        if len(self._exec_pending) > _MAX_EXEC_PENDING:  # exits lost to drops must not make every batch slower
            del self._exec_pending[next(iter(self._exec_pending))]

    def forget(self, tid: int) -> None:
        self._carry.pop(tid, None)
        self._exec_pending.pop(tid, None)

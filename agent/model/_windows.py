"""Sliding windows of syscall tokens per thread, vectorised over whole batches.

A thread's window ending at syscall k holds its syscalls k-n+1..k; a thread's first windows are padded
on the left with PAD (so a short-lived thread is still scored). Each thread's last n-1 tokens carry over
to the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from agent.events import FLAG_COMPAT
from agent.model._sidecar import PAD, UNK


@dataclass(frozen=True)
class Windows:
    """Windows of one batch, grouped by thread (threads in tid order, syscalls in batch order within)."""

    tokens: np.ndarray  # int64 [N, n]
    rows: np.ndarray  # int64 [N]: the batch row each window ends at
    unknown: int  # syscalls in the batch outside the vocabulary


def tokens_of_batch(batch: np.ndarray, nr_tokens: dict[bool, np.ndarray]) -> np.ndarray:
    """Syscall rows -> token ids; compat rows through the i386 table; numbers out of range -> UNK."""
    native, compat = nr_tokens[False], nr_tokens[True]
    nr = batch["nr"].astype(np.int64)
    inside = nr < len(native)
    nr_safe = np.where(inside, nr, 0)
    tok = np.where(batch["flags"] & FLAG_COMPAT, compat[nr_safe], native[nr_safe])
    tok[~inside] = UNK
    return tok


def _windows_in_segments(tokens: np.ndarray, lengths: np.ndarray, carry: np.ndarray, n: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Windows of concatenated segments (each preceded by its n-1 carried tokens) and each segment's new carry."""
    m = n - 1
    groups = len(lengths)
    seg = lengths + m
    seg_start = np.zeros(groups, dtype=np.int64)
    np.cumsum(seg[:-1], out=seg_start[1:])
    buf = np.empty(int(seg.sum()), dtype=np.int64)
    buf[(seg_start[:, None] + np.arange(m)).ravel()] = carry.ravel()
    token_start = np.zeros(groups, dtype=np.int64)
    np.cumsum(lengths[:-1], out=token_start[1:])
    group_of = np.repeat(np.arange(groups), lengths)
    pos = seg_start[group_of] + m + (np.arange(len(tokens)) - token_start[group_of])
    buf[pos] = tokens
    windows = sliding_window_view(buf, n)[pos - m]
    ends = seg_start + seg
    new_carry = buf[ends[:, None] - m + np.arange(m)]
    return windows, new_carry


def windows_of_trace(tokens: np.ndarray, n: int) -> np.ndarray:
    """All windows [len, n] of one thread's token sequence, PAD before its start (training/eval)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if not len(tokens):
        return np.zeros((0, n), dtype=np.int64)
    carry = np.full((1, n - 1), PAD, dtype=np.int64)
    windows, _ = _windows_in_segments(tokens, np.array([len(tokens)]), carry, n)
    return windows


class ThreadWindows:
    """Per-thread window state across batches."""

    def __init__(self, n: int, nr_tokens: dict[bool, np.ndarray]) -> None:
        self.n = n
        self.nr_tokens = nr_tokens
        self._pad = np.full(n - 1, PAD, dtype=np.int64)
        self._carry: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._carry)

    def build(self, batch: np.ndarray) -> Windows:
        if not len(batch):
            return Windows(np.zeros((0, self.n), np.int64), np.zeros(0, np.int64), 0)
        tokens = tokens_of_batch(batch, self.nr_tokens)
        order = np.argsort(batch["tid"], kind="stable")
        tids = batch["tid"][order]
        starts = np.flatnonzero(np.r_[True, tids[1:] != tids[:-1]])
        lengths = np.diff(np.r_[starts, len(tids)])
        thread_ids = tids[starts].tolist()
        carry = np.stack([self._carry.get(t, self._pad) for t in thread_ids])
        windows, new_carry = _windows_in_segments(tokens[order], lengths, carry, self.n)
        self._carry.update(zip(thread_ids, new_carry, strict=True))
        return Windows(windows, order.astype(np.int64), int((tokens == UNK).sum()))

    def reset(self, tid: int) -> None:
        """A new program in this thread: its next windows start from PAD again."""
        self._carry.pop(tid, None)

    forget = reset

"""Compact ring-buffer batches -> syscall rows in per-thread order, with times.

The kernel stamps only some records (see bpf/sysgram.h): the records from one stamp to the next are one
thread's contiguous run on one CPU, and the stamp is that run's exact start. A thread's runs never overlap
in time, so ordering runs by their start orders every thread's syscalls exactly, even when it migrates
between CPUs. Times inside a run are interpolated between its stamp and the next one (or the batch's send
time, at most TAIL_NS_PER_ROW a row where the next stamp is another thread's or the batch's end).

Batches from different CPUs arrive in the order they were sent, not in the order their syscalls ran, so
rows are held back until every CPU has sent a batch ending after them (the watermark); the agent's ticker
makes each CPU send a batch, empty or not, every flush interval. A CPU that stops reporting cannot hold
rows back for longer than ``max_hold_ns``.
"""

from __future__ import annotations

import numpy as np

from agent.capture import _layout as L
from agent.capture.names import syscall_number
from agent.events import SYSCALL_DTYPE

_FULL = np.dtype([("h", L.BATCH_HEADER), ("recs", L.SC_REC, (L.BATCH_SIZE,))])
# A row at the end of a run whose true end is unknown is dated at most this long after the row before it:
# a syscall and the user code up to the next one in one uninterrupted run (a blocking syscall switches
# the thread out, which ends the run) rarely take longer.
TAIL_NS_PER_ROW = 1_000
_EXEC_NRS = np.array([syscall_number("execve"), syscall_number("execveat")])  # stamped by the kernel
_COMPAT_EXEC_NRS = np.array([syscall_number("execve", compat=True), syscall_number("execveat", compat=True)])


# numpy moves structured rows field by field (~30-75 ns a row); as opaque bytes it is 5-10x faster.
def _take(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    return rows.view(f"V{rows.dtype.itemsize}")[index].view(rows.dtype)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([p.view(f"V{p.dtype.itemsize}") for p in parts]).view(parts[0].dtype)


def _parse(raw_batches: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """-> (headers, records) with records grouped by batch, in arrival order."""
    headers: list[np.ndarray] = []
    records: list[np.ndarray] = []
    full = [raw for raw in raw_batches if len(raw) == _FULL.itemsize]
    if len(full) == len(raw_batches):  # the common case under load: one vectorised decode
        if not full:
            return np.zeros(0, L.BATCH_HEADER), np.zeros(0, L.SC_REC)
        data = np.frombuffer(b"".join(full), dtype=np.uint8).reshape(len(full), _FULL.itemsize)
        hdr = data[:, : L.BATCH_HEADER.itemsize].copy().view(L.BATCH_HEADER).reshape(-1)
        if (hdr["count"] == L.BATCH_SIZE).all():
            return hdr, data[:, L.BATCH_HEADER.itemsize :].copy().reshape(-1).view(L.SC_REC)
    for raw in raw_batches:  # arrival order matters: partial and full batches interleave
        header = np.frombuffer(raw, dtype=L.BATCH_HEADER, count=1)
        room = (len(raw) - L.BATCH_HEADER.itemsize) // L.SC_REC.itemsize
        count = min(int(header["count"][0]), room, L.BATCH_SIZE)
        headers.append(header)
        records.append(np.frombuffer(raw, dtype=L.SC_REC, count=count, offset=L.BATCH_HEADER.itemsize))
    hdr = np.concatenate(headers)
    hdr["count"] = [len(r) for r in records]
    return hdr, _concat(records) if records else np.zeros(0, L.SC_REC)


def _is_exec(recs: np.ndarray) -> np.ndarray:
    """Which records are an execve/execveat, native or i386 (the kernel stamps both)."""
    compat = (recs["flags"] & L.REC_COMPAT) != 0
    return np.where(compat, np.isin(recs["nr"], _COMPAT_EXEC_NRS), np.isin(recs["nr"], _EXEC_NRS))


def decode(raw_batches: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (rows in run order, each row's run-start key, headers). Rows are SYSCALL_DTYPE.

    Worked at the level of runs (one thread, one CPU, from one stamp to the next: up to STAMP_EVERY rows)
    wherever possible: there are far fewer runs than rows.
    """
    headers, recs = _parse(raw_batches)
    n = len(recs)
    rows = np.empty(n, dtype=SYSCALL_DTYPE)
    if n == 0:
        return rows, np.zeros(0, np.uint64), headers
    counts = headers["count"].astype(np.int64)
    batch_end = np.cumsum(counts)
    first = batch_end - counts
    stamped = (recs["flags"] & L.REC_STAMPED) != 0
    stamped[first[counts > 0]] = True  # the kernel always stamps a batch's first record
    starts = np.flatnonzero(stamped)  # runs never cross a batch: every batch starts with a stamp
    ends = np.r_[starts[1:], n]
    lengths = ends - starts
    batch = np.searchsorted(batch_end, starts, side="right")
    keys = headers["base_ts"][batch] + recs["ts_delta"][starts].astype(np.uint64)
    # A run ends at the next stamp, or at the batch's send time when it is the batch's last run.
    last_of_batch = ends == batch_end[batch]
    next_key = np.r_[keys[1:], keys[-1:]]
    run_end_ts = np.where(last_of_batch, headers["end_ts"][batch], next_key)
    slope = np.maximum(run_end_ts.astype(np.int64) - keys.astype(np.int64), 0) / lengths
    # The next stamp bounds a run exactly only when the same thread went straight on: the kernel stamped
    # its next record for the batch position (every STAMP_EVERY-th) or because it is an execve. Otherwise
    # the thread left the CPU somewhere before the next stamp, maybe long before (it slept, the CPU idled,
    # other threads ran, or it came back to this CPU later): spread over that gap, a fork child's last
    # rows before its execve were dated after the exec and taken for the new program's. Such a tail gets
    # at most TAIL_NS_PER_ROW a row.
    run_tid = recs["tid"][starts].astype(np.int64)
    nxt = np.minimum(ends, n - 1)  # the next run's first record (meaningless for a batch's last run)
    went_on = (
        ~last_of_batch
        & (np.r_[run_tid[1:], -1] == run_tid)
        & (((nxt - first[batch]) % L.STAMP_EVERY == 0) | _is_exec(recs[nxt]))
    )
    slope = np.where(went_on, slope, np.minimum(slope, TAIL_NS_PER_ROW))
    order = np.argsort(keys, kind="stable")
    if (order != np.arange(len(order))).any():
        starts, lengths, keys, slope = starts[order], lengths[order], keys[order], slope[order]
        out_first = np.cumsum(lengths) - lengths
        perm = np.arange(n) + np.repeat(starts - out_first, lengths)
        recs = _take(recs, perm)
    offset = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    row_keys = np.repeat(keys, lengths)
    rows["ts"] = row_keys + (offset * np.repeat(slope, lengths)).astype(np.uint64)
    rows["tgid"] = recs["tgid"]
    rows["tid"] = recs["tid"]
    rows["nr"] = recs["nr"]
    rows["flags"] = recs["flags"] & L.REC_COMPAT  # FLAG_COMPAT is the same bit
    return rows, row_keys, headers


class BatchOrderer:
    """Holds decoded rows until every CPU has reported past them; releases them in per-thread order.

    Each read's rows stay a sorted segment of their own; a row is merged with the other segments once,
    when it is released (a stable sort of a few sorted runs is a linear merge).
    """

    def __init__(self, *, max_hold_ns: int = 250_000_000) -> None:
        self.max_hold_ns = max_hold_ns
        self._cpu_end: dict[int, int] = {}
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def held(self) -> int:
        return sum(len(rows) for rows, _ in self._segments)

    def add(self, raw_batches: list[bytes], hold_after: int | None = None) -> np.ndarray:
        """Take newly read batches; return the rows now safe to hand on. ``hold_after``: rows after this
        time also wait (the detail records up to it were read, later ones wait in their ring: an exec
        event must not come after its program's syscalls), never longer than ``max_hold_ns``."""
        rows, keys, headers = decode(raw_batches)
        for cpu, end in zip(headers["cpu"].tolist(), headers["end_ts"].tolist(), strict=True):
            if end > self._cpu_end.get(cpu, 0):
                self._cpu_end[cpu] = end
        if len(rows):
            self._segments.append((rows, keys))
        if not self._cpu_end or not self._segments:
            return np.zeros(0, dtype=SYSCALL_DTYPE)
        ends = self._cpu_end.values()
        watermark = min(ends) if hold_after is None else min(min(ends), hold_after)
        return self._release(max(watermark, max(ends) - self.max_hold_ns))

    def _release(self, watermark: int | None) -> np.ndarray:
        out_rows: list[np.ndarray] = []
        out_keys: list[np.ndarray] = []
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        for rows, keys in self._segments:
            cut = len(keys) if watermark is None else int(np.searchsorted(keys, np.uint64(watermark)))
            if cut:
                out_rows.append(rows[:cut])
                out_keys.append(keys[:cut])
            if cut < len(keys):
                kept.append((rows[cut:], keys[cut:]))
        self._segments = kept
        if not out_rows:
            return np.zeros(0, dtype=SYSCALL_DTYPE)
        if len(out_rows) == 1:
            return out_rows[0]
        keys = np.concatenate(out_keys)
        if (keys[1:] >= keys[:-1]).all():  # the released parts did not interleave
            return _concat(out_rows)
        return _take(_concat(out_rows), np.argsort(keys, kind="stable"))

    def drain(self) -> np.ndarray:
        """Everything still held (at shutdown, after a last flush of every CPU)."""
        return self._release(None)

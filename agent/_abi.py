"""Which processes make syscalls through the other ABI's gate than their program's.

A program's ABI, most exact first: the kernel's word at its exec (the loader sets TS_COMPAT for a 32-bit
image; the exec event carries it), its executable's ELF class (the process table's, for processes that
were running before the agent), or its first syscall after the exec (the loader's, made in the image's own
mode). A 64-bit program's ``int 0x80``, or a 32-bit program switching to 64-bit code, then shows as rows of
the other ABI. Rows come after the exec events that end them, so each process keeps its last few execs,
and each row is judged against the program it ran at that moment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.events import FLAG_COMPAT

MAX_SEGMENTS = 4  # execs kept per process: more between two batches of its rows are judged as the last


@dataclass(frozen=True, slots=True)
class AbiMismatch:
    pid: int
    program_compat: bool  # the program's own ABI: True for a 32-bit program
    rows: np.ndarray  # the other ABI's rows (SYSCALL_DTYPE), in order


@dataclass
class _Segment:
    start_ns: int
    compat: bool | None  # None: not told yet (the first row judged settles it)


class AbiWatch:
    def __init__(self) -> None:
        self._segments: dict[int, list[_Segment]] = {}  # pid -> the programs it ran since the agent saw it
        self._compat_now: set[int] = set()  # pids whose current program is 32-bit
        self._unknown_now: set[int] = set()  # pids whose current program's ABI is not told yet
        self._alerted: dict[int, int] = {}  # pid -> the segment start it was alerted for (once per program)

    def on_exec(self, pid: int, ts: int, image_compat: bool | None) -> None:
        self._push(pid, _Segment(ts, image_compat))

    def on_fork(self, child: int, parent: int, ts: int) -> None:
        """A new process (maybe a reused pid) runs its parent's program."""
        self._drop(child)
        program = self._segments.get(parent)
        if program:
            self._push(child, _Segment(ts, program[-1].compat))

    def _push(self, pid: int, segment: _Segment) -> None:
        segments = self._segments.setdefault(pid, [])
        segments.append(segment)
        del segments[:-MAX_SEGMENTS]
        self._set_now(pid, segment.compat)

    def _set_now(self, pid: int, compat: bool | None) -> None:
        self._compat_now.discard(pid)
        self._unknown_now.discard(pid)
        if compat is None:
            self._unknown_now.add(pid)
        elif compat:
            self._compat_now.add(pid)

    def check(
        self,
        batch: np.ndarray,
        heads: np.ndarray,
        pids: set[int],
        has_compat: bool,
        elf_compat: Callable[[int], bool | None],
        elf_compat_pids: set[int],
    ) -> list[AbiMismatch]:
        """This batch's new mismatches. ``heads``: where each run of one process's rows starts (a bool per
        row); ``pids``: the batch's processes; ``has_compat``: whether any row is a 32-bit syscall;
        ``elf_compat(pid)``: the executable's class (None: unknown); ``elf_compat_pids``: the batch's
        processes whose executable is 32-bit."""
        relevant = (pids & self._compat_now) | (pids & self._unknown_now) | (elf_compat_pids - self._segments.keys())
        if not has_compat and not relevant:
            return []  # the common case: 64-bit programs making 64-bit syscalls
        tgid, ts = batch["tgid"], batch["ts"]
        compat_rows = (batch["flags"] & FLAG_COMPAT) != 0 if has_compat else np.zeros(len(batch), dtype=bool)
        if has_compat:
            relevant |= set(np.unique(tgid[compat_rows]).tolist())
        found = []
        for pid, rows in self._rows_of(tgid, heads, relevant):
            segments = self._segments.get(pid, [])
            starts = np.array([s.start_ns for s in segments], dtype=np.uint64)
            which = np.searchsorted(starts, ts[rows], side="right") - 1  # -1: before every exec we saw
            for k in np.unique(which).tolist():
                piece = rows[which == k]
                abi = compat_rows[piece]
                if k < 0:  # the program before the first exec we saw: the table's when it predates the agent
                    known = elf_compat(pid) if not segments else None
                    program = bool(abi[0]) if known is None else known
                else:
                    segment = segments[k]
                    if segment.compat is None and k == len(segments) - 1:
                        segment.compat = elf_compat(pid)  # the table reads the current program
                    if segment.compat is None:
                        segment.compat = bool(abi[0])  # the loader's first syscall is in the image's mode
                    program = segment.compat
                    if k == len(segments) - 1:
                        self._set_now(pid, program)
                start = segments[k].start_ns if k >= 0 else -1
                odd = piece[abi != program]
                if len(odd) and self._alerted.get(pid) != start:
                    self._alerted[pid] = start
                    found.append(AbiMismatch(pid, program, batch[odd]))
        return found

    @staticmethod
    def _rows_of(tgid: np.ndarray, heads: np.ndarray, pids: set[int]) -> list[tuple[int, np.ndarray]]:
        """Each of ``pids``' row indices, in order. Rows come in runs of one process, so this walks the
        runs of these processes, not one mask over the batch per process (a batch after many execs)."""
        starts = np.flatnonzero(heads)
        ends = np.empty_like(starts)
        ends[:-1], ends[-1:] = starts[1:], len(tgid)
        runs: dict[int, list[np.ndarray]] = {}
        for r, pid in enumerate(tgid[starts].tolist()):
            if pid in pids:
                runs.setdefault(pid, []).append(np.arange(starts[r], ends[r]))
        return [(pid, np.concatenate(parts)) for pid, parts in sorted(runs.items())]

    def _drop(self, pid: int) -> None:
        self._segments.pop(pid, None)
        self._compat_now.discard(pid)
        self._unknown_now.discard(pid)
        self._alerted.pop(pid, None)

    def forget(self, gone: Callable[[int], bool]) -> None:
        """Drop the state of processes ``gone`` says are no longer known."""
        for pid in [p for p in {*self._segments, *self._alerted} if gone(p)]:
            self._drop(pid)

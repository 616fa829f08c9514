"""Which processes make syscalls through the other ABI's gate than their program's.

A program's ABI is the one its first syscall after exec came through: the kernel loads the image in its
own mode, so the loader's first syscall is the program's (a 32-bit program's are i386 syscalls). That needs
no read of the executable, so a process gone before /proc is read is judged as well. Processes that were
running before the agent (no exec seen) are judged by their executable's ELF class. A 64-bit program's
``int 0x80``, or a 32-bit program switching to 64-bit code, then shows as rows of the other ABI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from agent.events import FLAG_COMPAT

MAX_NAMES = 16


@dataclass(frozen=True, slots=True)
class AbiMismatch:
    pid: int
    program_compat: bool  # the program's own ABI: True for a 32-bit program
    rows: np.ndarray  # the other ABI's rows (SYSCALL_DTYPE), in order


class AbiWatch:
    def __init__(self) -> None:
        self._exec_ns: dict[int, int] = {}  # pid -> its last exec (or fork): earlier rows were another program's
        self._pending: set[int] = set()  # exec'd, no syscall seen since: the next one tells the program's ABI
        self._compat: set[int] = set()  # exec'd (or forked from such) and its program is 32-bit
        self._alerted: set[int] = set()  # once per process and program

    def on_exec(self, pid: int, ts: int) -> None:
        self._exec_ns[pid] = ts
        self._pending.add(pid)
        self._compat.discard(pid)
        self._alerted.discard(pid)

    def on_fork(self, child: int, parent: int, ts: int) -> None:
        """A new process (maybe a reused pid) runs its parent's program."""
        self._alerted.discard(child)
        self._compat.discard(child)
        self._pending.discard(child)
        self._exec_ns.pop(child, None)
        if parent in self._exec_ns:
            self._exec_ns[child] = ts
            if parent in self._pending:
                self._pending.add(child)
            elif parent in self._compat:
                self._compat.add(child)

    def check(
        self,
        batch: np.ndarray,
        heads: np.ndarray,
        pids: set[int],
        elf_compat: Callable[[int], bool | None],
        elf_compat_pids: set[int],
    ) -> list[AbiMismatch]:
        """This batch's new mismatches. ``heads``: where each run of one process's rows starts (a bool per
        row); ``pids``: the batch's processes; ``elf_compat(pid)``: the executable's ELF class (None:
        unknown); ``elf_compat_pids``: the batch's processes whose executable is 32-bit."""
        flags = batch["flags"]
        has_compat = bool(flags.any()) and bool((flags & FLAG_COMPAT).any())  # the first test is the cheap one
        relevant = (pids & self._pending) | (pids & self._compat) | (elf_compat_pids - self._exec_ns.keys())
        if not has_compat and not relevant:
            return []  # the common case: 64-bit programs making 64-bit syscalls
        tgid, ts = batch["tgid"], batch["ts"]
        compat_rows = (flags & FLAG_COMPAT) != 0 if has_compat else np.zeros(len(batch), dtype=bool)
        if has_compat:
            relevant |= set(np.unique(tgid[compat_rows]).tolist())
        found = []
        for pid, rows in self._rows_of(tgid, heads, relevant):
            if pid in self._exec_ns:
                rows = rows[ts[rows] >= self._exec_ns[pid]]
            if not len(rows):
                continue  # only rows from before its exec: the previous program's
            abi = compat_rows[rows]
            if pid in self._pending:
                self._pending.discard(pid)
                if abi[0]:
                    self._compat.add(pid)
            program_compat = (pid in self._compat) if pid in self._exec_ns else elf_compat(pid)
            if program_compat is None or pid in self._alerted:
                continue
            odd = abi != program_compat
            if odd.any():
                self._alerted.add(pid)
                found.append(AbiMismatch(pid, program_compat, batch[rows[odd]]))
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

    def forget(self, gone: Callable[[int], bool]) -> None:
        """Drop the state of processes ``gone`` says are no longer known."""
        for pid in [p for p in self._pids() if gone(p)]:
            self._exec_ns.pop(pid, None)
            self._pending.discard(pid)
            self._compat.discard(pid)
            self._alerted.discard(pid)

    def _pids(self) -> Iterable[int]:
        return {*self._exec_ns, *self._pending, *self._compat, *self._alerted}

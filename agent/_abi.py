"""Which processes make syscalls through the other ABI's gate than their program's.

A program's ABI is its executable's ELF class (the process table's, read from /proc, or for a process gone
before that read, from the file it exec'd). Where neither can be told, the first syscall after the exec
tells it: the kernel loads an image in its own mode, so the loader's first syscall is the program's. A
64-bit program's ``int 0x80``, or a 32-bit program switching to 64-bit code, then shows as rows of the
other ABI. Rows come after the exec event that ends them: those from before an exec are the previous
program's, whose class the table no longer holds (a replayed recording's table never held it), so they are
judged against the first of them (a forked child's first syscall is its parent program's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from agent.events import FLAG_COMPAT


@dataclass(frozen=True, slots=True)
class AbiMismatch:
    pid: int
    program_compat: bool  # the program's own ABI: True for a 32-bit program
    rows: np.ndarray  # the other ABI's rows (SYSCALL_DTYPE), in order


class AbiWatch:
    def __init__(self) -> None:
        self._exec_ns: dict[int, int] = {}  # pid -> its last exec (or fork): earlier rows were another program's
        self._pending: set[int] = set()  # class unknown, no syscall seen since the exec: the next one tells it
        self._first_compat: set[int] = set()  # class unknown, and its first syscall was a 32-bit one
        self._alerted: set[int] = set()  # once per process and program

    def on_exec(self, pid: int, ts: int) -> None:
        self._exec_ns[pid] = ts
        self._pending.add(pid)
        self._first_compat.discard(pid)
        self._alerted.discard(pid)

    def on_fork(self, child: int, parent: int, ts: int) -> None:
        """A new process (maybe a reused pid) runs its parent's program."""
        self._alerted.discard(child)
        self._pending.discard(child)
        self._first_compat.discard(child)
        self._exec_ns.pop(child, None)
        if parent in self._exec_ns:  # the parent's program was exec'd since the agent started
            self._exec_ns[child] = ts
            if parent in self._pending:
                self._pending.add(child)
            elif parent in self._first_compat:
                self._first_compat.add(child)

    def check(
        self,
        batch: np.ndarray,
        heads: np.ndarray,
        pids: set[int],
        elf_compat: Callable[[int], bool | None],
        elf_compat_pids: set[int],
    ) -> list[AbiMismatch]:
        """This batch's new mismatches. ``heads``: where each run of one process's rows starts (a bool per
        row); ``pids``: the batch's processes; ``elf_compat(pid)``: the executable's class (None: unknown);
        ``elf_compat_pids``: the batch's processes whose executable is 32-bit."""
        flags = batch["flags"]
        has_compat = bool(flags.any()) and bool((flags & FLAG_COMPAT).any())  # the first test is the cheap one
        relevant = (pids & self._pending) | (pids & self._first_compat) | elf_compat_pids
        if not has_compat and not relevant:
            return []  # the common case: 64-bit programs making 64-bit syscalls
        tgid, ts = batch["tgid"], batch["ts"]
        compat_rows = (flags & FLAG_COMPAT) != 0 if has_compat else np.zeros(len(batch), dtype=bool)
        if has_compat:
            relevant |= set(np.unique(tgid[compat_rows]).tolist())
        found = []
        for pid, rows in self._rows_of(tgid, heads, relevant):
            if pid in self._alerted:
                continue
            exec_ns = self._exec_ns.get(pid)
            if exec_ns is not None:
                earlier = rows[ts[rows] < exec_ns]
                rows = rows[ts[rows] >= exec_ns]
                if len(earlier):
                    before = bool(compat_rows[earlier[0]])
                    odd = earlier[compat_rows[earlier] != before]
                    if len(odd):
                        self._alerted.add(pid)
                        found.append(AbiMismatch(pid, before, batch[odd]))
                        continue
            if not len(rows):
                continue
            program_compat = elf_compat(pid)
            if program_compat is None:
                if pid in self._pending:
                    self._pending.discard(pid)
                    if compat_rows[rows[0]]:
                        self._first_compat.add(pid)
                if exec_ns is None:
                    continue  # running before the agent, class unknown: nothing to judge by
                program_compat = pid in self._first_compat
            else:
                self._pending.discard(pid)
            odd = rows[compat_rows[rows] != program_compat]
            if len(odd):
                self._alerted.add(pid)
                found.append(AbiMismatch(pid, program_compat, batch[odd]))
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
            self._first_compat.discard(pid)
            self._alerted.discard(pid)

    def _pids(self) -> Iterable[int]:
        return {*self._exec_ns, *self._pending, *self._first_compat, *self._alerted}

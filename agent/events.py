"""Data that crosses rooms: the compact syscall stream, detail events and process events.

Two streams leave the kernel (see docs/architecture.md):

* the compact stream of every syscall, handed around as numpy arrays of :data:`SYSCALL_DTYPE`
  (one batch = one array; never one Python object per syscall);
* the detail stream, in kernel order: :class:`ProcEvent` (fork, exec, exit) and :class:`DetailEvent`
  (a security-relevant syscall with its decoded arguments and return value).

Timestamps are nanoseconds of CLOCK_MONOTONIC (``bpf_ktime_get_ns``); ``boot_to_wall_ns`` in a
recording's metadata turns them into wall-clock time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# One row per syscall. ``flags`` bit 0 (FLAG_COMPAT): a 32-bit syscall, ``nr`` is an i386 number. Live, the
# kernel says so per syscall (a 64-bit program's ``int 0x80`` too); where it cannot (no BTF), the agent marks
# every syscall of a 32-bit executable.
SYSCALL_DTYPE = np.dtype([("ts", "<u8"), ("tgid", "<u4"), ("tid", "<u4"), ("nr", "<u2"), ("flags", "<u2")])
FLAG_COMPAT = 1


def empty_syscalls() -> np.ndarray:
    return np.zeros(0, dtype=SYSCALL_DTYPE)


@dataclass(frozen=True, slots=True)
class DetailEvent:
    """One security-relevant syscall, seen at its exit (so ``res`` is known).

    ``args`` holds decoded arguments named as Falco names them where Falco has a name
    (``openat``: dirfd, name, flags, mode, fd; ``execve``: filename, argv; ``connect``: fd, family,
    addr, port; ...). Integer flags stay integers; see ``agent.capture.decode`` for each syscall's keys.
    """

    ts: int
    tgid: int
    tid: int
    syscall: str  # the name, from libseccomp
    nr: int
    res: int  # the return value (negative errno on failure)
    args: Mapping[str, Any] = field(default_factory=dict)
    compat: bool = False
    raw_args: tuple[int, ...] = ()  # the six register arguments as the kernel saw them (for seccomp)


@dataclass(frozen=True, slots=True)
class KernelSignal:
    """The BPF program sent ``signal`` to process ``pid`` at its syscall ``nr`` (enforcement in the kernel:
    a verdict the agent wrote into the enforce map, or an in-kernel per-exe deny policy)."""

    ts: int
    pid: int
    tid: int
    nr: int
    signal: int
    compat: bool = False  # nr is an i386 number (the process made a 32-bit syscall)
    by_policy: bool = False  # the per-exe deny policy decided (else a verdict the agent armed and alerted on)


ProcKind = Literal["fork", "exec", "exit"]


@dataclass(frozen=True, slots=True)
class ProcEvent:
    """A process lifecycle event from the sched tracepoints.

    fork: ``pid`` is the new task's tgid, ``tid`` its thread id, ``ppid`` the parent's tgid,
    ``is_thread`` true when the new task is a thread of an existing process.
    exec: ``filename`` is the path exec'd, ``comm`` the new comm, ``cgroup_id`` the task's cgroup v2 id
    (0: unknown), for a process that is gone before /proc can be read.
    exit: ``tid`` exited; ``pid`` exits when ``tid == pid`` (the group leader).
    """

    kind: ProcKind
    ts: int
    pid: int
    tid: int
    ppid: int = 0
    comm: str = ""
    filename: str = ""
    is_thread: bool = False
    exit_code: int = 0
    cgroup_id: int = 0
    image_compat: bool | None = None  # exec: the new program is 32-bit (from the kernel; None: not told)


Event = DetailEvent | ProcEvent

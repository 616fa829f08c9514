"""What the process table knows about one process (a thread group)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

HOST_CONTAINER_ID = "host"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A snapshot of one process; replaced (never mutated) when the process execs.

    ``exe`` is the resolved executable path (/proc/PID/exe); ``args`` the full argv, ``args[0]`` included.
    ``start_ns`` is CLOCK_MONOTONIC ns, comparable with event timestamps. Unknown numbers are -1,
    unknown strings "".
    """

    pid: int
    ppid: int
    comm: str
    exe: str
    args: tuple[str, ...] = ()
    cwd: str = ""
    uid: int = -1
    gid: int = -1
    user: str = ""
    group: str = ""
    loginuid: int = -1
    loginname: str = ""
    tty: int = 0
    sid: int = -1
    pgid: int = -1
    start_ns: int = 0
    container_id: str = HOST_CONTAINER_ID
    cap_effective: int = 0
    cap_permitted: int = 0  # /proc/PID/status CapPrm (Falco's thread.cap_permitted)
    exe_from_memfd: bool = False
    exe_writable: bool = False
    exe_upper_layer: bool = False
    compat: bool = False  # a 32-bit (i386) executable: its syscall numbers are i386 numbers
    seccomp_mode: int = 0  # /proc/PID/status Seccomp: 0 disabled, 1 strict, 2 filter
    # the path this image was exec'd by, as given to execve (a fork child keeps its parent's): for a script,
    # the script, where ``exe`` is its interpreter; "" when no exec was seen (running before the agent)
    exec_path: str = ""

    @property
    def program(self) -> str:
        """What the anomaly model knows this process as: the file it exec'd, else its executable. Training
        keys recorded traces by the exec's path the same way, so a script exec'd by its path is its own
        program, not one more run of its interpreter. A relative path names no program ("": the generic
        slot), on both sides: ``./tool`` can be made in any directory, so it must not earn a learned
        program's thresholds."""
        if self.exec_path:
            return self.exec_path if self.exec_path.startswith("/") else ""
        return self.exe

    @property
    def cmdline(self) -> str:
        """Falco's proc.cmdline: the comm followed by the arguments (argv[1:])."""
        return " ".join((self.comm, *self.args[1:])) if self.args else self.comm


# How rooms other than agent/proc read the table: pid -> the live (or recently exited) process.
ProcessLookup = Callable[[int], ProcessInfo | None]

"""Blocking, done in the kernel: the BPF program signals a flagged process at its next syscall.

Never PID 1, the agent itself or its ancestors, kernel threads, or anything allow-listed: checked here and
in the kernel map both (``protected_tgids``, plus the per-exe allow-list applied at exec). A pid is held
through a pidfd and its start time checked before anything is sent, so a reused pid is never hit. Every
block is recorded and raises an alert (the pipeline's job); what was refused is recorded too, with why.
See docs/enforcement.md.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.capture._layout import COMPAT_POLICY_BASE
from agent.capture.names import known_names, numbers_named
from agent.config import EnforceConfig
from agent.proc import ProcReader
from agent.proc.info import ProcessInfo

PROTECTED_FLAG = 1
# Values in the kernel's protected_tgids map: INHERITED for allow-listed programs (their children share it
# until they exec), PINNED for PID 1, the agent, its ancestors and allow_pids (never meant to pass on).
INHERITED, PINNED = 1, 2
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
SIGNAL_NAMES = {int(number): name for name, number in SIGNALS.items()}
MAX_RECORDS = 10_000  # the newest blocks kept in memory (each one is also an alert)
# i386 reaches these through one multiplexing syscall as well as by their own numbers (socketcall(2), ipc(2)):
# a 32-bit deny list without the multiplexer would be passed by calling it instead.
_I386_MULTIPLEXED = {
    "socketcall": frozenset({
        "socket", "bind", "connect", "listen", "accept", "accept4", "getsockname", "getpeername",
        "socketpair", "send", "recv", "sendto", "recvfrom", "shutdown", "setsockopt", "getsockopt",
        "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
    }),
    "ipc": frozenset({
        "semop", "semget", "semctl", "semtimedop", "msgsnd", "msgrcv", "msgget", "msgctl", "shmat", "shmdt",
        "shmget", "shmctl",
    }),
}


# The same call under i386's older or wider names that the suffix patterns below do not give.
_I386_EQUIVALENTS = {
    "mmap": {"mmap2"}, "newfstatat": {"fstatat64"}, "lseek": {"_llseek"}, "select": {"_newselect"},
    "getrlimit": {"ugetrlimit"}, "umount2": {"umount"}, "wait4": {"waitpid"},
    "rt_sigaction": {"sigaction", "signal"}, "rt_sigprocmask": {"sigprocmask"}, "rt_sigreturn": {"sigreturn"},
    "rt_sigsuspend": {"sigsuspend"}, "rt_sigpending": {"sigpending"}, "getdents": {"readdir"},
    "uname": {"olduname", "oldolduname"}, "stat": {"oldstat"}, "lstat": {"oldlstat"}, "fstat": {"oldfstat"},
}


def _i386_variants(name: str) -> set[str]:
    """The names i386 gives the same call: setuid32, stat64, futex_time64, fadvise64_64, mmap2, waitpid...
    A suffixed name that is a syscall of its own natively (getdents64 beside getdents) is not a variant."""
    native = known_names()
    suffixed = {f"{name}32", f"{name}64", f"{name}_64", f"{name}_time64"} - native
    return {name, *suffixed, *_I386_EQUIVALENTS.get(name, ())}


def deny_numbers(names: Iterable[str], compat: bool) -> list[int]:
    """The syscall numbers a deny list stands for: native, or i386 (a 32-bit program's, or a 64-bit one's
    ``int 0x80``) with each call's i386 variants (setuid32, mmap2, the *_time64 calls) and the multiplexers
    that reach the same calls."""
    wanted = set(names)
    if compat:
        wanted |= {variant for name in list(wanted) for variant in _i386_variants(name)}
        wanted |= {mux for mux, calls in _I386_MULTIPLEXED.items() if wanted & calls}
    return numbers_named(wanted, compat)


@dataclass(frozen=True, slots=True)
class BlockRecord:
    ts_ns: int
    pid: int
    signal: str
    done: bool
    reason: str


def _ancestors_of_self() -> list[int]:
    pids, pid = [], os.getpid()
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        pids.append(pid)
        if ppid <= 1:
            break
        pid = ppid
    return pids


def is_kernel_thread(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            flags = int(fh.read().rsplit(")", 1)[1].split()[6])
    except (OSError, ValueError, IndexError):
        return False
    return bool(flags & 0x00200000)  # PF_KTHREAD


def resolved_exe(pid: int, fallback: str = "") -> str:
    """The executable ``pid`` really runs (/proc/PID/exe: links and ``..`` resolved); else ``fallback``
    resolved as far as it can be."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return os.path.realpath(fallback) if fallback.startswith("/") else fallback
    return exe.removesuffix(" (deleted)")


def _exited(pid: int, pidfd: int) -> bool:
    """Whether the process the pidfd holds has exited: its pid gone, or a zombie (whose pidfd still shows the
    pid, after the kernel's exit hook has already cleaned its map entries: one written now would stay for
    whoever gets the pid next)."""
    if _pidfd_pid(pidfd) != pid:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd holds; -1 once its process has exited (and so its pid may be reused)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


class Enforcer:
    def __init__(
        self, bpf: object, config: EnforceConfig, lookup: Callable[[int], ProcessInfo | None]
    ) -> None:
        self.bpf = bpf
        self.config = config
        self.lookup = lookup
        self.protected: set[int] = {1, os.getpid(), *_ancestors_of_self(), *config.allow_pids}
        self.records: deque[BlockRecord] = deque(maxlen=MAX_RECORDS)
        self.withdrawn = 0  # blocks taken back before the signal went out (the process became protected)
        self._withdrawn_news: list[BlockRecord] = []  # not yet alerted (the pipeline takes them, see take_withdrawn)
        # Both spellings of each allow-listed path: the kernel sees the path given to exec, /proc the real one.
        self.allow_exes = frozenset({*config.allow_exes, *(os.path.realpath(e) for e in config.allow_exes)})
        # deny_syscalls paths are resolved at config load; the ids index the kernel's deny_bitmaps
        self.policy_ids = {exe: i for i, exe in enumerate(sorted(config.deny_syscalls), start=1)}
        self._reader = ProcReader()
        self._lock = threading.Lock()
        self._install()

    def _map(self, name: str) -> object:
        return self.bpf[name]  # type: ignore[index]

    def _install(self) -> None:
        prot = self._map("protected_tgids")
        for pid in self.protected:
            prot[ctypes.c_uint32(pid)] = ctypes.c_uint32(PINNED)  # type: ignore[index]
        exe_policy = self._map("exe_policy")
        for exe in sorted(self.allow_exes):
            self._set_exe_policy(exe_policy, exe, PROTECTED_FLAG, 0)
        bitmaps = self._map("deny_bitmaps")
        for exe, policy_id in self.policy_ids.items():
            # names were checked against libseccomp at config load; 32-bit syscalls are looked up apart
            for index, compat in ((policy_id, False), (policy_id + COMPAT_POLICY_BASE, True)):
                bm = bitmaps.Leaf()  # type: ignore[attr-defined]
                for nr in deny_numbers(self.config.deny_syscalls[exe], compat):
                    bm.bits[nr >> 6] |= 1 << (nr & 63)
                bitmaps[ctypes.c_int(index)] = bm  # type: ignore[index]
            self._set_exe_policy(exe_policy, exe, 0, policy_id)

    @staticmethod
    def _set_exe_policy(exe_policy: object, exe: str, flag: int, policy_id: int) -> None:
        key = exe_policy.Key()  # type: ignore[attr-defined]
        key.path = exe.encode()[:255]
        value = exe_policy.Leaf()  # type: ignore[attr-defined]
        value.signal, value.policy_id = flag, policy_id
        exe_policy[key] = value  # type: ignore[index]

    def protect_processes(self, procs: Iterable[ProcessInfo]) -> None:
        """Allow-listed executables already running when the agent started: protected in the kernel as an
        exec of them would be, while they live (not kept in ``protected``: their pids are reused after)."""
        for info in procs:
            if info.exe in self.allow_exes:
                self.on_exec(info.pid, info.exe)

    def on_exec(self, pid: int, exe: str = "") -> int:
        """Apply the per-exe policy by the program ``pid`` really runs now, whatever path it was exec'd by
        (``./x``, a symlink, ``/a/../x``): the kernel only matched the path string given to exec. Called
        on every exec event (after the kernel's own exec-time step); ``exe`` is the process table's path,
        used when /proc cannot say. Returns the deny policy id applied (0: none)."""
        try:
            pidfd = os.pidfd_open(pid)  # holds the process: its pid cannot be reused while we look
        except OSError:
            return 0  # gone: an entry now would wait for whoever gets the pid next
        try:
            return self._apply_exe_policy(pid, pidfd, resolved_exe(pid, exe))
        finally:
            os.close(pidfd)

    def _apply_exe_policy(self, pid: int, pidfd: int, real: str) -> int:
        key = ctypes.c_uint32(pid)
        if real in self.allow_exes:
            prot = self._map("protected_tgids")
            prot[key] = ctypes.c_uint32(INHERITED)  # type: ignore[index]
            if _exited(pid, pidfd):  # it exited meanwhile: the kernel's exit cleanup may have run
                prot.pop(key, None)  # type: ignore[attr-defined]
            return 0
        policy_id = self.policy_ids.get(real, 0)
        if not policy_id:
            return 0
        entry = self._map("enforce")
        current = entry.get(key)  # type: ignore[attr-defined]
        if current is not None and current.signal:
            return policy_id  # a block is already pending: keep it
        value = entry.Leaf()  # type: ignore[attr-defined]
        value.signal, value.policy_id = 0, policy_id
        entry[key] = value  # type: ignore[index]
        if _exited(pid, pidfd):
            entry.pop(key, None)  # type: ignore[attr-defined]
        return policy_id

    def refusal(self, pid: int, *, use_table: bool = True) -> str:
        """Why ``pid`` must never be blocked, or "" when it may be. ``use_table``: also ask the process table
        (only from the pipeline's thread: a lookup may insert into it)."""
        if pid <= 1:
            return "PID 1 is never blocked"
        if pid in self.protected:
            return "the agent, its ancestors and allow-listed pids are never blocked"
        if self.kernel_protected(pid):
            # The kernel allow-lists by the path given to exec (a script's own path, where /proc names its
            # interpreter) and passes protection to an allow-listed program's children: it has the last word.
            return "protected in the kernel: allow-listed by the path it was run by, or a child of one"
        info = self.lookup(pid) if use_table else None
        if info is not None and info.exe in self.allow_exes:
            return f"{info.exe} is allow-listed"
        real = resolved_exe(pid)
        if real in self.allow_exes:
            return f"{real} is allow-listed"
        if is_kernel_thread(pid):
            return "kernel threads are never blocked"
        return ""

    def _identity_refusal(self, pid: int, pidfd: int, start_ns: int | None) -> str:
        """Why the process the pidfd holds is not the one the decision was about ("" when it is)."""
        if start_ns is None:
            info = self.lookup(pid)
            start_ns = info.start_ns if info is not None and info.start_ns > 0 else None
        if start_ns is None:
            return ""  # nothing to compare with: the pidfd alone pins the process now
        now = self._reader.read_start_ns(pid)
        if _pidfd_pid(pidfd) != pid or now is None:
            return f"pid {pid} exited before it could be blocked"
        if not self._reader.same_start(now, start_ns):
            return f"pid {pid} was reused: the process now running started at {now} ns, not {start_ns} ns"
        return ""

    def block(self, pid: int, reason: str, start_ns: int | None = None) -> BlockRecord:
        """Block ``pid`` (the configured action), or record why not. ``start_ns`` (CLOCK_MONOTONIC, as in
        ProcessInfo.start_ns) is the start of the process the decision was about; when None, the process
        table's is used."""
        sig_name = self.config.action
        sig = SIGNALS[sig_name]
        why_not = self.refusal(pid)
        pidfd = -1
        if not why_not:
            # Take the pidfd first: from here on the process it holds cannot be swapped for another.
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                why_not = f"pid {pid} is gone"
        if not why_not:
            why_not = self._identity_refusal(pid, pidfd, start_ns)
        if why_not:
            if pidfd >= 0:
                os.close(pidfd)
            rec = BlockRecord(time.time_ns(), pid, sig_name, False, f"refused: {why_not}")
        else:
            self._set_signal(pid, int(sig))
            # A process asleep in a long syscall makes no next syscall: signal it from here too, through the
            # pidfd, unless it became one never to block meanwhile (an exec of an allow-listed program).
            threading.Timer(0.05, self._fallback, args=(pidfd, sig, pid)).start()
            rec = BlockRecord(time.time_ns(), pid, sig_name, True, reason)
        with self._lock:
            self.records.append(rec)
        return rec

    def take_withdrawn(self) -> list[BlockRecord]:
        """The blocks withdrawn since the last call: their "blocked" alert is out, so each needs one saying
        the signal never went."""
        with self._lock:
            news, self._withdrawn_news = self._withdrawn_news, []
        return news

    def kernel_protected(self, pid: int) -> bool:
        """Whether the BPF side will refuse to signal ``pid`` (it is in the kernel's protected_tgids)."""
        try:
            return self._map("protected_tgids").get(ctypes.c_uint32(pid)) is not None  # type: ignore[attr-defined]
        except (KeyError, OSError):
            return False

    def _fallback(self, pidfd: int, sig: int, pid: int) -> None:
        try:
            if _pidfd_pid(pidfd) != pid:
                return  # gone (killed at its next syscall, or exited)
            # The pidfd holds the same process through an exec: it may run an allow-listed program now.
            why_not = self.refusal(pid, use_table=False)  # a timer thread: the table is the pipeline's
            if why_not:
                self._set_signal(pid, 0, only_if_present=True)  # disarm: no later exec may inherit the kill
                record = BlockRecord(time.time_ns(), pid, SIGNAL_NAMES.get(sig, str(sig)), False,
                                     f"withdrawn: {why_not}")
                with self._lock:
                    self.withdrawn += 1
                    self.records.append(record)
                    self._withdrawn_news.append(record)
                return
            signal.pidfd_send_signal(pidfd, sig)
            if sig == signal.SIGSTOP:  # sent once, here or by the BPF side: SIGCONT must resume it for good
                self._clear_signal(pid, pidfd)
        except OSError:
            pass  # already gone
        finally:
            os.close(pidfd)

    def _clear_signal(self, pid: int, pidfd: int) -> None:
        """Leave ``pid``'s enforce entry with its policy but no pending signal (as the BPF side does after a
        stop): a process asleep when it was stopped restarts its syscall after SIGCONT and must not be
        stopped again."""
        if _pidfd_pid(pidfd) == pid:  # else gone, or the pid is someone else's now
            self._set_signal(pid, 0, only_if_present=True)

    def _set_signal(self, pid: int, sig: int, *, only_if_present: bool = False) -> None:
        """Set the signal ``pid``'s next syscall gets (0: none), keeping its program's deny_syscalls policy:
        a process stopped, then resumed, is still under it."""
        entry = self._map("enforce")
        key = ctypes.c_uint32(pid)
        current = entry.get(key)  # type: ignore[attr-defined]
        if current is None and only_if_present:
            return
        value = entry.Leaf()  # type: ignore[attr-defined]
        value.signal, value.policy_id = sig, current.policy_id if current is not None else 0
        entry[key] = value  # type: ignore[index]

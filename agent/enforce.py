"""Blocking, done in the kernel: the BPF program signals a flagged process at its next syscall.

Never PID 1, the agent itself or its ancestors, kernel threads, or anything allow-listed: checked here and
in the kernel map both (``protected_tgids``, plus the per-exe allow-list applied at exec). Every block is
recorded and raises an alert (the pipeline's job); what was refused is recorded too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.capture.names import syscall_number
from agent.config import EnforceConfig
from agent.proc.info import ProcessInfo

PROTECTED_FLAG = 1
# Values in the kernel's protected_tgids map: INHERITED for allow-listed programs (their children share it
# until they exec), PINNED for PID 1, the agent, its ancestors and allow_pids (never meant to pass on).
INHERITED, PINNED = 1, 2
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


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


class Enforcer:
    def __init__(
        self, bpf: object, config: EnforceConfig, lookup: Callable[[int], ProcessInfo | None]
    ) -> None:
        self.bpf = bpf
        self.config = config
        self.lookup = lookup
        self.protected: set[int] = {1, os.getpid(), *_ancestors_of_self(), *config.allow_pids}
        self.records: list[BlockRecord] = []
        self._lock = threading.Lock()
        self._install()

    def _map(self, name: str) -> object:
        return self.bpf[name]  # type: ignore[index]

    def _install(self) -> None:
        prot = self._map("protected_tgids")
        for pid in self.protected:
            prot[ctypes.c_uint32(pid)] = ctypes.c_uint32(PINNED)  # type: ignore[index]
        exe_policy = self._map("exe_policy")
        for exe in self.config.allow_exes:
            key = exe_policy.Key()  # type: ignore[attr-defined]
            key.path = exe.encode()[:255]
            value = exe_policy.Leaf()  # type: ignore[attr-defined]
            value.signal, value.policy_id = PROTECTED_FLAG, 0
            exe_policy[key] = value  # type: ignore[index]
        bitmaps = self._map("deny_bitmaps")
        for policy_id, (exe, names) in enumerate(sorted(self.config.deny_syscalls.items()), start=1):
            bm = bitmaps.Leaf()  # type: ignore[attr-defined]
            for name in names:
                nr = syscall_number(name)
                if 0 <= nr < 512:
                    bm.bits[nr >> 6] |= 1 << (nr & 63)
            bitmaps[ctypes.c_int(policy_id)] = bm  # type: ignore[index]
            key = exe_policy.Key()  # type: ignore[attr-defined]
            key.path = exe.encode()[:255]
            value = exe_policy.Leaf()  # type: ignore[attr-defined]
            value.signal, value.policy_id = 0, policy_id
            exe_policy[key] = value  # type: ignore[index]

    def protect_processes(self, procs: Iterable[ProcessInfo]) -> None:
        """Allow-listed executables already running when the agent started."""
        prot = self._map("protected_tgids")
        allow = set(self.config.allow_exes)
        for info in procs:
            if info.exe in allow:
                self.protected.add(info.pid)
                prot[ctypes.c_uint32(info.pid)] = ctypes.c_uint32(INHERITED)  # type: ignore[index]

    def refusal(self, pid: int) -> str:
        """Why ``pid`` must never be blocked, or "" when it may be."""
        if pid <= 1:
            return "PID 1 is never blocked"
        if pid in self.protected:
            return "the agent, its ancestors and allow-listed pids are never blocked"
        info = self.lookup(pid)
        if info is not None and info.exe in self.config.allow_exes:
            return f"{info.exe} is allow-listed"
        if is_kernel_thread(pid):
            return "kernel threads are never blocked"
        return ""

    def block(self, pid: int, reason: str) -> BlockRecord:
        sig_name = self.config.action
        why_not = self.refusal(pid)
        if why_not:
            rec = BlockRecord(time.time_ns(), pid, sig_name, False, f"refused: {why_not}")
        else:
            entry = self._map("enforce")
            value = entry.Leaf()  # type: ignore[attr-defined]
            value.signal, value.policy_id = int(SIGNALS[sig_name]), 0
            entry[ctypes.c_uint32(pid)] = value  # type: ignore[index]
            # A process asleep in a long syscall makes no next syscall: signal it from here too, through a
            # pidfd taken now, so a reused pid is never hit. When the kernel holds the pid as protected (it
            # inherited protection at fork) the BPF side will not signal it: do it at once.
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                pidfd = -1
            if pidfd >= 0:
                if self.kernel_protected(pid):
                    self._fallback(pidfd, SIGNALS[sig_name])
                else:
                    threading.Timer(0.05, self._fallback, args=(pidfd, SIGNALS[sig_name])).start()
            rec = BlockRecord(time.time_ns(), pid, sig_name, True, reason)
        with self._lock:
            self.records.append(rec)
        return rec

    def kernel_protected(self, pid: int) -> bool:
        """Whether the BPF side will refuse to signal ``pid`` (it is in the kernel's protected_tgids)."""
        try:
            return self._map("protected_tgids").get(ctypes.c_uint32(pid)) is not None  # type: ignore[attr-defined]
        except (KeyError, OSError):
            return False

    @staticmethod
    def _fallback(pidfd: int, sig: int) -> None:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except OSError:
            pass  # already gone
        finally:
            os.close(pidfd)

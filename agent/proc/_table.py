"""The process table: every process on the host, seeded from /proc and kept current by events."""

from __future__ import annotations

import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agent.errors import ConfigError
from agent.events import DetailEvent, ProcEvent
from agent.proc._cache import BoundedCache
from agent.proc._procfs import ProcReader
from agent.proc.info import HOST_CONTAINER_ID, ProcessInfo

# The set*id calls the table follows always: each one's id kind and the argument holding the effective id.
_CRED_ARG = {"setuid": ("uid", "uid"), "setresuid": ("uid", "euid"), "setgid": ("gid", "gid"),
             "setresgid": ("gid", "egid")}
CRED_SYSCALLS = frozenset(_CRED_ARG)
_EXEC_SYSCALLS = frozenset(("execve", "execveat"))
_DEFAULT_MAX_EXITED = 8192


@dataclass(slots=True)
class _Entry:
    """The table's private, mutable record around one frozen ProcessInfo."""

    info: ProcessInfo
    threads: int = 0  # live non-leader threads the table knows of
    exit_ns: int = 0  # when the leader exited (0 while it runs)
    leader_exited: bool = False  # the leader is gone but threads still run
    exec_pending: bool = False  # an exec ProcEvent was applied; its execve DetailEvent not yet
    late_seed: bool = False  # read by seed_new: its fork event may still come (not a pid reuse)


def _argv_tuple(argv: Any) -> tuple[str, ...]:
    if argv is None:
        return ()
    if isinstance(argv, str):
        return (argv,)
    if isinstance(argv, bytes):
        return tuple(a.decode("utf-8", "surrogateescape") for a in argv.rstrip(b"\0").split(b"\0"))
    if isinstance(argv, Sequence):
        return tuple(a.decode("utf-8", "surrogateescape") if isinstance(a, bytes) else str(a) for a in argv)
    return ()


class ProcessTable:
    """pid -> :class:`ProcessInfo` for every process, bounded, robust to pid reuse.

    Single-threaded: the pipeline applies events and asks questions from one thread.
    """

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        max_processes: int = 65536,
        exited_grace_ns: int = 5_000_000_000,
        max_exited: int | None = None,
        max_threads: int | None = None,
        cache_size: int = 4096,
        cgroup_root: str | None = None,
    ) -> None:
        if max_processes < 8:
            raise ConfigError(f"max_processes must be at least 8, not {max_processes}")
        self.proc_root = proc_root
        self.max_processes = max_processes
        self.max_exited = max_exited if max_exited is not None else min(max_processes, _DEFAULT_MAX_EXITED)
        self.max_threads = max_threads if max_threads is not None else 4 * max_processes
        self.exited_grace_ns = exited_grace_ns
        self._reader = ProcReader(proc_root, cache_size, cgroup_root)
        self._live: dict[int, _Entry] = {}
        self._exited: OrderedDict[int, _Entry] = OrderedDict()  # in exit order, for reap()
        self._threads: dict[int, int] = {}  # tid -> tgid (non-leader threads only)
        self._missing: BoundedCache[int, bool] = BoundedCache(cache_size)  # pids /proc did not have
        self._compat_pids: set[int] = set()
        self._class_unknown: set[int] = set()  # processes whose executable's class could not be read
        self._compat_array: np.ndarray | None = None
        self._counts = dict.fromkeys(
            (
                "forks",
                "thread_forks",
                "execs",
                "exec_details",
                "exits",
                "pid_reused",
                "exec_from_event",
                "exec_cgroup_container",
                "lazy_reads",
                "evicted",
                "exited_evicted",
                "reaped",
                "sweeps",
            ),
            0,
        )

    # -- seeding -----------------------------------------------------------------------------------

    def seed(self) -> int:
        """Read every process under the proc root; returns how many were read."""
        return len(self._seed(only_new=False))

    def seed_new(self) -> list[ProcessInfo]:
        """Read the processes under the proc root that the table does not know: those born between
        :meth:`seed` and the tracer's start have neither a snapshot nor a fork event."""
        return self._seed(only_new=True)

    def _seed(self, *, only_new: bool) -> list[ProcessInfo]:
        try:
            names = os.listdir(self.proc_root)
        except OSError as err:
            raise ConfigError(f"cannot list processes: {err.strerror}", path=self.proc_root) from None
        read: list[ProcessInfo] = []
        for name in names:
            if not name.isdigit():
                continue
            info = self._reader.read(int(name))
            if info is None:
                continue
            entry = self._live.get(info.pid)
            if only_new and entry is not None and self._same_start(entry.info.start_ns, info.start_ns):
                continue  # known, and still the same process (not a pid reused since the first scan)
            read.append(info)
            if entry is not None:
                self._set_info(entry, info)
            else:
                self._insert(_Entry(info, late_seed=only_new))
        return read

    # -- events ------------------------------------------------------------------------------------

    def apply(self, event: ProcEvent) -> None:
        """Apply one fork, exec or exit, in kernel order."""
        if event.kind == "fork":
            if event.is_thread:
                self._fork_thread(event)
            else:
                self._fork(event)
        elif event.kind == "exec":
            self._exec(event.pid, event.ts, event.comm, event.filename, event.cgroup_id)
        elif event.kind == "exit":
            self._exit(event)

    def add(self, info: ProcessInfo) -> None:
        """Add (or replace) a process known from elsewhere, e.g. a recording's process rows before a replay."""
        entry = self._live.get(info.pid)
        if entry is not None:
            self._set_info(entry, info)
        else:
            self._forget_id(info.pid)
            self._insert(_Entry(info))

    def apply_creds_detail(self, event: DetailEvent) -> None:
        """A successful setuid/setgid-family call changed the process's user (and, with it, its capabilities):
        take them from /proc now, while it lives; else from the call's own arguments. Until this, a root
        daemon that dropped to nobody without an exec stayed "root" to every rule (and its setuid(0) then
        passed for a root one)."""
        if event.res != 0 or event.syscall not in CRED_SYSCALLS:
            return
        entry = self._live.get(event.tgid)
        if entry is None:
            return
        old = entry.info
        fresh = self._reader.read(event.tgid, inherit=old)
        if fresh is not None and fresh.pid == old.pid and self._same_start(fresh.start_ns, old.start_ns):
            self._set_info(entry, replace(old, uid=fresh.uid, gid=fresh.gid, user=fresh.user, group=fresh.group,
                                          cap_effective=fresh.cap_effective, cap_permitted=fresh.cap_permitted))
            return
        kind, arg = _CRED_ARG[event.syscall]
        value = event.args.get(arg)  # the effective id it set (-1, or its unsigned form: left as it was)
        if isinstance(value, int) and value not in (-1, 0xFFFFFFFF):
            if kind == "uid":
                self._set_info(entry, replace(old, uid=value, user=self._reader.user_name(value)))
            else:
                self._set_info(entry, replace(old, gid=value, group=self._reader.group_name(value)))

    def apply_exec_detail(self, event: DetailEvent) -> None:
        """Take the exact argv (and the filename) from a successful execve/execveat."""
        if event.res != 0 or event.syscall not in _EXEC_SYSCALLS:
            return
        self._counts["exec_details"] += 1
        pid = event.tgid
        filename = str(event.args.get("filename") or "")
        argv = _argv_tuple(event.args.get("argv"))
        entry = self._live.get(pid)
        if entry is None or not entry.exec_pending:
            # The exec ProcEvent was lost (or the process was unknown): this is the exec.
            self._exec(pid, event.ts, "", filename)
            entry = self._live.get(pid)
            if entry is None:
                return
        entry.exec_pending = False
        info = entry.info
        changes: dict[str, Any] = {}
        if argv:
            changes["args"] = argv
        if not info.exe and filename:
            changes["exe"] = self._absolute(filename, info.cwd)
        # as training does: a relative path from the exec event gives way to the one execve was given
        if filename and filename != info.exec_path and not info.exec_path.startswith("/"):
            changes["exec_path"] = filename
        if changes:
            self._set_info(entry, replace(info, **changes))

    def _fork(self, event: ProcEvent) -> None:
        self._counts["forks"] += 1
        pid = event.pid
        self._forget_id(pid)
        parent = self._known(event.ppid) or self._lazy(event.ppid)
        if parent is not None:
            info = replace(parent, pid=pid, ppid=event.ppid, start_ns=event.ts)
            if event.ppid in self._class_unknown:
                self._class_unknown.add(pid)
        else:
            fresh = self._reader.read(pid)
            if fresh is not None and fresh.pid == pid and self._same_start(fresh.start_ns, event.ts):
                info = replace(fresh, start_ns=event.ts)
            else:
                info = ProcessInfo(pid=pid, ppid=event.ppid, comm=event.comm, exe="", start_ns=event.ts)
        self._insert(_Entry(info))

    def _fork_thread(self, event: ProcEvent) -> None:
        self._counts["thread_forks"] += 1
        self._forget_id(event.tid)
        self._map_thread(event.tid, event.pid)

    def _exec(self, pid: int, ts: int, comm: str, filename: str, cgroup_id: int = 0) -> None:
        self._counts["execs"] += 1
        entry = self._live.get(pid)
        if entry is None:
            info = self._lazy(pid)
            entry = self._live.get(pid)
            if info is None or entry is None:
                exe = self._absolute(filename, "")
                container = self._container_at_exec(cgroup_id, HOST_CONTAINER_ID)
                info = ProcessInfo(
                    pid=pid, ppid=-1, comm=comm, exe=exe, start_ns=0, container_id=container, exec_path=filename,
                    compat=self._path_is_i386(pid, exe, container),
                )
                self._counts["exec_from_event"] += 1
                entry = _Entry(info)
                self._insert(entry)
            if filename and info.exec_path != filename:
                self._set_info(entry, replace(info, exec_path=filename))
            entry.exec_pending = True
            entry.threads = 0
            return
        old = entry.info
        fresh = self._reader.read(pid, inherit=old)
        # Apply /proc only if it is still this process (same start) and still this image (same comm).
        self._class_unknown.discard(pid)  # a new image: told again below
        if fresh is not None and fresh.pid == pid and (not comm or fresh.comm == comm):
            info = replace(fresh, exec_path=filename)
        else:
            self._counts["exec_from_event"] += 1
            exe = self._absolute(filename, old.cwd) if filename else old.exe
            info = replace(
                old,
                comm=comm or posixpath.basename(filename)[:15] or old.comm,
                exe=exe,
                exec_path=filename,
                args=(),
                exe_from_memfd=exe.startswith("/memfd:"),
                exe_writable=False,
                exe_upper_layer=False,
                # a runtime moves its child into the container's cgroup, then execs: the child's, not the
                # parent's, even when it is gone before /proc could be read
                container_id=self._container_at_exec(cgroup_id, old.container_id),
            )
            info = replace(info, compat=self._path_is_i386(pid, exe, info.container_id))
        # exec kills the other threads (their exits come first), so the process is single-threaded.
        entry.threads = 0
        entry.exec_pending = True
        self._set_info(entry, info)

    def _path_is_i386(self, pid: int, exe: str, container_id: str) -> bool:
        """A gone process's class, from the file it exec'd: only on the host (a container's path names a
        file in its own root, which is gone with it). Where it cannot be told, ``compat_of`` says so."""
        compat = self._reader.path_is_i386(exe) if container_id == HOST_CONTAINER_ID else None
        if compat is None:
            self._class_unknown.add(pid)
        return bool(compat)

    def compat_of(self, pid: int) -> bool | None:
        """Whether ``pid`` runs a 32-bit executable; None when that could not be told (or it is unknown)."""
        info = self._known(pid)
        return None if info is None or pid in self._class_unknown else info.compat

    def _container_at_exec(self, cgroup_id: int, otherwise: str) -> str:
        container = self._reader.container_of_cgroup(cgroup_id)
        # "host" overrides nothing: on a hybrid host a runtime may keep containers in v1 cgroups only,
        # leaving their processes in a host v2 cgroup
        if container is None or container == HOST_CONTAINER_ID:
            return otherwise
        self._counts["exec_cgroup_container"] += 1
        return container

    def _exit(self, event: ProcEvent) -> None:
        self._counts["exits"] += 1
        if event.tid != event.pid:
            self._unmap_thread(event.tid)
            return
        entry = self._live.get(event.pid)
        if entry is None:
            return
        entry.exit_ns = event.ts
        if entry.threads > 0:
            # Another thread still runs: the process is alive until its last thread exits.
            entry.leader_exited = True
            return
        self._retire(event.pid, event.ts)

    # -- questions ---------------------------------------------------------------------------------

    def get(self, pid: int) -> ProcessInfo | None:
        """The process ``pid`` (or the process of thread ``pid``); a :data:`ProcessLookup`."""
        info = self._known(pid)
        if info is not None:
            return info
        tgid = self._threads.get(pid)
        if tgid is not None:
            info = self._known(tgid)
            if info is not None:
                return info
        return self._lazy(pid)

    def ancestors(self, pid: int, depth: int = 16) -> list[ProcessInfo]:
        """Parent first, up to ``depth``; stops at pid 1, pid 0, an unknown parent or a cycle."""
        info = self.get(pid)
        if info is None:
            return []
        chain: list[ProcessInfo] = []
        seen = {info.pid}
        current = info.ppid
        while len(chain) < depth and current > 0 and current not in seen:
            parent = self.get(current)
            if parent is None:
                break
            chain.append(parent)
            seen.add(current)
            if current == 1:
                break
            current = parent.ppid
        return chain

    def exe_and_program_of(self, tgids: Iterable[int]) -> tuple[dict[int, str], dict[int, str]]:
        """tgid -> exe path, and tgid -> :attr:`ProcessInfo.program`, for a batch; unknown pids are read from
        /proc once, else ``""``."""
        exes: dict[int, str] = {}
        programs: dict[int, str] = {}
        for tgid in tgids:
            pid = int(tgid)
            if pid in exes:
                continue
            entry = self._live.get(pid) or self._exited.get(pid)
            info = entry.info if entry is not None else self.get(pid)
            exes[pid] = info.exe if info is not None else ""
            programs[pid] = info.program if info is not None else ""
        return exes, programs

    def exe_of(self, tgids: Iterable[int]) -> dict[int, str]:
        """tgid -> exe path for a batch (see :meth:`exe_and_program_of`)."""
        return self.exe_and_program_of(tgids)[0]

    @property
    def has_compat(self) -> bool:
        """Whether any known process is 32-bit (else :meth:`compat_mask` is all False)."""
        return bool(self._compat_pids)

    def compat_pids(self) -> list[int]:
        """The known processes whose executable is 32-bit."""
        return sorted(self._compat_pids)

    def compat_mask(self, tgids: np.ndarray) -> np.ndarray:
        """Which rows' tgids are 32-bit (i386) processes."""
        tgids = np.asarray(tgids)
        if tgids.size == 0:
            return np.zeros(0, dtype=bool)
        live, exited = self._live, self._exited
        # Rows come in runs of one tgid: dedupe the run heads, not every row.
        flat = tgids.ravel()
        heads = flat[np.concatenate(([True], flat[1:] != flat[:-1]))]
        for pid in set(heads.tolist()):
            if pid not in live and pid not in exited:
                self.get(pid)
        if not self._compat_pids:
            return np.zeros(tgids.shape, dtype=bool)
        if self._compat_array is None:
            self._compat_array = np.fromiter(self._compat_pids, dtype=np.int64, count=len(self._compat_pids))
        return np.isin(tgids, self._compat_array)

    def reap(self, now_ns: int) -> int:
        """Drop processes that exited more than the grace period before ``now_ns``."""
        dropped = 0
        horizon = now_ns - self.exited_grace_ns
        while self._exited:
            pid, entry = next(iter(self._exited.items()))
            if entry.exit_ns > horizon:
                break
            del self._exited[pid]
            self._gone(pid)
            dropped += 1
        self._counts["reaped"] += dropped
        self._reader.refresh_clock()
        return dropped

    def snapshot(self) -> list[ProcessInfo]:
        """Every live process (exited ones in their grace period are left out)."""
        return [entry.info for entry in self._live.values()]

    @property
    def stats(self) -> dict[str, int]:
        return {
            "live": len(self._live),
            "exited": len(self._exited),
            "threads": len(self._threads),
            "proc_reads": self._reader.reads,
            "proc_read_failures": self._reader.failures,
            "proc_start_mismatches": self._reader.mismatches,
            **self._counts,
            **self._reader.cache_sizes(),
        }

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, pid: object) -> bool:
        return pid in self._live or pid in self._exited

    # -- bookkeeping -------------------------------------------------------------------------------

    def _known(self, pid: int) -> ProcessInfo | None:
        entry = self._live.get(pid) or self._exited.get(pid)
        return entry.info if entry is not None else None

    def _lazy(self, pid: int) -> ProcessInfo | None:
        """Read a pid the table has not seen, once; remember the misses."""
        if pid <= 0 or pid in self._missing:
            return None
        self._counts["lazy_reads"] += 1
        info = self._reader.read(pid)
        if info is None:
            self._missing.put(pid, True)
            return None
        if info.pid != pid:  # a thread id: map it to its process
            self._map_thread(pid, info.pid)
            known = self._known(info.pid)
            if known is not None:
                return known
        elif pid in self._threads:
            self._unmap_thread(pid)
        self._insert(_Entry(info))
        return info

    def _same_start(self, a_ns: int, b_ns: int) -> bool:
        return self._reader.same_start(a_ns, b_ns)

    @staticmethod
    def _absolute(filename: str, cwd: str) -> str:
        if not filename or filename.startswith("/") or not cwd:
            return filename
        return posixpath.normpath(posixpath.join(cwd, filename))

    def _set_info(self, entry: _Entry, info: ProcessInfo) -> None:
        old = entry.info
        entry.info = info
        if old.compat != info.compat or old.pid != info.pid:
            self._untrack(old.pid)
            self._track(info)

    def _track(self, info: ProcessInfo) -> None:
        if info.compat:
            self._compat_pids.add(info.pid)
            self._compat_array = None

    def _gone(self, pid: int) -> None:
        """``pid`` left the table."""
        self._untrack(pid)
        self._class_unknown.discard(pid)

    def _untrack(self, pid: int) -> None:
        if pid in self._compat_pids:
            self._compat_pids.discard(pid)
            self._compat_array = None

    def _insert(self, entry: _Entry) -> None:
        pid = entry.info.pid
        if self._exited.pop(pid, None) is not None:
            self._class_unknown.discard(pid)  # the retired process's; the caller marks the new one
        self._missing.discard(pid)
        self._live[pid] = entry
        self._untrack(pid)
        self._track(entry.info)
        if len(self._live) > self.max_processes:
            self._shrink()

    def _forget_id(self, task_id: int) -> None:
        """A new task took ``task_id``: whatever held that id before is gone."""
        gone = self._live.pop(task_id, None)
        if gone is not None and not gone.late_seed:
            self._counts["pid_reused"] += 1
        self._exited.pop(task_id, None)
        self._gone(task_id)
        self._unmap_thread(task_id)
        self._missing.discard(task_id)

    def _map_thread(self, tid: int, tgid: int) -> None:
        if tid in self._threads:
            self._unmap_thread(tid)
        self._threads[tid] = tgid
        entry = self._live.get(tgid)
        if entry is not None:
            entry.threads += 1
        if len(self._threads) > self.max_threads:
            # Exits were lost: forget the oldest mapping.
            self._unmap_thread(next(iter(self._threads)))
            self._counts["evicted"] += 1

    def _unmap_thread(self, tid: int) -> None:
        tgid = self._threads.pop(tid, None)
        if tgid is None:
            return
        entry = self._live.get(tgid)
        if entry is None or entry.threads <= 0:
            return
        entry.threads -= 1
        if entry.threads == 0 and entry.leader_exited:
            self._retire(tgid, entry.exit_ns)

    def _retire(self, pid: int, exit_ns: int) -> None:
        entry = self._live.pop(pid, None)
        if entry is None:
            return
        entry.exit_ns = exit_ns
        self._exited[pid] = entry
        if len(self._exited) > self.max_exited:
            old_pid, _old = self._exited.popitem(last=False)
            self._gone(old_pid)
            self._counts["exited_evicted"] += 1

    def _shrink(self) -> None:
        """Over the bound (exits were lost): drop the dead, then the oldest, down to 7/8 of it."""
        self._counts["sweeps"] += 1
        for pid, entry in list(self._live.items()):
            start = self._reader.read_start_ns(pid)
            known_start = entry.info.start_ns
            if start is None or (known_start and not self._same_start(start, known_start)):
                del self._live[pid]
                self._gone(pid)
                self._counts["evicted"] += 1
        target = self.max_processes * 7 // 8
        while len(self._live) > target:
            pid = next(iter(self._live))
            del self._live[pid]
            self._gone(pid)
            self._counts["evicted"] += 1

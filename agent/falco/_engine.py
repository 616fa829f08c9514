"""Evaluator: keeps per-process fd tables and cwd from the event stream and runs the rules indexed by
event type on every DetailEvent."""

from __future__ import annotations

import os
import posixpath
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from agent.events import DetailEvent, ProcEvent
from agent.falco._compiler import PREDICATE_SOURCE
from agent.falco._flags import AT_FDCWD
from agent.falco._ruleset import CompiledRule, RuleSet
from agent.falco._state import (
    AnomalyLookup,
    ContainerLookup,
    Ctx,
    FdInfo,
    file_fd,
    socket_fd,
    socket_name,
)
from agent.proc.info import ProcessInfo, ProcessLookup


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """One alert: a rule whose condition held for one event, with its rendered output (Falco's shape)."""

    rule: str
    priority: str
    output: str
    output_fields: dict[str, Any]
    tags: tuple[str, ...]
    source: str
    time_ns: int
    pid: int
    tid: int


_O_CLOEXEC = os.O_CLOEXEC
_O_DIRECTORY = os.O_DIRECTORY
_OPENS = ("open", "openat", "openat2", "creat")
_L4: dict[int, str] = {int(socket.SOCK_STREAM): "tcp", int(socket.SOCK_DGRAM): "udp", int(socket.SOCK_RAW): "raw",
                        int(socket.SOCK_SEQPACKET): "tcp"}
_FAMILY_TYPE: dict[int, str] = {int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6",
                                int(socket.AF_UNIX): "unix", int(socket.AF_NETLINK): "netlink"}
_EXECS = frozenset(("execve", "execveat"))
# What the kernel names an exec of an open fd: execveat(fd, "", AT_EMPTY_PATH) is "/dev/fd/N".
_FD_PATH = re.compile(r"^/(?:dev/fd|proc/(?:self|\d+)/fd)/(\d+)$")
MAX_FDS_PER_PROCESS = 4096  # a bound on memory for processes we never see close their fds


def _normalize(path: str) -> str:
    if path.startswith("/") and "/." not in path and "//" not in path and (len(path) == 1 or path[-1] != "/"):
        return path  # already canonical: the common case, no work
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


class Engine:
    """Evaluates a RuleSet over the detail stream. Not thread-safe: one engine per pipeline thread."""

    def __init__(
        self,
        ruleset: RuleSet,
        lookup: ProcessLookup,
        anomaly_lookup: AnomalyLookup | None = None,
        hostname: str | None = None,
        container_lookup: ContainerLookup | None = None,
        boot_to_wall_ns: int | None = None,
        exec_origin_lookup: AnomalyLookup | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.lookup = lookup
        self.anomaly_lookup = anomaly_lookup
        # pid -> the model's view of the process as it was before its latest exec, when that was anomalous
        self.exec_origin_lookup = exec_origin_lookup
        self.container_lookup = container_lookup
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.boot_to_wall_ns = boot_to_wall_ns if boot_to_wall_ns is not None else time.time_ns() - time.monotonic_ns()
        self.first = ruleset.rule_matching == "first"
        self._fds: dict[int, dict[int, FdInfo]] = {}
        self._cwd: dict[int, str] = {}
        self._stat_cache: dict[tuple[int, int], os.stat_result | None] = {}
        self._memfd_execs: set[int] = set()  # pids whose pending exec runs a memfd (seen before its fds go)
        self._num = 0
        self._ctx = Ctx(self)
        self.eval_errors = 0
        # Event-type index: each type's (predicate, rule) pairs in file order, the predicate specialised for
        # that type; types no rule names get the catch-all rules (those without an evt.type filter).
        self._catch_all: tuple[tuple[Callable[[Ctx], bool], CompiledRule], ...] = tuple(
            (c.fn, c) for c in ruleset.compiled if c.rule.evttypes is None)
        by_type: dict[str, list[tuple[Callable[[Ctx], bool], CompiledRule]]] = {}
        for c in ruleset.compiled:
            for t in c.rule.evttypes or ():
                by_type.setdefault(t, [])
        for c in ruleset.compiled:
            if c.rule.evttypes is None:
                for entries in by_type.values():
                    entries.append((c.fn, c))
            else:
                for t in c.rule.evttypes:
                    fn = c.by_type.get(t)
                    if fn is not None:
                        by_type[t].append((fn, c))
        self._index = {t: tuple(v) for t, v in by_type.items()}
        self._combined = {t: f for t, v in self._index.items() if (f := combine_predicates(t, v)) is not None}

    # ------------------------------------------------------------------ state the fields read
    def cwd_of(self, proc: ProcessInfo) -> str:
        return self._cwd.get(proc.pid) or proc.cwd

    def fd_types(self, pid: int) -> tuple[str, ...]:
        table = self._fds.get(pid, {})
        return tuple(table[n].type for n in sorted(table))

    def fd_type(self, pid: int, num: int) -> str | None:
        fd = self._fds.get(pid, {}).get(num)
        return fd.type if fd is not None else None

    def exe_stat(self, proc: ProcessInfo) -> os.stat_result | None:
        key = (proc.pid, proc.start_ns)
        if key not in self._stat_cache:
            st = None
            for path in (f"/proc/{proc.pid}/exe", proc.exe):
                if not path:
                    continue
                try:
                    st = os.stat(path)
                    break
                except OSError:
                    continue
            if len(self._stat_cache) > 4096:
                self._stat_cache.clear()
            self._stat_cache[key] = st
        return self._stat_cache[key]

    # ------------------------------------------------------------------ process events
    def on_proc_event(self, ev: ProcEvent) -> None:
        if ev.kind == "fork":
            if ev.is_thread:
                return
            parent = self._fds.get(ev.ppid)
            if parent is not None:
                self._fds[ev.pid] = dict(parent)
            if ev.ppid in self._cwd:
                self._cwd[ev.pid] = self._cwd[ev.ppid]
        elif ev.kind == "exec":
            table = self._fds.get(ev.pid)
            # A short-lived program may be gone before /proc tells the table it ran from a memfd: the fd it
            # was exec'd through says so (and a close-on-exec memfd is only still in the table right now).
            m = _FD_PATH.match(ev.filename) if table else None
            if m is not None and table is not None:
                fd = table.get(int(m.group(1)))
                if fd is not None and fd.type == "memfd":
                    self._memfd_execs.add(ev.pid)
            if table:
                for num in [n for n, fd in table.items() if fd.cloexec]:
                    del table[num]
        elif ev.kind == "exit" and ev.tid == ev.pid:
            self._fds.pop(ev.pid, None)
            self._cwd.pop(ev.pid, None)
            self._memfd_execs.discard(ev.pid)

    # ------------------------------------------------------------------ detail events
    def evaluate(self, ev: DetailEvent) -> list[RuleMatch]:
        """Update the fd/cwd state with ``ev``, then return the rules it matches (file order)."""
        self._num += 1
        syscall = ev.syscall
        handler = _HANDLERS.get(syscall)
        fd = handler(self, ev) if handler is not None else None
        rules = self._index.get(syscall, self._catch_all)
        if not rules:
            return []
        ctx = self._ctx
        proc = self.lookup(ev.tgid)
        if syscall in _EXECS and self._memfd_execs and ev.tgid in self._memfd_execs:
            self._memfd_execs.discard(ev.tgid)
            if proc is not None and not proc.exe_from_memfd and ev.res == 0:
                proc = replace(proc, exe_from_memfd=True)
        ctx.reset(ev, proc, fd, self._num)
        combined = self._combined.get(syscall)
        try:  # the common path: no rule raises
            hits = combined(ctx) if combined is not None else [cr for fn, cr in rules if fn(ctx)]
        except Exception:  # a rule must never take the pipeline down: retry one by one, skip the faulty
            hits = self._guarded(rules, ctx)
        if not hits:
            return []
        if self.first:
            hits = hits[:1]
        return [self._match(cr, ctx) for cr in hits]

    def _guarded(self, rules: tuple[tuple[Callable[[Ctx], bool], CompiledRule], ...], ctx: Ctx) -> list[CompiledRule]:
        hits = []
        for fn, cr in rules:
            try:
                if fn(ctx):
                    hits.append(cr)
            except Exception:
                self.eval_errors += 1
        return hits

    def _match(self, cr: CompiledRule, ctx: Ctx) -> RuleMatch:
        text, fields = cr.output.render(ctx)
        ev = ctx.ev
        rule = cr.rule
        stamp = time.strftime("%H:%M:%S", time.localtime((ev.ts + self.boot_to_wall_ns) // 1_000_000_000))
        frac = (ev.ts + self.boot_to_wall_ns) % 1_000_000_000
        return RuleMatch(rule.name, rule.priority, f"{stamp}.{frac:09d}: {rule.priority} {text}", fields,
                         rule.tags, rule.source, ev.ts, ev.tgid, ev.tid)

    # ------------------------------------------------------------------ fd table helpers
    def _table(self, pid: int) -> dict[int, FdInfo]:
        table = self._fds.get(pid)
        if table is None:
            table = self._fds[pid] = {}
        return table

    def _put(self, pid: int, fd: FdInfo) -> None:
        table = self._fds.get(pid)
        if table is None:
            table = self._fds[pid] = {}
        table[fd.num] = fd
        if len(table) > MAX_FDS_PER_PROCESS:
            del table[next(iter(table))]

    def _get(self, pid: int, num: Any) -> FdInfo | None:
        if not isinstance(num, int):
            return None
        table = self._fds.get(pid)
        return table.get(num) if table is not None else None

    def _base(self, ev: DetailEvent, dirfd: Any) -> str:
        if isinstance(dirfd, int) and dirfd != AT_FDCWD:
            d = self._get(ev.tgid, dirfd)
            return d.name if d is not None else ""
        cwd = self._cwd.get(ev.tgid)
        if cwd is None:
            proc = self.lookup(ev.tgid)
            cwd = proc.cwd if proc is not None else ""
        return cwd

    def resolve(self, ev: DetailEvent, path: Any, dirfd: Any = AT_FDCWD) -> tuple[str, str]:
        """(fd.name, fd.nameraw) of a path as passed: joined to the cwd or dirfd, then normalized."""
        if not isinstance(path, str):
            return "", ""
        if path.startswith("/"):
            raw = path
        else:
            base = self._base(ev, dirfd)
            raw = (base.rstrip("/") + "/" + path) if base else path
        return (_normalize(raw) if raw.startswith("/") else raw), raw


def combine_predicates(
    evttype: str, entries: tuple[tuple[Callable[[Ctx], bool], CompiledRule], ...]
) -> Callable[[Ctx], list[CompiledRule]] | None:
    """One function testing every rule of an event type in order (one call per event instead of one per
    rule); None when a predicate has no generated source to merge."""
    if len(entries) < 2:
        return None
    ns: dict[str, Any] = {}
    lines = ["def rules_" + re.sub(r"\W", "_", evttype) + "(c):", "    ev = c.ev", "    fd = c.fd", "    p = c.proc",
             "    hits = []"]
    for i, (fn, cr) in enumerate(entries):
        source = getattr(fn, PREDICATE_SOURCE, None)
        if source is None:
            return None
        expression, fn_ns = source
        ns.update(fn_ns)  # the generator's names are unique across predicates
        ns[f"rule_{i}"] = cr
        lines.append(f"    if {expression}:\n        hits.append(rule_{i})")
    lines.append("    return hits")
    exec(compile("\n".join(lines) + "\n", f"<falco rules for {evttype}>", "exec"), ns)
    fn_out: Callable[[Ctx], list[CompiledRule]] = ns["rules_" + re.sub(r"\W", "_", evttype)]
    return fn_out


# ---------------------------------------------------------------------- per-syscall state handlers
_new_fd = tuple.__new__  # FdInfo built positionally, without NamedTuple.__new__'s argument handling
_NO_SOCKET = ("", None, None, None, None, False, False, False)  # l4proto .. name_changed of a file fd


def _h_open(eng: Engine, ev: DetailEvent) -> FdInfo:
    # The hottest handler (most detail events are opens): file_fd() and _put() inlined.
    args = ev.args
    path = args.get("name")
    if isinstance(path, str) and path.startswith("/"):
        raw = path
        name = _normalize(path)
    else:
        name, raw = eng.resolve(ev, path, args.get("dirfd", AT_FDCWD))
    flags = args.get("flags", 0) if ev.syscall != "creat" else os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    if not isinstance(flags, int):
        flags = 0
    head, sep, tail = name.rpartition("/")
    directory: str | None
    if flags & _O_DIRECTORY:
        kind, typechar, directory = "directory", "d", name.rstrip("/") or "/"
    else:
        kind, typechar, directory = "file", "f", (head or "/") if sep else None
    res = ev.res
    fd: FdInfo = _new_fd(FdInfo, (res if res >= 0 else -1, kind, name, raw, *_NO_SOCKET,
                                  res >= 0 and bool(flags & _O_CLOEXEC), 0, flags, typechar, directory,
                                  tail if name else None))
    if res >= 0:
        fds = eng._fds
        table = fds.get(ev.tgid)
        if table is None:
            table = fds[ev.tgid] = {}
        table[res] = fd
        if len(table) > MAX_FDS_PER_PROCESS:
            del table[next(iter(table))]
    return fd


def _h_socket(eng: Engine, ev: DetailEvent) -> FdInfo | None:
    domain = ev.args.get("domain", 0)
    stype = ev.args.get("type", 0)
    stype = stype if isinstance(stype, int) else 0
    kind = _FAMILY_TYPE.get(domain, "socket") if isinstance(domain, int) else "socket"
    l4 = _L4.get(stype & 0xF, "") if kind in ("ipv4", "ipv6") else ""
    if kind in ("ipv4", "ipv6") and ev.args.get("proto") == 1:
        l4 = "icmp"
    fd = socket_fd(ev.res if ev.res >= 0 else -1, kind, l4, stype, bool(stype & _O_CLOEXEC))
    if ev.res >= 0:
        eng._put(ev.tgid, fd)
    return fd


def _sock_for(eng: Engine, ev: DetailEvent) -> FdInfo:
    """The socket fd an address event is about; made up from the family when we never saw its socket()."""
    num = ev.args.get("fd")
    fd = eng._get(ev.tgid, num)
    family = ev.args.get("family")
    kind = _FAMILY_TYPE.get(family, "socket") if isinstance(family, int) else "socket"
    # A file or directory entry is stale: its close was not traced (a rule set that needs no close leaves
    # fd 3 a file long after the file was closed and fd 3 became this socket). A socket of another family
    # stays (an AF_INET6 UDP socket may connect to an AF_INET address).
    if fd is None or (kind != "socket" and fd.type in ("file", "directory")):
        fd = socket_fd(num if isinstance(num, int) else -1, kind, "tcp" if kind in ("ipv4", "ipv6") else "")
    return fd


def _addr(ev: DetailEvent) -> tuple[str | None, int | None]:
    addr = ev.args.get("addr")
    port = ev.args.get("port")
    return (addr if isinstance(addr, str) and addr else None), (port if isinstance(port, int) else None)


def _h_connect(eng: Engine, ev: DetailEvent) -> FdInfo:
    fd = _sock_for(eng, ev)
    addr, port = _addr(ev)
    if fd.type == "unix":
        fd = fd._replace(name=addr or fd.name, nameraw=addr or fd.nameraw, connected=ev.res >= 0)
    elif addr is not None:
        fd = fd._replace(rip=addr, rport=port, is_server=False, connected=ev.res >= 0 or ev.res == -115)
        fd = fd._replace(name=socket_name(fd))
    if fd.num >= 0 and fd.type != "socket":
        eng._put(ev.tgid, fd)
    return fd


def _h_bind(eng: Engine, ev: DetailEvent) -> FdInfo:
    fd = _sock_for(eng, ev)
    addr, port = _addr(ev)
    if fd.type == "unix":
        fd = fd._replace(name=addr or "", nameraw=addr or "")
    elif addr is not None:
        fd = fd._replace(lip=addr, lport=port, is_server=True)
        fd = fd._replace(name=socket_name(fd))
    if ev.res >= 0 and fd.num >= 0:
        eng._put(ev.tgid, fd)
    return fd


def _h_listen(eng: Engine, ev: DetailEvent) -> FdInfo | None:
    fd = eng._get(ev.tgid, ev.args.get("fd"))
    if fd is not None and ev.res >= 0 and not fd.is_server:
        fd = fd._replace(is_server=True)
        eng._put(ev.tgid, fd)
    return fd


def _cloexec(ev: DetailEvent) -> bool:
    """Whether the call's ``flags`` argument (accept4, dup3) asks for close-on-exec."""
    flags = ev.args.get("flags", 0)
    return isinstance(flags, int) and bool(flags & _O_CLOEXEC)


def _h_accept(eng: Engine, ev: DetailEvent) -> FdInfo | None:
    listener = _sock_for(eng, ev)
    addr, port = _addr(ev)
    fd = listener._replace(num=ev.res if ev.res >= 0 else -1, rip=addr, rport=port, is_server=True,
                           connected=ev.res >= 0, name_changed=False, cloexec=_cloexec(ev))
    if fd.is_ip:
        fd = fd._replace(name=socket_name(fd))
    if ev.res >= 0:
        eng._put(ev.tgid, fd)
    return fd


def _h_sendto(eng: Engine, ev: DetailEvent) -> FdInfo | None:
    fd = eng._get(ev.tgid, ev.args.get("fd"))
    addr, port = _addr(ev)
    if fd is None:
        if addr is None:
            return None
        fd = _sock_for(eng, ev)
        if fd.is_ip:
            fd = fd._replace(l4proto="udp")
    if addr is None or not fd.is_ip:
        if fd.name_changed:
            fd = fd._replace(name_changed=False)
            eng._put(ev.tgid, fd)
        return fd
    changed = (addr, port) != (fd.rip, fd.rport)
    fd = fd._replace(rip=addr, rport=port, name_changed=changed, is_server=False)
    fd = fd._replace(name=socket_name(fd))
    if fd.num >= 0:
        eng._put(ev.tgid, fd)
    return fd


def _h_dup(eng: Engine, ev: DetailEvent) -> FdInfo | None:
    old = eng._get(ev.tgid, ev.args.get("oldfd"))
    if old is not None and ev.res >= 0:
        eng._put(ev.tgid, old._replace(num=ev.res, cloexec=_cloexec(ev)))
    return old


def _h_close(eng: Engine, ev: DetailEvent) -> FdInfo | None:
    num = ev.args.get("fd")
    table = eng._fds.get(ev.tgid)
    if table is None or not isinstance(num, int):
        return None
    fd = table.get(num)
    if ev.res >= 0:
        table.pop(num, None)
    return fd


def _h_memfd(eng: Engine, ev: DetailEvent) -> FdInfo:
    name = f"memfd:{ev.args.get('name', '')}"
    flags = ev.args.get("flags", 0)
    fd = file_fd(ev.res if ev.res >= 0 else -1, "memfd", name, name,
                 cloexec=bool(flags & 1) if isinstance(flags, int) else False)
    if ev.res >= 0:
        eng._put(ev.tgid, fd)
    return fd


def _h_userfaultfd(eng: Engine, ev: DetailEvent) -> FdInfo:
    fd = socket_fd(ev.res if ev.res >= 0 else -1, "userfaultfd")
    if ev.res >= 0:
        eng._put(ev.tgid, fd)
    return fd


def _h_chdir(eng: Engine, ev: DetailEvent) -> None:
    if ev.res < 0:
        return
    if ev.syscall == "fchdir":
        d = eng._get(ev.tgid, ev.args.get("fd"))
        if d is not None and d.name:
            eng._cwd[ev.tgid] = d.name
        return
    name, _raw = eng.resolve(ev, ev.args.get("path"))
    if name.startswith("/"):
        eng._cwd[ev.tgid] = name


def _h_fd_arg(eng: Engine, ev: DetailEvent) -> FdInfo | None:
    return eng._get(ev.tgid, ev.args.get("fd"))


def _h_path_arg(key: str, dirkey: str | None) -> Callable[[Engine, DetailEvent], FdInfo | None]:
    """Syscalls on a path that set no fd: fd.name still names the file, as Falco does for them."""
    def handler(eng: Engine, ev: DetailEvent) -> FdInfo | None:
        path = ev.args.get(key)
        if not isinstance(path, str):
            return None
        name, raw = eng.resolve(ev, path, ev.args.get(dirkey, AT_FDCWD) if dirkey else AT_FDCWD)
        return file_fd(-1, "file", name, raw)

    return handler


_HANDLERS: dict[str, Callable[[Engine, DetailEvent], FdInfo | None]] = {
    "open": _h_open, "openat": _h_open, "openat2": _h_open, "creat": _h_open,
    "socket": _h_socket, "connect": _h_connect, "bind": _h_bind, "listen": _h_listen,
    "accept": _h_accept, "accept4": _h_accept, "sendto": _h_sendto, "sendmsg": _h_sendto,
    "dup": _h_dup, "dup2": _h_dup, "dup3": _h_dup, "close": _h_close,
    "memfd_create": _h_memfd, "userfaultfd": _h_userfaultfd, "chdir": _h_chdir, "fchdir": _h_chdir,
    "fchmod": _h_fd_arg, "fchown": _h_fd_arg, "finit_module": _h_fd_arg, "setns": _h_fd_arg,
    "unlink": _h_path_arg("path", None), "unlinkat": _h_path_arg("name", "dirfd"),
    "rename": _h_path_arg("oldpath", None), "renameat": _h_path_arg("oldpath", "olddirfd"),
    "renameat2": _h_path_arg("oldpath", "olddirfd"), "mkdir": _h_path_arg("path", None),
    "rmdir": _h_path_arg("path", None),
    "mkdirat": _h_path_arg("path", "dirfd"), "chmod": _h_path_arg("filename", None),
    "fchmodat": _h_path_arg("filename", "dirfd"),
}

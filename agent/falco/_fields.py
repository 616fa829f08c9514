"""The field table: every Falco field Sysgram can fill, its type, and how to extract it from a Ctx.

An extractor returns the value, or None when it is missing (which makes any comparison on it false, as in
Falco). ``mode`` says how a value is shaped: "single"; "list" (fd.types: a tuple, compared with in /
intersects); "any" (proc.aname without an index, fd.ip, fd.net...: a tuple of candidates, a comparison is
true when it holds for any of them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from agent.falco import _flags
from agent.falco._state import Ctx, FdInfo
from agent.proc.info import HOST_CONTAINER_ID, ProcessInfo

Extractor = Callable[[Ctx], Any]

# Field types: str, int, float, bool, ip (an address), net (an address compared against networks).
STRINGY = ("str",)


@dataclass(frozen=True, slots=True)
class FieldDef:
    name: str
    type: str
    make: Callable[[str | None], Extractor]
    arg: str = "none"  # none | opt | req | index (an integer argument)
    mode: str = "single"
    available: bool = True  # False: known to Falco, not filled by Sysgram (a warning; always missing)
    any_without_arg: bool = False  # proc.aname style: no argument means "any ancestor"
    list_without_arg: bool = False  # fd.types style: no argument means the whole list
    # An expression (of the locals c, ev, fd, p) the compiler may paste instead of calling the extractor (hot fields), given the
    # event type the rule is specialised for (None: any type); returning None means "call the extractor".
    inline: Callable[[str | None], str | None] | None = None
    nonnull: bool = False  # the inline expression is never None (no missing check needed)


FIELDS: dict[str, FieldDef] = {}


def _plain(name: str, typ: str, fn: Extractor, mode: str = "single") -> None:
    FIELDS[name] = FieldDef(name, typ, lambda _arg, fn=fn: fn, mode=mode)  # type: ignore[misc]


def _missing(_c: Ctx) -> None:
    return None


def _unavailable(name: str, typ: str = "str", arg: str = "none") -> None:
    FIELDS[name] = FieldDef(name, typ, lambda _arg: _missing, arg=arg, available=False)


# ---------------------------------------------------------------- evt.*
_BOOT_TO_WALL = time.time_ns() - time.monotonic_ns()


def _wall(c: Ctx) -> int:
    return c.ev.ts + c.engine.boot_to_wall_ns


def _fmt_time(ns: int, fmt: str, frac: bool) -> str:
    sec, rem = divmod(ns, 1_000_000_000)
    base = time.strftime(fmt, time.localtime(sec))
    return f"{base}.{rem:09d}" if frac else base


def _evt_args(c: Ctx) -> str:
    ev = c.ev
    parts = [f"{k}={_flags.render_arg(ev.syscall, k, v)}" for k, v in ev.args.items()]
    return " ".join([f"res={ev.res}", *parts])


def _open_flags(c: Ctx) -> int | None:
    ev = c.ev
    if ev.syscall in ("open", "openat", "openat2"):
        flags = ev.args.get("flags")
        return flags if isinstance(flags, int) else None
    if ev.syscall == "creat":
        return os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    return None


def _is_open_read(c: Ctx) -> bool:
    f = _open_flags(c)
    return f is not None and (f & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)


def _is_open_write(c: Ctx) -> bool:
    f = _open_flags(c)
    return f is not None and (f & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)


def _is_open_create(c: Ctx) -> bool:
    f = _open_flags(c)
    return f is not None and bool(f & os.O_CREAT)


def _is_open_exec(c: Ctx) -> bool:
    f = _open_flags(c)
    return f is not None and bool(f & 0o40)  # __FMODE_EXEC, as the kernel passes it for exec opens


def _exe_flags(proc: ProcessInfo) -> int:
    return (1 if proc.exe_writable else 0) | (2 if proc.exe_upper_layer else 0) | (4 if proc.exe_from_memfd else 0)


def _arg_value(c: Ctx, name: str, raw: bool) -> Any:
    ev = c.ev
    args = ev.args
    if name.isdigit():
        keys = list(args)
        idx = int(name)
        if idx >= len(keys):
            return None
        name = keys[idx]
    v: Any
    if name == "flags" and ev.syscall == "execveat" and c.proc is not None:
        v = _exe_flags(c.proc)  # Falco's execveat exit carries the exe flags; the AT_* flags are the entry's
    elif name in args:
        v = args[name]
    elif name == "res" or (name in ("fd", "res_or_fd") and ev.syscall in ("open", "openat", "openat2", "creat", "socket", "accept",
                                                       "accept4", "memfd_create", "userfaultfd")):
        v = ev.res
    elif name == "flags" and ev.syscall in ("execve", "execveat") and c.proc is not None:
        v = _exe_flags(c.proc)
    elif name == "exe" and ev.syscall in ("execve", "execveat"):
        v = args.get("filename")
    elif name == "args" and ev.syscall in ("execve", "execveat"):
        argv = args.get("argv")
        v = " ".join(argv[1:]) if isinstance(argv, list | tuple) else None
    else:
        return None
    if v is None:
        return None
    if raw:
        return v
    return _flags.render_arg(ev.syscall, name, v)


def _make_arg(raw: bool) -> Callable[[str | None], Extractor]:
    def make(arg: str | None) -> Extractor:
        name = arg or ""
        return lambda c: _arg_value(c, name, raw)

    return make


_plain("evt.type", "str", lambda c: c.ev.syscall)
_plain("evt.dir", "str", lambda c: "<")
_plain("evt.num", "int", lambda c: c.num)
_plain("evt.source", "str", lambda c: "syscall")
_plain("evt.time", "str", lambda c: _fmt_time(_wall(c), "%H:%M:%S", True))
_plain("evt.time.s", "str", lambda c: _fmt_time(_wall(c), "%H:%M:%S", False))
_plain("evt.time.iso8601", "str", lambda c: _fmt_time(_wall(c), "%Y-%m-%dT%H:%M:%S", True) + "Z")
_plain("evt.datetime", "str", lambda c: _fmt_time(_wall(c), "%Y-%m-%d %H:%M:%S", True))
_plain("evt.datetime.s", "str", lambda c: _fmt_time(_wall(c), "%Y-%m-%d %H:%M:%S", False))
_plain("evt.rawtime", "int", _wall)
_plain("evt.rawtime.s", "int", lambda c: _wall(c) // 1_000_000_000)
_plain("evt.rawtime.ns", "int", lambda c: _wall(c) % 1_000_000_000)
_plain("evt.args", "str", _evt_args)
_plain("evt.res", "str", lambda c: _flags.errno_name(c.ev.res))
_plain("evt.rawres", "int", lambda c: c.ev.res)
_plain("evt.failed", "bool", lambda c: c.ev.res < 0)
_plain("evt.is_open_read", "bool", _is_open_read)
_plain("evt.is_open_write", "bool", _is_open_write)
_plain("evt.is_open_exec", "bool", _is_open_exec)
_plain("evt.is_open_create", "bool", _is_open_create)
_plain("evt.hostname", "str", lambda c: c.engine.hostname)
_plain("evt.latency", "int", lambda c: 0)
_plain("evt.count", "int", lambda c: 1)
_plain("evt.pluginname", "str", _missing)
FIELDS["evt.arg"] = FieldDef("evt.arg", "str", _make_arg(False), arg="req")
FIELDS["evt.rawarg"] = FieldDef("evt.rawarg", "str", _make_arg(True), arg="req")
_unavailable("evt.buffer")
_unavailable("evt.cpu", "int")
_unavailable("evt.info")


# ---------------------------------------------------------------- proc.* / thread.* / user.* / group.*
def _p(attr: Callable[[ProcessInfo], Any]) -> Extractor:
    def get(c: Ctx) -> Any:
        p = c.proc
        return attr(p) if p is not None else None

    return get


def _pp(attr: Callable[[ProcessInfo], Any]) -> Extractor:
    def get(c: Ctx) -> Any:
        p = c.parent()
        return attr(p) if p is not None else None

    return get


def _num(v: int) -> int | None:
    return v if v >= 0 else None


def _str(v: str) -> str | None:
    return v if v else None


def falco_exepath(exe: str) -> str | None:
    """An executable path as Falco shows it. A memfd's link reads ``/memfd:NAME (deleted)``; Falco shows
    ``memfd:NAME``, which upstream exceptions match (``memfd:runc_cloned:/proc/self/exe``, runc's re-exec)."""
    if exe.startswith("/memfd:"):
        return exe[1:].removesuffix(" (deleted)")
    return exe or None


def _exe(p: ProcessInfo) -> str | None:
    return p.args[0] if p.args else (p.comm or None)


def _pargs(p: ProcessInfo) -> str:
    return " ".join(p.args[1:])


def _duration(c: Ctx, p: ProcessInfo | None) -> int | None:
    if p is None or p.start_ns <= 0:
        return None
    return max(0, c.ev.ts - p.start_ns)


def _cwd(c: Ctx) -> str | None:
    p = c.proc
    if p is None:
        return None
    cwd = c.engine.cwd_of(p)
    if not cwd:
        return None
    return cwd if cwd.endswith("/") else cwd + "/"


def _vpid(c: Ctx) -> int | None:
    p = c.proc
    return p.pid if p is not None and p.container_id == HOST_CONTAINER_ID else None


def _lookup_attr(key: Callable[[ProcessInfo], int], attr: Callable[[ProcessInfo], Any]) -> Extractor:
    def get(c: Ctx) -> Any:
        p = c.proc
        if p is None:
            return None
        n = key(p)
        if n <= 0:
            return None
        other = p if n == p.pid else c.engine.lookup(n)
        return attr(other) if other is not None else None

    return get


_CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)


def caps_text(mask: int) -> str:
    return " ".join(name for bit, name in enumerate(_CAP_NAMES) if mask >> bit & 1)


def _exe_stat(c: Ctx) -> os.stat_result | None:
    p = c.proc
    return c.engine.exe_stat(p) if p is not None else None


def _stat_field(fn: Callable[[os.stat_result], int]) -> Extractor:
    def get(c: Ctx) -> int | None:
        st = _exe_stat(c)
        return fn(st) if st is not None else None

    return get


def _ctime_since_start(c: Ctx) -> int | None:
    st = _exe_stat(c)
    p = c.proc
    if st is None or p is None or p.start_ns <= 0:
        return None
    return st.st_ctime_ns - (p.start_ns + c.engine.boot_to_wall_ns)


for _name, _fn in {
    "proc.name": _p(lambda p: _str(p.comm)),
    "proc.exe": _p(_exe),
    "proc.exepath": _p(lambda p: falco_exepath(p.exe)),
    "proc.cmdline": _p(lambda p: p.cmdline or None),
    "proc.args": _p(_pargs),
    "proc.pname": _pp(lambda p: _str(p.comm)),
    "proc.pexe": _pp(_exe),
    "proc.pexepath": _pp(lambda p: falco_exepath(p.exe)),
    "proc.pcmdline": _pp(lambda p: p.cmdline or None),
    "proc.cwd": _cwd,
    "proc.sname": _lookup_attr(lambda p: p.sid, lambda p: _str(p.comm)),
    "proc.sid.exe": _lookup_attr(lambda p: p.sid, _exe),
    "proc.sid.exepath": _lookup_attr(lambda p: p.sid, lambda p: falco_exepath(p.exe)),
    "proc.vpgid.name": _lookup_attr(lambda p: p.pgid, lambda p: _str(p.comm)),
    "proc.vpgid.exe": _lookup_attr(lambda p: p.pgid, _exe),
    "proc.vpgid.exepath": _lookup_attr(lambda p: p.pgid, lambda p: falco_exepath(p.exe)),
    "user.name": _p(lambda p: _str(p.user)),
    "user.loginname": _p(lambda p: _str(p.loginname)),
    "group.name": _p(lambda p: _str(p.group)),
    # Falco's container.id is the 12-character short id ("host" stays "host"); full_id is all 64.
    "container.id": _p(lambda p: p.container_id[:12] or None),
    "container.full_id": _p(lambda p: p.container_id or None),
}.items():
    _plain(_name, "str", _fn)

for _name, _fn in {
    "proc.pid": _p(lambda p: p.pid),
    "proc.ppid": _p(lambda p: _num(p.ppid)),
    "proc.vpid": _vpid,
    "proc.pvpid": lambda c: (c.proc.ppid if c.proc is not None and c.proc.container_id == HOST_CONTAINER_ID
                            else None),
    "proc.duration": lambda c: _duration(c, c.proc),
    "proc.ppid.duration": lambda c: _duration(c, c.parent()),
    "proc.tty": _p(lambda p: p.tty),
    "proc.sid": _p(lambda p: _num(p.sid)),
    "proc.vpgid": _p(lambda p: _num(p.pgid)),
    "proc.pgid": _p(lambda p: _num(p.pgid)),
    "proc.exe_ino": _stat_field(lambda st: st.st_ino),
    "proc.exe_ino.ctime": _stat_field(lambda st: st.st_ctime_ns),
    "proc.exe_ino.mtime": _stat_field(lambda st: st.st_mtime_ns),
    "proc.exe_ino.ctime_duration_proc_start": _ctime_since_start,
    "thread.tid": lambda c: c.ev.tid,
    "thread.vtid": lambda c: (c.ev.tid if c.proc is not None and c.proc.container_id == HOST_CONTAINER_ID
                             else None),
    "user.uid": _p(lambda p: _num(p.uid)),
    "user.loginuid": _p(lambda p: p.loginuid),
    "group.gid": _p(lambda p: _num(p.gid)),
}.items():
    _plain(_name, "int", _fn)

for _name, _fn in {
    "proc.is_vpgid_leader": _p(lambda p: p.pgid == p.pid if p.pgid > 0 else None),
    "proc.is_sid_leader": _p(lambda p: p.sid == p.pid if p.sid > 0 else None),
    "proc.is_exe_from_memfd": _p(lambda p: p.exe_from_memfd),
    "proc.is_exe_upper_layer": _p(lambda p: p.exe_upper_layer),
    "proc.is_exe_writable": _p(lambda p: p.exe_writable),
    "thread.ismain": lambda c: c.ev.tid == c.ev.tgid,
}.items():
    _plain(_name, "bool", _fn)

_plain("thread.cap_effective", "str", _p(lambda p: caps_text(p.cap_effective)))
_plain("thread.cap_permitted", "str", _p(lambda p: caps_text(p.cap_permitted)))
for _missing_name in ("thread.cap_inheritable", "proc.env", "user.homedir",
                      "user.shell", "proc.exe_ino.ctime_duration_pidns_start", "proc.pidns_init_start_ts"):
    _unavailable(_missing_name)
_unavailable("proc.env", "str", arg="opt")


def _ancestor_field(attr: Callable[[ProcessInfo], Any]) -> Callable[[str | None], Extractor]:
    def make(arg: str | None) -> Extractor:
        if arg is None:
            return lambda c: tuple(v for p in c.ancestors() if (v := attr(p)) is not None)
        n = int(arg)

        def get(c: Ctx) -> Any:
            p = c.ancestor(n)
            return attr(p) if p is not None else None

        return get

    return make


for _name, _typ, _attr in (
    ("proc.aname", "str", lambda p: _str(p.comm)),
    ("proc.apid", "int", lambda p: p.pid),
    ("proc.aexe", "str", _exe),
    ("proc.aexepath", "str", lambda p: falco_exepath(p.exe)),
    ("proc.acmdline", "str", lambda p: p.cmdline or None),
):
    FIELDS[_name] = FieldDef(_name, _typ, _ancestor_field(_attr), arg="index", any_without_arg=True)


# ---------------------------------------------------------------- fd.*
def _fd(attr: Callable[[FdInfo], Any]) -> Extractor:
    def get(c: Ctx) -> Any:
        fd = c.fd
        return attr(fd) if fd is not None else None

    return get


def _sock(attr: Callable[[FdInfo], Any]) -> Extractor:
    def get(c: Ctx) -> Any:
        fd = c.fd
        return attr(fd) if fd is not None and fd.is_ip else None

    return get


def _fd_directory(fd: FdInfo) -> str | None:
    return fd.directory if fd.type in ("file", "directory") else None


def _fd_filename(fd: FdInfo) -> str | None:
    return fd.filename if fd.type in ("file", "directory") else None


def _both(a: Callable[[FdInfo], Any], b: Callable[[FdInfo], Any]) -> Extractor:
    def get(c: Ctx) -> Any:
        fd = c.fd
        if fd is None or not fd.is_ip:
            return None
        return tuple(v for v in (a(fd), b(fd)) if v is not None)

    return get


def _fd_types(arg: str | None) -> Extractor:
    def all_types(c: Ctx) -> tuple[str, ...] | None:
        p = c.proc
        return c.engine.fd_types(p.pid) if p is not None else None

    if arg is None or arg == "":
        return all_types
    n = int(arg)

    def one(c: Ctx) -> str | None:
        p = c.proc
        return c.engine.fd_type(p.pid, n) if p is not None else None

    return one


for _name, _fn in {
    "fd.name": _fd(lambda f: f.name or None),
    "fd.nameraw": _fd(lambda f: f.nameraw or f.name or None),
    "fd.directory": _fd(_fd_directory),
    "fd.filename": _fd(_fd_filename),
    "fd.typechar": _fd(lambda f: f.typechar),
    "fd.type": _fd(lambda f: f.type),
    "fd.l4proto": _sock(lambda f: f.l4proto or None),
    "fd.sockfamily": _fd(lambda f: "ip" if f.is_ip else "unix" if f.type == "unix" else None),
    "fd.containername": lambda c: (f"{c.proc.container_id}:{c.fd.name}" if c.fd is not None and c.proc is not None
                                   else None),
    "fd.containerdirectory": lambda c: (f"{c.proc.container_id}:{d}" if c.fd is not None and c.proc is not None
                                        and (d := _fd_directory(c.fd)) else None),
    "fd.cip.name": _missing, "fd.sip.name": _missing, "fd.lip.name": _missing, "fd.rip.name": _missing,
}.items():
    _plain(_name, "str", _fn)

_plain("fd.num", "int", _fd(lambda f: f.num))
for _name, _fn in {"fd.sport": _sock(lambda f: f.sport), "fd.cport": _sock(lambda f: f.cport),
                   "fd.lport": _sock(lambda f: f.lport), "fd.rport": _sock(lambda f: f.rport)}.items():
    _plain(_name, "int", _fn)
for _name, _fn in {"fd.sip": _sock(lambda f: f.sip), "fd.cip": _sock(lambda f: f.cip),
                   "fd.lip": _sock(lambda f: f.lip), "fd.rip": _sock(lambda f: f.rip)}.items():
    _plain(_name, "ip", _fn)
for _name, _fn in {"fd.snet": _sock(lambda f: f.sip), "fd.cnet": _sock(lambda f: f.cip),
                   "fd.lnet": _sock(lambda f: f.lip), "fd.rnet": _sock(lambda f: f.rip)}.items():
    _plain(_name, "net", _fn)
_plain("fd.ip", "ip", _both(lambda f: f.cip, lambda f: f.sip), mode="any")
_plain("fd.port", "int", _both(lambda f: f.cport, lambda f: f.sport), mode="any")
_plain("fd.net", "net", _both(lambda f: f.cip, lambda f: f.sip), mode="any")
_plain("fd.proto", "int", _missing)
for _name, _fn in {"fd.connected": _fd(lambda f: f.connected), "fd.name_changed": _fd(lambda f: f.name_changed),
                   "fd.is_server": _sock(lambda f: f.is_server)}.items():
    _plain(_name, "bool", _fn)
FIELDS["fd.types"] = FieldDef("fd.types", "str", _fd_types, arg="index", list_without_arg=True)
for _missing_name in ("fd.ino", "fd.dev", "fd.dev.major", "fd.dev.minor", "fd.uid"):
    _unavailable(_missing_name, "int")


# ---------------------------------------------------------------- container.*
def _cinfo(attr: Callable[[Any], Any]) -> Extractor:
    def get(c: Ctx) -> Any:
        p = c.proc
        if p is None:
            return None
        info = c.container()
        if info is None:
            return attr(None) if p.container_id == HOST_CONTAINER_ID else None
        return attr(info)

    return get


_plain("container.name", "str", _cinfo(lambda i: "host" if i is None else i.name))
_plain("container.image", "str", _cinfo(lambda i: None if i is None else i.image))
_plain("container.image.repository", "str", _cinfo(lambda i: None if i is None else i.repository))
_plain("container.image.tag", "str", _cinfo(lambda i: None if i is None else i.tag))
_plain("container.image.id", "str", _cinfo(lambda i: None if i is None else i.image_id))
_plain("container.type", "str", _cinfo(lambda i: "host" if i is None else i.type))
_plain("container.privileged", "bool", _cinfo(lambda i: None if i is None else i.privileged))
_plain("container.start_ts", "int", _cinfo(lambda i: None if i is None else i.start_ts))
for _missing_name in ("container.mounts", "container.image.digest", "container.healthcheck",
                      "container.liveness_probe", "container.readiness_probe", "container.ip", "container.cni.json"):
    _unavailable(_missing_name)
for _missing_name in ("container.mount", "container.mount.dest", "container.mount.source",
                      "container.mount.mode", "container.mount.rdwr", "container.mount.propagation"):
    _unavailable(_missing_name, arg="req")

# ---------------------------------------------------------------- sysgram.*
# The process runs a 32-bit (i386) executable (its syscalls reach the rules by name, as a 64-bit one's do).
_plain("sysgram.proc.is_32bit", "bool", _p(lambda p: p.compat))
_plain("sysgram.anomaly.score", "float", lambda c: a.score if (a := c.anomaly()) is not None else None)
_plain("sysgram.anomaly.threshold", "float", lambda c: a.threshold if (a := c.anomaly()) is not None else None)
_plain("sysgram.anomaly.window", "str", lambda c: a.window if (a := c.anomaly()) is not None else None)
_plain("sysgram.anomaly.is_anomalous", "bool",
       lambda c: a.is_anomalous if (a := c.anomaly()) is not None else None)
_plain("sysgram.anomaly.new_syscalls", "str",
       lambda c: a.new_syscalls if (a := c.anomaly()) is not None else None)
_plain("sysgram.anomaly.spawner.is_anomalous", "bool",
       lambda c: a.is_anomalous if (a := c.spawner()) is not None else None)
_plain("sysgram.anomaly.spawner.score", "float", lambda c: a.score if (a := c.spawner()) is not None else None)
_plain("sysgram.anomaly.spawner.new_syscalls", "str",
       lambda c: a.new_syscalls if (a := c.spawner()) is not None else None)

# ---------------------------------------------------------------- inlined hot fields
OPEN_TYPES = ("open", "openat", "openat2", "creat")


def _open_inline(test: str) -> Callable[[str | None], str | None]:
    # For open events the state handler always sets c.fd with the open flags.
    def inline(evttype: str | None) -> str | None:
        if evttype is None:
            return None
        return f"({test})" if evttype in OPEN_TYPES else "False"

    return inline


_INLINE: dict[str, Callable[[str | None], str | None]] = {
    "evt.type": lambda t: repr(t) if t is not None else "ev.syscall",
    "evt.rawres": lambda t: "ev.res",
    "evt.dir": lambda t: "'<'",
    "fd.num": lambda t: "(fd.num if fd is not None else None)",
    "fd.name": lambda t: "((fd.name or None) if fd is not None else None)",
    "fd.nameraw": lambda t: "((fd.nameraw or fd.name or None) if fd is not None else None)",
    "fd.typechar": lambda t: "(fd.typechar if fd is not None else None)",
    "fd.type": lambda t: "(fd.type if fd is not None else None)",
    "fd.directory": lambda t: "(fd.directory if fd is not None and fd.type in _FILE_TYPES else None)",
    "fd.filename": lambda t: "(fd.filename if fd is not None and fd.type in _FILE_TYPES else None)",
    "proc.name": lambda t: "((p.comm or None) if p is not None else None)",
    "proc.exepath": lambda t: "(_exepath(p.exe) if p is not None else None)",
    "proc.cmdline": lambda t: "((p.cmdline or None) if p is not None else None)",
    "proc.tty": lambda t: "(p.tty if p is not None else None)",
    "user.name": lambda t: "((p.user or None) if p is not None else None)",
    "user.uid": lambda t: "(p.uid if p is not None and p.uid >= 0 else None)",
    "container.id": lambda t: "((p.container_id[:12] or None) if p is not None else None)",
    "evt.is_open_read": _open_inline("fd.flags & 3 != 1"),
    "evt.is_open_write": _open_inline("fd.flags & 3 != 0"),
    "evt.is_open_create": _open_inline(f"fd.flags & {os.O_CREAT} != 0"),
}
_NONNULL = ("evt.type", "evt.rawres", "evt.dir", "evt.is_open_read", "evt.is_open_write", "evt.is_open_create")
for _name, _inline in _INLINE.items():
    FIELDS[_name] = replace(FIELDS[_name], inline=_inline, nonnull=_name in _NONNULL)

# k8s.* comes from the k8s metadata plugin, which Sysgram does not have: every k8s.* field is missing.
K8S_PREFIX = "k8s."
DOTTED_ARG_PREFIXES = ("evt.arg.", "evt.rawarg.")


@dataclass(frozen=True, slots=True)
class BoundField:
    """A field name resolved against the table, with its argument checked."""

    fdef: FieldDef
    arg: str | None
    extractor: Extractor
    mode: str


class FieldError(Exception):
    pass


def bind_field(name: str, arg: str | None) -> BoundField:
    """Resolve ``name[arg]``; raises FieldError for unknown fields and bad arguments."""
    fdef = FIELDS.get(name)
    if fdef is None:
        for prefix in DOTTED_ARG_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix) and arg is None:
                fdef = FIELDS[prefix[:-1]]
                arg = name[len(prefix) :]
                break
        else:
            if name.startswith(K8S_PREFIX):
                return BoundField(FieldDef(name, "str", lambda _a: _missing), arg, _missing, "single")
            raise FieldError(f"unknown field '{name}'")
    if fdef.arg == "none" and arg is not None:
        raise FieldError(f"field '{name}' takes no argument")
    if fdef.arg == "req" and not arg:
        raise FieldError(f"field '{name}' needs an argument, e.g. {name}[...]")
    mode = fdef.mode
    if fdef.arg == "index":
        if arg is None or arg == "":
            if fdef.any_without_arg:
                mode = "any"
            elif fdef.list_without_arg:
                mode = "list"
            arg = None
        elif not arg.isdigit():
            raise FieldError(f"field '{name}' needs a numeric index, got '{arg}'")
    return BoundField(fdef, arg, fdef.make(arg), mode)

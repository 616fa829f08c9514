"""Which syscalls get details, which of their arguments are strings or addresses, and how each record is
decoded into a :class:`agent.events.DetailEvent` with Falco's argument names."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

import numpy as np

from agent.capture import _layout as L
from agent.capture.names import numbers_named, syscall_name, syscall_number
from agent.events import DetailEvent, KernelSignal, ProcEvent

NONE = 0xFF
COMPAT_SPEC_BASE = 512  # arg_spec rows of i386 numbers start here (bpf/sysgram.bpf.c)
LEN_PTR = 0xFE  # accept: the address length is written through a pointer
CLONE_THREAD = 0x00010000


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """``names``: Falco's name for each register argument (None: not reported)."""

    names: tuple[str | None, ...]
    str0: int = NONE
    str1: int = NONE
    sockaddr: int = NONE
    sockaddr_len: int = NONE
    deref: int = NONE
    deref_name: str = ""
    string_names: tuple[str, ...] = ()


def _s(names: str, str0: int = NONE, str1: int = NONE, **kw: int | str) -> ArgSpec:
    parts = tuple(None if n == "_" else n for n in names.split())
    strings = tuple(n for i, n in enumerate(parts) if i in (str0, str1) and n)
    return ArgSpec(parts, str0, str1, string_names=strings, **kw)  # type: ignore[arg-type]


# Decoding spec per syscall (by name; numbers come from libseccomp at load time).
SPECS: dict[str, ArgSpec] = {
    "open": _s("name flags mode", 0),
    "openat": _s("dirfd name flags mode", 1),
    "openat2": _s("dirfd name _ _", 1, deref=2, deref_name="flags"),
    "creat": _s("name mode", 0),
    "execve": _s("filename _ _", 0),
    "execveat": _s("dirfd filename _ _ flags", 1),
    "link": _s("oldpath newpath", 0, 1),
    "linkat": _s("olddir oldpath newdir newpath flags", 1, 3),
    "symlink": _s("target linkpath", 0, 1),
    "symlinkat": _s("target linkdirfd linkpath", 0, 2),
    "unlink": _s("path", 0),
    "unlinkat": _s("dirfd name flags", 1),
    "rename": _s("oldpath newpath", 0, 1),
    "renameat": _s("olddirfd oldpath newdirfd newpath", 1, 3),
    "renameat2": _s("olddirfd oldpath newdirfd newpath flags", 1, 3),
    "mkdir": _s("path mode", 0),
    "rmdir": _s("path", 0),
    "mkdirat": _s("dirfd path mode", 1),
    "chmod": _s("filename mode", 0),
    "fchmod": _s("fd mode"),
    "fchmodat": _s("dirfd filename mode", 1),
    "chown": _s("path uid gid", 0),
    "lchown": _s("path uid gid", 0),
    "fchown": _s("fd uid gid"),
    "fchownat": _s("dirfd pathname uid gid flags", 1),
    "chdir": _s("path", 0),
    "fchdir": _s("fd"),
    "socket": _s("domain type proto"),
    "connect": _s("fd _ _", sockaddr=1, sockaddr_len=2),
    "bind": _s("fd _ _", sockaddr=1, sockaddr_len=2),
    "listen": _s("fd backlog"),
    "accept": _s("fd _ _", sockaddr=1, sockaddr_len=LEN_PTR),
    "accept4": _s("fd _ _ flags", sockaddr=1, sockaddr_len=LEN_PTR),
    "sendto": _s("fd _ size _ _ _", sockaddr=4, sockaddr_len=5),
    "dup": _s("oldfd"),
    "dup2": _s("oldfd newfd"),
    "dup3": _s("oldfd newfd flags"),
    "close": _s("fd"),
    "ptrace": _s("request pid"),
    "setuid": _s("uid"),
    "setgid": _s("gid"),
    "setresuid": _s("ruid euid suid"),
    "setresgid": _s("rgid egid sgid"),
    "setns": _s("fd nstype"),
    "unshare": _s("flags"),
    "memfd_create": _s("name flags", 0),
    "init_module": _s("_ len uargs", 2),
    "finit_module": _s("fd uargs flags", 1),
    "mount": _s("dev dir type flags", 0, 1),
    "umount2": _s("name flags", 0),
    "bpf": _s("cmd"),
    "userfaultfd": _s("flags"),
    "kill": _s("pid sig"),
    "tkill": _s("tid sig"),
    "tgkill": _s("tgid tid sig"),
    "prctl": _s("option arg2"),
    "capset": _s(""),
    "mprotect": _s("addr length prot"),
    "pipe": _s(""),
    "pipe2": _s("_ flags"),
    "sendmsg": _s("fd"),
    "recvfrom": _s("fd"),
    "recvmsg": _s("fd"),
}
# Entries kept (not reported) so the fork handler can tell threads from processes.
CLONE_SPECS: dict[str, ArgSpec] = {
    "clone": _s("flags"),
    "clone3": _s("_", deref=0, deref_name="flags"),
    "fork": _s(""),
    "vfork": _s(""),
}
SIGNED_ARGS = frozenset(
    {
        "dirfd",
        "olddir",
        "newdir",
        "olddirfd",
        "newdirfd",
        "linkdirfd",
        "fd",
        "oldfd",
        "newfd",
        "pid",
        "tid",
        "tgid",
        "uid",
        "gid",
        "ruid",
        "euid",
        "suid",
        "rgid",
        "egid",
        "sgid",
    }
)


# i386 socketcall(call, args): each call number (linux/net.h: SYS_SOCKET = 1 ...) -> the direct syscall it
# stands for and how many arguments it passes (net/socket.c: nargs). accept, send and recv have no direct
# i386 syscall of their own: they are accept4, sendto and recvfrom with the extra arguments 0.
SOCKETCALL_CALLS: dict[int, tuple[str, int]] = {
    1: ("socket", 3), 2: ("bind", 3), 3: ("connect", 3), 4: ("listen", 2), 5: ("accept4", 3),
    6: ("getsockname", 3), 7: ("getpeername", 3), 8: ("socketpair", 4), 9: ("sendto", 4), 10: ("recvfrom", 4),
    11: ("sendto", 6), 12: ("recvfrom", 6), 13: ("shutdown", 2), 14: ("setsockopt", 5), 15: ("getsockopt", 5),
    16: ("sendmsg", 3), 17: ("recvmsg", 3), 18: ("accept4", 4), 19: ("recvmmsg", 5), 20: ("sendmmsg", 4),
}


def socketcall_table() -> dict[int, int]:
    """The socketcall_nrs map: call number -> its direct i386 syscall's number | argument count << 16."""
    out = {}
    for call, (name, nargs) in SOCKETCALL_CALLS.items():
        numbers = numbers_named({name}, compat=True)
        if numbers:
            out[call] = numbers[0] | nargs << 16
    return out


def spec_table(detail_syscalls: set[str]) -> tuple[np.ndarray, dict[int, str]]:
    """The arg_spec map's contents and the (number -> name) of every syscall whose tracepoints we attach.

    Rows 0-511 are native numbers; rows 512 + nr the i386 numbers of the same names (the BPF side keeps
    32-bit syscalls' details itself: no tracepoint is attached for them). An i386 syscall is found by its
    number's name (``numbers_named``), not by resolving the name.
    """
    table = np.zeros(2 * COMPAT_SPEC_BASE, dtype=L.ARG_SPEC)
    for field in ("str0", "str1", "sockaddr", "sockaddr_len", "deref_u64"):
        table[field] = NONE
    attached: dict[int, str] = {}
    for name, spec in [*((n, SPECS[n]) for n in sorted(detail_syscalls) if n in SPECS), *CLONE_SPECS.items()]:
        enabled = name in detail_syscalls
        native = syscall_number(name)
        rows = [native] if 0 <= native < COMPAT_SPEC_BASE else []
        # the same call under i386's names (setuid32 is what a 32-bit libc calls for setuid); accept comes
        # through socketcall as accept4 with no flags
        i386_names = {name, f"{name}32"} | ({"accept4"} if name == "accept" and "accept4" not in detail_syscalls
                                            else set())
        rows += [COMPAT_SPEC_BASE + nr for nr in numbers_named(i386_names, compat=True, below=COMPAT_SPEC_BASE)]
        for index in rows:
            row = table[index]
            row["str0"], row["str1"] = spec.str0, spec.str1
            row["sockaddr"], row["sockaddr_len"], row["deref_u64"] = spec.sockaddr, spec.sockaddr_len, spec.deref
            row["enabled"] = 1 if enabled else 0  # clone's entry is kept, not sent: the fork handler reads it
            row["kept"] = 1
            table[index] = row
            if index < COMPAT_SPEC_BASE:
                attached[index] = name
    return table, attached


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def decode_sockaddr(raw: bytes) -> dict[str, object]:
    if len(raw) < 2:
        return {}
    family = struct.unpack_from("<H", raw)[0]
    out: dict[str, object] = {"family": family}
    if family == socket.AF_INET and len(raw) >= 8:
        out["port"] = struct.unpack_from(">H", raw, 2)[0]
        out["addr"] = str(ipaddress.IPv4Address(raw[4:8]))
    elif family == socket.AF_INET6 and len(raw) >= 24:
        out["port"] = struct.unpack_from(">H", raw, 2)[0]
        out["addr"] = str(ipaddress.IPv6Address(raw[8:24]))
    elif family == socket.AF_UNIX:
        path = raw[2:]
        out["addr"] = ("@" + _cstr(path[1:])) if path[:1] == b"\0" else _cstr(path)
    return out


# Fixed parts of the detail records, unpacked in one call: numpy field access on a single record costs
# microseconds per field, and a busy host sends tens of thousands of detail records a second.
_HDR = "<BBHIIIQ"  # kind flags nr tgid tid aux ts
_SC_FIXED = struct.Struct(_HDR + "q6QQ3H")  # + ret args[6] deref len[3]
_EXEC_FIXED = struct.Struct(_HDR + "II")  # + argc argv_len
_PROC_FIXED = struct.Struct(_HDR + "QQ")  # + clone_flags, cgroup_id


def _offset(dtype: np.dtype, field: str) -> int:
    assert dtype.fields is not None
    return int(dtype.fields[field][1])


_SC_STR = _offset(L.SC_DETAIL, "str")
_EXEC_FILENAME = _offset(L.EXEC_ARGS, "filename")
_EXEC_ARGV = _offset(L.EXEC_ARGS, "argv")
_PROC_COMM = _offset(L.PROC_EVENT, "comm")
_PROC_FILENAME = _offset(L.PROC_EVENT, "filename")


def _str_at(raw: bytes, offset: int, size: int) -> str:
    end = raw.find(b"\0", offset, offset + size)
    return raw[offset : end if end >= 0 else offset + size].decode("utf-8", "surrogateescape")


def decode_detail(raw: bytes) -> DetailEvent:
    """A K_SYSCALL record (struct sc_detail) -> the decoded syscall at its exit."""
    _, flags, nr, tgid, tid, _, ts, ret, *rest = _SC_FIXED.unpack_from(raw)
    raw_args, deref, sockaddr_len = rest[:6], rest[6], rest[9]
    compat = bool(flags & L.DETAIL_COMPAT)
    name = syscall_name(nr, compat=compat)
    if compat and name.endswith("32") and name[:-2] in SPECS:
        name = name[:-2]  # setuid32 is the setuid a 32-bit program makes
    spec = SPECS.get(name)
    args: dict[str, object] = {}
    if spec is not None:
        for i, arg_name in enumerate(spec.names):
            if arg_name is None or i >= 6:
                continue
            if i == spec.str0:
                args[arg_name] = _str_at(raw, _SC_STR, L.STR_LEN)
            elif i == spec.str1:
                args[arg_name] = _str_at(raw, _SC_STR + L.STR_LEN, L.STR_LEN)
            elif arg_name in SIGNED_ARGS:
                args[arg_name] = _int32(raw_args[i])
            else:
                args[arg_name] = raw_args[i]
        if spec.deref_name:
            args[spec.deref_name] = deref
        if spec.sockaddr != NONE and sockaddr_len:
            start = _SC_STR + 2 * L.STR_LEN
            args.update(decode_sockaddr(raw[start : start + min(sockaddr_len, L.STR_LEN)]))
    return DetailEvent(
        ts=ts, tgid=tgid, tid=tid, syscall=name, nr=nr, res=ret, args=args, compat=compat, raw_args=tuple(raw_args)
    )


def decode_kernel_signal(raw: bytes) -> KernelSignal:
    """A K_ENFORCED record (a bare detail header: aux is the signal sent)."""
    _, flags, nr, tgid, tid, sig, ts = struct.unpack_from(_HDR, raw)
    return KernelSignal(ts=ts, pid=tgid, tid=tid, nr=nr, signal=sig, compat=bool(flags & L.DETAIL_COMPAT),
                        by_policy=bool(flags & L.DETAIL_BY_POLICY))


def decode_exec_args(raw: bytes) -> tuple[int, str, tuple[str, ...]]:
    """(tid, filename, argv) of an execve entry (struct exec_args)."""
    _, _, _, _, tid, _, _, argc, length = _EXEC_FIXED.unpack_from(raw)
    argv_raw = raw[_EXEC_ARGV : _EXEC_ARGV + min(length, L.ARGV_LEN + L.ARG_CHUNK)]
    argv = tuple(a.decode("utf-8", "surrogateescape") for a in argv_raw.split(b"\0")[:argc])
    return tid, _str_at(raw, _EXEC_FILENAME, L.STR_LEN), argv


def decode_proc(raw: bytes) -> ProcEvent:
    """A fork, exec or exit record (struct proc_event)."""
    kind, flags, nr, tgid, tid, aux, ts, clone_flags, cgroup_id = _PROC_FIXED.unpack_from(raw)
    comm = _str_at(raw, _PROC_COMM, 16)
    if kind == L.K_FORK:
        parent_nr = syscall_name(nr, compat=bool(flags & 2)) if flags else ""  # 2: a 32-bit clone
        is_thread = bool(flags) and parent_nr in ("clone", "clone3") and bool(clone_flags & CLONE_THREAD)
        return ProcEvent(
            "fork", ts, pid=tgid if is_thread else aux, tid=aux, ppid=tgid, comm=comm, is_thread=is_thread
        )
    if kind == L.K_EXEC:
        return ProcEvent("exec", ts, pid=tgid, tid=tid, comm=comm, filename=_str_at(raw, _PROC_FILENAME, L.STR_LEN),
                         cgroup_id=cgroup_id, image_compat=bool(flags & 1) if flags & 2 else None)
    return ProcEvent("exit", ts, pid=tgid, tid=tid, comm=comm, is_thread=not bool(aux))


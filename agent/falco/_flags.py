"""Render integer syscall arguments the way Falco prints them (``O_RDONLY|O_CLOEXEC``, ``PTRACE_ATTACH``...).

Numbers come from Python's own os/socket/signal/errno modules where they exist; the few enumerations Python
does not expose (ptrace requests, CLONE_*, MS_*, bpf commands) are small decoding tables of Linux UAPI values.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Callable, Sequence

AT_FDCWD = -100

_OPEN_FLAG_NAMES = (
    "O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC", "O_APPEND", "O_NONBLOCK", "O_DSYNC", "O_ASYNC",
    "O_DIRECT", "O_LARGEFILE", "O_DIRECTORY", "O_NOFOLLOW", "O_NOATIME", "O_CLOEXEC", "O_PATH",
)
_OPEN_FLAGS = [(getattr(os, n), n) for n in _OPEN_FLAG_NAMES if hasattr(os, n)]
# O_TMPFILE includes O_DIRECTORY's bit: test it as a whole before the single bits.
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_O_SYNC_ONLY = os.O_SYNC & ~os.O_DSYNC


def open_flags(value: int) -> str:
    acc = value & os.O_ACCMODE
    parts = ["O_RDONLY" if acc == os.O_RDONLY else "O_WRONLY" if acc == os.O_WRONLY else "O_RDWR"]
    rest = value & ~os.O_ACCMODE
    if _O_TMPFILE and rest & _O_TMPFILE == _O_TMPFILE:
        parts.append("O_TMPFILE")
        rest &= ~_O_TMPFILE
    if rest & _O_SYNC_ONLY:
        parts.append("O_SYNC")
        rest &= ~os.O_SYNC
    parts.extend(name for bit, name in _OPEN_FLAGS if rest & bit)
    return "|".join(parts)


_MODE_BITS = (
    (0o4000, "S_ISUID"), (0o2000, "S_ISGID"), (0o1000, "S_ISVTX"),
    (0o400, "S_IRUSR"), (0o200, "S_IWUSR"), (0o100, "S_IXUSR"),
    (0o040, "S_IRGRP"), (0o020, "S_IWGRP"), (0o010, "S_IXGRP"),
    (0o004, "S_IROTH"), (0o002, "S_IWOTH"), (0o001, "S_IXOTH"),
)


def file_mode(value: int) -> str:
    names = [n for bit, n in _MODE_BITS if value & bit]
    return f"0{value & 0o7777:o}" + (f"({'|'.join(names)})" if names else "")


_PTRACE = {
    0: "PTRACE_TRACEME", 1: "PTRACE_PEEKTEXT", 2: "PTRACE_PEEKDATA", 3: "PTRACE_PEEKUSR",
    4: "PTRACE_POKETEXT", 5: "PTRACE_POKEDATA", 6: "PTRACE_POKEUSR", 7: "PTRACE_CONT", 8: "PTRACE_KILL",
    9: "PTRACE_SINGLESTEP", 12: "PTRACE_GETREGS", 13: "PTRACE_SETREGS", 14: "PTRACE_GETFPREGS",
    15: "PTRACE_SETFPREGS", 16: "PTRACE_ATTACH", 17: "PTRACE_DETACH", 18: "PTRACE_GETFPXREGS",
    19: "PTRACE_SETFPXREGS", 24: "PTRACE_SYSCALL", 0x4200: "PTRACE_SETOPTIONS", 0x4201: "PTRACE_GETEVENTMSG",
    0x4202: "PTRACE_GETSIGINFO", 0x4203: "PTRACE_SETSIGINFO", 0x4204: "PTRACE_GETREGSET",
    0x4205: "PTRACE_SETREGSET", 0x4206: "PTRACE_SEIZE", 0x4207: "PTRACE_INTERRUPT", 0x4208: "PTRACE_LISTEN",
}

_CLONE = (
    (0x00000100, "CLONE_VM"), (0x00000200, "CLONE_FS"), (0x00000400, "CLONE_FILES"),
    (0x00000800, "CLONE_SIGHAND"), (0x00001000, "CLONE_PIDFD"), (0x00002000, "CLONE_PTRACE"),
    (0x00004000, "CLONE_VFORK"), (0x00008000, "CLONE_PARENT"), (0x00010000, "CLONE_THREAD"),
    (0x00020000, "CLONE_NEWNS"), (0x00040000, "CLONE_SYSVSEM"), (0x00080000, "CLONE_SETTLS"),
    (0x00100000, "CLONE_PARENT_SETTID"), (0x00200000, "CLONE_CHILD_CLEARTID"), (0x00800000, "CLONE_UNTRACED"),
    (0x01000000, "CLONE_CHILD_SETTID"), (0x02000000, "CLONE_NEWCGROUP"), (0x04000000, "CLONE_NEWUTS"),
    (0x08000000, "CLONE_NEWIPC"), (0x10000000, "CLONE_NEWUSER"), (0x20000000, "CLONE_NEWPID"),
    (0x40000000, "CLONE_NEWNET"), (0x80000000, "CLONE_IO"), (0x00000080, "CLONE_NEWTIME"),
)

_MOUNT = (
    (1, "MS_RDONLY"), (2, "MS_NOSUID"), (4, "MS_NODEV"), (8, "MS_NOEXEC"), (16, "MS_SYNCHRONOUS"),
    (32, "MS_REMOUNT"), (64, "MS_MANDLOCK"), (128, "MS_DIRSYNC"), (1024, "MS_NOATIME"),
    (2048, "MS_NODIRATIME"), (4096, "MS_BIND"), (8192, "MS_MOVE"), (16384, "MS_REC"), (32768, "MS_SILENT"),
    (1 << 16, "MS_POSIXACL"), (1 << 17, "MS_UNBINDABLE"), (1 << 18, "MS_PRIVATE"), (1 << 19, "MS_SLAVE"),
    (1 << 20, "MS_SHARED"), (1 << 21, "MS_RELATIME"), (1 << 24, "MS_STRICTATIME"), (1 << 25, "MS_LAZYTIME"),
)

_BPF_CMDS = (
    "BPF_MAP_CREATE", "BPF_MAP_LOOKUP_ELEM", "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM",
    "BPF_MAP_GET_NEXT_KEY", "BPF_PROG_LOAD", "BPF_OBJ_PIN", "BPF_OBJ_GET", "BPF_PROG_ATTACH",
    "BPF_PROG_DETACH", "BPF_PROG_TEST_RUN", "BPF_PROG_GET_NEXT_ID", "BPF_MAP_GET_NEXT_ID",
    "BPF_PROG_GET_FD_BY_ID", "BPF_MAP_GET_FD_BY_ID", "BPF_OBJ_GET_INFO_BY_FD", "BPF_PROG_QUERY",
    "BPF_RAW_TRACEPOINT_OPEN", "BPF_BTF_LOAD", "BPF_BTF_GET_FD_BY_ID", "BPF_TASK_FD_QUERY",
    "BPF_MAP_LOOKUP_AND_DELETE_ELEM", "BPF_MAP_FREEZE", "BPF_BTF_GET_NEXT_ID", "BPF_MAP_LOOKUP_BATCH",
    "BPF_MAP_LOOKUP_AND_DELETE_BATCH", "BPF_MAP_UPDATE_BATCH", "BPF_MAP_DELETE_BATCH", "BPF_LINK_CREATE",
    "BPF_LINK_UPDATE", "BPF_LINK_GET_FD_BY_ID", "BPF_LINK_GET_NEXT_ID", "BPF_ENABLE_STATS", "BPF_ITER_CREATE",
    "BPF_LINK_DETACH", "BPF_PROG_BIND_MAP", "BPF_TOKEN_CREATE",
)

_AT_FLAGS = ((0x100, "AT_SYMLINK_NOFOLLOW"), (0x200, "AT_REMOVEDIR"), (0x400, "AT_SYMLINK_FOLLOW"),
             (0x800, "AT_NO_AUTOMOUNT"), (0x1000, "AT_EMPTY_PATH"))
_RENAME_FLAGS = ((1, "RENAME_NOREPLACE"), (2, "RENAME_EXCHANGE"), (4, "RENAME_WHITEOUT"))
_MFD = tuple((getattr(os, n), n) for n in ("MFD_CLOEXEC", "MFD_ALLOW_SEALING", "MFD_HUGETLB") if hasattr(os, n))
_SOCK_FLAGS = ((os.O_CLOEXEC, "SOCK_CLOEXEC"), (os.O_NONBLOCK, "SOCK_NONBLOCK"))
_FINIT = ((1, "MODULE_INIT_IGNORE_MODVERSIONS"), (2, "MODULE_INIT_IGNORE_VERMAGIC"),
          (4, "MODULE_INIT_COMPRESSED_FILE"))
_EXE = ((1, "EXE_WRITABLE"), (2, "EXE_UPPER_LAYER"), (4, "EXE_FROM_MEMFD"), (8, "EXE_LOWER_LAYER"))


def _bits(table: Sequence[tuple[int, str]], value: int, zero: str = "0") -> str:
    names = [n for bit, n in table if value & bit == bit and bit]
    return "|".join(names) if names else zero


def clone_flags(value: int) -> str:
    return _bits(_CLONE, value)


def ptrace_request(value: int) -> str:
    return _PTRACE.get(value, str(value))


def socket_family(value: int) -> str:
    try:
        return socket.AddressFamily(value).name
    except ValueError:
        return str(value)


def socket_type(value: int) -> str:
    base = value & 0xF
    try:
        name = socket.SocketKind(base).name
    except ValueError:
        name = str(base)
    extra = _bits(_SOCK_FLAGS, value, "")
    return f"{name}|{extra}" if extra else name


def signal_name(value: int) -> str:
    try:
        return signal.Signals(value).name
    except ValueError:
        return str(value)


def errno_name(res: int) -> str:
    """Falco's evt.res: SUCCESS for a non-negative return, else the errno's name."""
    if res >= 0:
        return "SUCCESS"
    return errno.errorcode.get(-res, str(res))


def bpf_cmd(value: int) -> str:
    return _BPF_CMDS[value] if 0 <= value < len(_BPF_CMDS) else str(value)


def dirfd(value: int) -> str:
    return "-100(AT_FDCWD)" if value == AT_FDCWD else str(value)


def exe_flags(value: int) -> str:
    return _bits(_EXE, value)


def _table(table: Sequence[tuple[int, str]]) -> Callable[[int], str]:
    return lambda v: _bits(table, v)


Renderer = Callable[[int], str]

# (syscall, argument) -> renderer; any other integer argument is printed in decimal.
_BY_ARG: dict[tuple[str, str], Renderer] = {}
for _sc in ("open", "openat", "openat2"):
    _BY_ARG[(_sc, "flags")] = open_flags
for _sc in ("open", "openat", "openat2", "creat", "mkdir", "mkdirat", "chmod", "fchmod", "fchmodat"):
    _BY_ARG[(_sc, "mode")] = file_mode
for _sc, _arg in (("openat", "dirfd"), ("openat2", "dirfd"), ("execveat", "dirfd"), ("linkat", "olddir"),
                  ("linkat", "newdir"), ("symlinkat", "linkdirfd"), ("unlinkat", "dirfd"),
                  ("renameat", "olddirfd"), ("renameat", "newdirfd"), ("renameat2", "olddirfd"),
                  ("renameat2", "newdirfd"), ("mkdirat", "dirfd"), ("fchmodat", "dirfd"), ("fchownat", "dirfd")):
    _BY_ARG[(_sc, _arg)] = dirfd
for _sc in ("linkat", "unlinkat", "fchownat", "execveat"):
    _BY_ARG[(_sc, "flags")] = _table(_AT_FLAGS)
_BY_ARG[("renameat2", "flags")] = _table(_RENAME_FLAGS)
_BY_ARG[("ptrace", "request")] = ptrace_request
_BY_ARG[("unshare", "flags")] = clone_flags
_BY_ARG[("setns", "nstype")] = clone_flags
for _sc in ("socket", "connect", "bind", "accept", "accept4", "sendto"):
    _BY_ARG[(_sc, "domain" if _sc == "socket" else "family")] = socket_family
_BY_ARG[("socket", "type")] = socket_type
_BY_ARG[("accept4", "flags")] = _table(_SOCK_FLAGS)
_BY_ARG[("dup3", "flags")] = _table(((os.O_CLOEXEC, "O_CLOEXEC"),))
_BY_ARG[("memfd_create", "flags")] = _table(_MFD)
_BY_ARG[("userfaultfd", "flags")] = _table(((os.O_CLOEXEC, "O_CLOEXEC"), (os.O_NONBLOCK, "O_NONBLOCK")))
_BY_ARG[("finit_module", "flags")] = _table(_FINIT)
_BY_ARG[("mount", "flags")] = _table(_MOUNT)
_BY_ARG[("bpf", "cmd")] = bpf_cmd
for _sc in ("kill", "tkill", "tgkill"):
    _BY_ARG[(_sc, "sig")] = signal_name
_BY_ARG[("execve", "flags")] = exe_flags
_BY_ARG[("execveat", "exe_flags")] = exe_flags
_BY_ARG[("execveat", "flags")] = exe_flags


def render_arg(syscall: str, name: str, value: object) -> str:
    """One argument as Falco's evt.arg.NAME renders it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        fn = _BY_ARG.get((syscall, name))
        return fn(value) if fn is not None else str(value)
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)

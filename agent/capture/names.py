"""Syscall names and numbers, from libseccomp (never a hand-written table).

x86_64 processes use x86_64 numbers; 32-bit (compat) processes use i386 numbers on the same tracepoint.
"""

from __future__ import annotations

import functools

import numpy as np
import seccomp

MAX_NR = 1024  # larger than any syscall number on either ABI
NATIVE_ARCH = seccomp.Arch.X86_64
COMPAT_ARCH = seccomp.Arch.X86


def _arch(compat: bool) -> int:
    return int(COMPAT_ARCH if compat else NATIVE_ARCH)


@functools.cache
def name_table(compat: bool = False) -> np.ndarray:
    """An object array: number -> name; numbers libseccomp does not know are "sys_<nr>"."""
    table = np.empty(MAX_NR, dtype=object)
    arch = _arch(compat)
    for nr in range(MAX_NR):
        try:
            table[nr] = seccomp.resolve_syscall(arch, nr).decode()
        except ValueError:
            table[nr] = f"sys_{nr}"
    return table


def syscall_name(nr: int, compat: bool = False) -> str:
    if 0 <= nr < MAX_NR:
        return str(name_table(compat)[nr])
    return f"sys_{nr}"


@functools.cache
def syscall_number(name: str, compat: bool = False) -> int:
    """The number of ``name`` on that ABI, or -1 when the ABI has no such syscall."""
    if name.startswith("sys_") and name[4:].isdigit():
        return int(name[4:])
    try:
        nr = int(seccomp.resolve_syscall(_arch(compat), name))
    except ValueError:
        return -1
    return nr if nr >= 0 else -1  # libseccomp returns negative pseudo-numbers for absent syscalls


def known_names(compat: bool = False) -> frozenset[str]:
    return frozenset(n for n in name_table(compat) if not n.startswith("sys_"))


def numbers_named(names: set[str] | frozenset[str], compat: bool = False, below: int = 512) -> list[int]:
    """Every number under ``below`` whose name is one of ``names``, in order. Looked up number -> name:
    libseccomp resolves an i386 socket call's name to socketcall, not to its own number (connect: 102, not
    362), so :func:`syscall_number` cannot be used for these."""
    table = name_table(compat)
    return [nr for nr in range(min(len(table), below)) if table[nr] in names]

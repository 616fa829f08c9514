"""Handing memory back to the OS: the heap glibc keeps after a burst, and what the BPF compiler used.

glibc keeps memory freed after a burst (a backlog, a churn of processes) for later, so RSS stays at each
burst's high-water mark: ``release_free_memory`` (``malloc_trim(0)``) hands it back.

bcc compiles the agent's BPF program with clang/LLVM once, at start. Afterwards ~90 MB of LLVM and clang
machine code stays resident and glibc keeps ~20 MB of the compiler's freed heap; none of it is used again
unless another program is compiled. Text pages of a private file mapping that was never written are copies
of the file, so dropping them (MADV_DONTNEED) is safe: a later access reads them back from the file.
Mappings with any private (copy-on-write) page, such as relocated read-only data, are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass
from typing import Any

_MADV_DONTNEED = 4
_COMPILER_LIBRARY = re.compile(r"/lib(LLVM|clang)[^/]*\.so[^/]*$")
_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)$")


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    rss_kb: int = 0
    anonymous_kb: int = 0


def mappings(smaps: str = "/proc/self/smaps") -> list[Mapping]:
    """The process's mappings with their resident and private-anonymous sizes."""
    out: list[Mapping] = []
    fields: dict[str, int] = {}
    head: tuple[int, int, str, str] | None = None
    with open(smaps) as f:
        for line in f:
            parts = line.split()
            m = _RANGE.match(parts[0]) if parts else None
            if m:
                if head:
                    out.append(Mapping(*head, fields.get("Rss", 0), fields.get("Anonymous", 0)))
                head = (int(m.group(1), 16), int(m.group(2), 16), parts[1], parts[5] if len(parts) > 5 else "")
                fields = {}
            elif len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    if head:
        out.append(Mapping(*head, fields.get("Rss", 0), fields.get("Anonymous", 0)))
    return out


def droppable(m: Mapping) -> bool:
    """A compiler library's mapping whose resident pages are all clean copies of the file."""
    return bool(_COMPILER_LIBRARY.search(m.path)) and "w" not in m.perms and m.anonymous_kb == 0 and m.rss_kb > 0


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Give the C heap's free memory back to the OS (glibc's ``malloc_trim(0)``); False where there is none."""
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def release_compiler_memory() -> int:
    """Trim glibc's heap and drop the compiler's resident text; returns the kB of compiler text dropped."""
    libc = _libc()
    if libc is None:
        return 0
    release_free_memory()
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    try:
        maps = mappings()
    except OSError:  # no /proc: nothing to do
        return 0
    for m in maps:
        if droppable(m) and madvise(m.start, m.end - m.start, _MADV_DONTNEED) == 0:
            dropped += m.rss_kb
    return dropped

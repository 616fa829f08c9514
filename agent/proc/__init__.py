"""The process table: pid -> ancestry, exe, argv, user, container, capabilities, 32-bit or not.

Seeded from /proc, kept current by fork/exec/exit events and the execve detail event, bounded in
memory and robust to pid reuse. See docs/process-table.md.
"""

from __future__ import annotations

from agent.proc._container import parse_container_id
from agent.proc._procfs import ProcReader, elf_is_i386
from agent.proc._runtime import (
    DEFAULT_SOCKETS,
    RuntimeContainerLookup,
    RuntimeSocket,
    runtime_sockets_present,
    split_image,
)
from agent.proc._table import ProcessTable
from agent.proc.info import HOST_CONTAINER_ID, ProcessInfo, ProcessLookup

_readers: dict[str, ProcReader] = {}


def read_process(pid: int, proc_root: str = "/proc") -> ProcessInfo | None:
    """One process read from ``proc_root`` (a thread id yields its process); None when it is gone."""
    reader = _readers.get(proc_root)
    if reader is None:
        if len(_readers) >= 16:  # each reader holds caches: keep only a few roots
            _readers.clear()
        reader = _readers[proc_root] = ProcReader(proc_root)
    return reader.read(pid)


__all__ = [
    "DEFAULT_SOCKETS",
    "HOST_CONTAINER_ID",
    "ProcessInfo",
    "ProcessLookup",
    "ProcessTable",
    "RuntimeContainerLookup",
    "RuntimeSocket",
    "elf_is_i386",
    "parse_container_id",
    "read_process",
    "runtime_sockets_present",
    "split_image",
]

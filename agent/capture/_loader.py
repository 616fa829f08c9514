"""Compile, load and attach bpf/sysgram.bpf.c with bcc; read its maps."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.capture import _layout as L
from agent.capture._btf import CompatProbe, compat_probe
from agent.capture._decode import socketcall_table, spec_table
from agent.capture._headers import TRACEFS, ensure_kernel_headers, ensure_tracefs
from agent.capture.names import syscall_number
from agent.errors import CaptureError
from agent.memory import release_compiler_memory

# The agent's ticker makes this syscall on each CPU in turn; the BPF program then sends that CPU's batch.
FLUSH_SYSCALL = "getppid"

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
if not (BPF_DIR / "sysgram.bpf.c").exists():  # installed without the source tree: the packaged copy
    BPF_DIR = Path(__file__).resolve().parent / "bpf"


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as err:
        raise CaptureError(
            "bcc is not importable: install Debian's python3-bpfcc and build the venv with "
            f"--system-site-packages ({err})"
        ) from None
    return bcc


# Syscalls whose trace event is named after another entry point (x86_64: umount2 is SYSCALL_DEFINE2(umount)).
_TRACEPOINT_NAMES = {"umount2": "umount"}


def _exit_event(name: str) -> str:
    """Syscall ``name``'s exit event (syscalls:<this>); its tracefs directory is absent on a kernel without it."""
    return f"sys_exit_{_TRACEPOINT_NAMES.get(name, name)}"


INIT_PID_NS_INODE = 0xEFFFFFFC  # PROC_PID_INIT_INO: the host's (initial) PID namespace, fixed since Linux 3.8


def nested_pid_namespace(ns_link: str = "/proc/self/ns/pid") -> str:
    """Why the tracer cannot run from this PID namespace, or "" when it is the host's. The kernel names
    processes by their host pids; here /proc, the agent's own pid (never traced, never blocked) and every
    pidfd would name others: in a container without the host's PID namespace the agent would trace itself,
    skip the host's init and block the wrong processes."""
    try:
        target = os.readlink(ns_link)  # "pid:[4026531836]"
    except OSError:
        # /proc mounted but no /proc/self: it is another PID namespace's /proc, which cannot see us
        if ns_link.startswith("/proc/self/") and os.path.isdir("/proc/1") and not os.path.exists("/proc/self"):
            return ("the agent runs in a PID namespace its /proc does not show, not the host's: run it in the "
                    "host's (docker run --pid=host; Kubernetes hostPID: true)")
        return ""  # no namespace link to tell (no /proc): nothing to compare either
    if target == f"pid:[{INIT_PID_NS_INODE}]":
        return ""
    return (f"the agent runs in a nested PID namespace ({target}, pid {os.getpid()} there), not the host's: "
            "run it in the host's (docker run --pid=host; Kubernetes hostPID: true)")


class Tracer:
    """The loaded BPF object: compact and detail ring buffers, stats, enforcement maps."""

    def __init__(
        self,
        *,
        self_tgid: int,
        detail_syscalls: set[str],
        enforce: bool = False,
        compact_rb_pages: int = 4096,
        detail_rb_pages: int = 2048,
        compat_details: str = "auto",
    ) -> None:
        if os.geteuid() != 0:
            raise CaptureError("the tracer needs root (or CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN)")
        nested = nested_pid_namespace()
        if nested:
            raise CaptureError(nested)
        ensure_tracefs()
        ensure_kernel_headers()
        bcc = _import_bcc()
        self.compat: CompatProbe = compat_probe()
        self.compat_details_built = compat_details != "never" and self.compat.status_offset is not None
        self.compat_exit_attached = False
        self._attach_lock = threading.Lock()
        cflags = [
            f"-DSELF_TGID={self_tgid}",
            f"-DCOMPACT_RB_PAGES={compact_rb_pages}",
            f"-DDETAIL_RB_PAGES={detail_rb_pages}",
            f"-DENFORCE={1 if enforce else 0}",
            f"-DBATCH_SIZE={L.BATCH_SIZE}",
            f"-DSTAMP_EVERY={L.STAMP_EVERY}",
            f"-DFLUSH_NR={syscall_number(FLUSH_SYSCALL)}",
            f"-DEXECVE_NR={syscall_number('execve')}",
            f"-DEXECVEAT_NR={syscall_number('execveat')}",
            f"-DCOMPAT_EXECVE_NR={syscall_number('execve', compat=True)}",
            f"-DCOMPAT_EXECVEAT_NR={syscall_number('execveat', compat=True)}",
            f"-DCOMPAT_SOCKETCALL_NR={syscall_number('socketcall', compat=True)}",
            *(f"-D{prefix}{name.upper()}_NR={syscall_number(name, compat=bool(prefix))}"
              for prefix in ("", "COMPAT_") for name in ("clone", "clone3", "fork", "vfork")),
            *self.compat.cflags,
            # 32-bit syscalls' details: a raw sys_exit program that every syscall pays for once attached
            f"-DCOMPAT_DETAILS={int(self.compat_details_built)}",
            f"-I{BPF_DIR}",
            "-Wno-unused-function",
        ]
        try:
            self.bpf = bcc.BPF(src_file=str(BPF_DIR / "sysgram.bpf.c"), cflags=cflags)
        except Exception as err:  # bcc raises plain Exception on compile/load failure
            raise CaptureError(
                f"loading the BPF program failed: {err}", path=str(BPF_DIR / "sysgram.bpf.c")
            ) from None
        table, wanted = spec_table(detail_syscalls)
        # A native syscall's entry is kept only when its exit hook exists to send and remove it: one
        # without (no tracepoint on this kernel) would leave an entry per thread in the pending map.
        events = f"{TRACEFS}/events/syscalls"
        self.attached = {nr: name for nr, name in wanted.items() if os.path.isdir(f"{events}/{_exit_event(name)}")}
        for nr in set(wanted) - set(self.attached):
            table["kept"][nr] = table["enabled"][nr] = 0
        spec_map = self.bpf["arg_spec"]
        for index in np.flatnonzero(table["kept"]):
            spec_map[ctypes.c_int(int(index))] = spec_map.Leaf.from_buffer_copy(table[index].tobytes())
        socketcalls = self.bpf["socketcall_nrs"]
        for call, value in socketcall_table().items():
            socketcalls[ctypes.c_int(call)] = ctypes.c_uint32(value)
        self._attach_details()
        if compat_details == "always":
            self.attach_compat_exit()
        # compiled once: the compiler's ~110 MB of resident code and freed heap are not needed again
        self.compiler_kb_released = release_compiler_memory()

    def _attach_details(self) -> None:
        """Exit hooks only: the raw sys_enter program keeps each detail syscall's entry itself (its arg_spec
        row), since any program on a ``sys_enter_X`` tracepoint costs every syscall the kernel's dispatch."""
        for name in sorted(self.attached.values()):
            self.bpf.attach_tracepoint(tp=f"syscalls:{_exit_event(name)}", fn_name="on_detail_exit")

    def attach_compat_exit(self) -> bool:
        """Attach the 32-bit syscalls' exit program (idempotent); True when this call attached it."""
        if not self.compat_details_built:
            return False
        with self._attach_lock:
            if self.compat_exit_attached:
                return False
            self.bpf.attach_raw_tracepoint(tp="sys_exit", fn_name="on_compat_exit")
            self.compat_exit_attached = True
            return True

    def open_ring_buffers(
        self, on_compact: Callable[[Any, Any, int], int], on_detail: Callable[[Any, Any, int], int]
    ) -> None:
        self.bpf["compact_rb"].open_ring_buffer(on_compact)
        self.bpf["detail_rb"].open_ring_buffer(on_detail)

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def consume(self) -> None:
        self.bpf.ring_buffer_consume()

    def kernel_stats(self) -> dict[str, int]:
        values = self.bpf["stats"]
        out: dict[str, int] = {}
        for i, name in enumerate(L.STATS):
            out[name] = int(sum(values[ctypes.c_int(i)]))
        return out

    def close(self) -> None:
        self.bpf.cleanup()

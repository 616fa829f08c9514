"""Where the running kernel keeps a thread's status word, read from its BTF with libbpf.

The tracer tells a 32-bit syscall from a native one by the TS_COMPAT bit of ``thread_info.status``. The
headers bcc compiles against are another kernel's (see agent/capture/_headers.py), so the word's offset
comes from the running kernel's own type information (/sys/kernel/btf/vmlinux), through libbpf (a bcc
dependency), never from those headers. Without BTF or libbpf, 32-bit syscalls are told apart by the
process's executable instead (agent/proc), which a 64-bit program's ``int 0x80`` gets past.
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass

BTF_KIND_STRUCT = 4
# arch/x86/include/asm/thread_info.h: set while a 32-bit syscall runs (a #define, so not in BTF)
X86_TS_COMPAT = 0x0002


@dataclass(frozen=True, slots=True)
class CompatProbe:
    """-D constants for bpf/sysgram.bpf.c's compat_flag(), or why there are none."""

    status_offset: int | None  # bytes from the task (thread_info is its first member) to thread_info.status
    ts_compat: int
    reason: str = ""  # why status_offset is None
    task_btf: bool = False  # the kernel has bpf_get_current_task_btf (5.11+): a direct load, no helper call

    @property
    def cflags(self) -> list[str]:
        if self.status_offset is None:
            return []
        return [f"-DTI_STATUS_OFFSET={self.status_offset}", f"-DTS_COMPAT={self.ts_compat:#x}",
                f"-DTASK_BTF={int(self.task_btf)}"]


class _BtfType(ctypes.Structure):  # struct btf_type (uapi/linux/btf.h)
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):  # struct btf_member
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


def _libbpf() -> ctypes.CDLL | None:
    """libbpf 1.x only: 0.x returned error pointers (not NULL) from btf__load_vmlinux_btf, and before 0.5
    did not have it."""
    try:
        lib = ctypes.CDLL("libbpf.so.1")
        lib.btf__load_vmlinux_btf  # noqa: B018 (the lookup raises AttributeError when it is missing)
    except (OSError, AttributeError):
        return None
    lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(_BtfType)
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__free.argtypes = [ctypes.c_void_p]
    return lib


def _member_offset(lib: ctypes.CDLL, btf: int, struct: bytes, member: bytes) -> int | None:
    """Byte offset of ``struct.member`` (a whole-byte, non-bitfield member), or None."""
    type_id = lib.btf__find_by_name_kind(btf, struct, BTF_KIND_STRUCT)
    if type_id <= 0:
        return None
    btf_type = lib.btf__type_by_id(btf, type_id)
    if not btf_type:
        return None
    info = btf_type.contents.info
    vlen, kind_flag = info & 0xFFFF, info >> 31
    members = ctypes.cast(
        ctypes.addressof(btf_type.contents) + ctypes.sizeof(_BtfType), ctypes.POINTER(_BtfMember * vlen)
    ).contents
    for m in members:
        if lib.btf__name_by_offset(btf, m.name_off) != member:
            continue
        bits = m.offset & 0xFFFFFF if kind_flag else m.offset  # with kind_flag the top byte is a bitfield size
        if kind_flag and m.offset >> 24:
            return None
        return bits // 8 if bits % 8 == 0 else None
    return None


def compat_probe() -> CompatProbe:
    """Find ``thread_info.status`` in the running kernel (x86_64 only: TS_COMPAT is an x86 flag)."""
    if platform.machine() != "x86_64":
        return CompatProbe(None, 0, f"32-bit syscall detection is written for x86_64, not {platform.machine()}")
    lib = _libbpf()
    if lib is None:
        return CompatProbe(None, 0, "libbpf (libbpf.so.1) is not installed")
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        return CompatProbe(None, 0, "the kernel has no BTF (/sys/kernel/btf/vmlinux)")
    try:
        task_info = _member_offset(lib, btf, b"task_struct", b"thread_info")
        status = _member_offset(lib, btf, b"thread_info", b"status")
    finally:
        lib.btf__free(btf)
    if task_info is None or status is None:
        return CompatProbe(None, 0, "the kernel's BTF has no task_struct.thread_info.status")
    return CompatProbe(task_info + status, X86_TS_COMPAT, task_btf=_kernel_at_least(5, 11))


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (major, minor)
    except (IndexError, ValueError):
        return False

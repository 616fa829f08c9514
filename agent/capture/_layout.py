"""numpy mirrors of the records in bpf/sysgram.h (byte for byte; tests/test_capture_layout.py checks sizes)."""

from __future__ import annotations

import numpy as np

BATCH_SIZE = 1024
STR_LEN = 256
ARGV_LEN = 1024
ARGV_MAX = 20
ARG_CHUNK = 128

K_SYSCALL, K_EXEC_ARGS, K_FORK, K_EXEC, K_EXIT, K_ENFORCED = 1, 2, 3, 4, 5, 6

SC_REC = np.dtype([("tgid", "<u4"), ("tid", "<u4"), ("nr", "<u2"), ("flags", "<u2"), ("ts_delta", "<u4")])
BATCH_HEADER = np.dtype(
    [("base_ts", "<u8"), ("end_ts", "<u8"), ("count", "<u4"), ("cpu", "<u4"), ("last_tid", "<u4"), ("pad", "<u4")]
)
REC_COMPAT = 0x1  # sc_rec.flags: a 32-bit syscall (nr is an i386 number); the same bit as FLAG_COMPAT
REC_STAMPED = 0x2  # sc_rec.flags: ts_delta is valid (the first record of a run)
DETAIL_COMPAT = 0x1  # detail_hdr.flags of K_ENFORCED: nr is an i386 number
DETAIL_BY_POLICY = 0x2  # detail_hdr.flags of K_ENFORCED: the per-exe deny policy decided, not a verdict
COMPAT_POLICY_BASE = 64  # deny_bitmaps: a policy's i386 bitmap sits at policy_id + this
STAMP_EVERY = 64

DETAIL_HDR = np.dtype(
    [
        ("kind", "u1"),
        ("flags", "u1"),
        ("nr", "<u2"),
        ("tgid", "<u4"),
        ("tid", "<u4"),
        ("aux", "<u4"),
        ("ts", "<u8"),
    ]
)
SC_DETAIL = np.dtype(
    [
        ("h", DETAIL_HDR),
        ("ret", "<i8"),
        ("args", "<u8", (6,)),
        ("deref", "<u8"),
        ("len", "<u2", (3,)),
        ("pad", "<u2"),
        ("str", "S256", (3,)),
    ]
)
EXEC_ARGS = np.dtype(
    [
        ("h", DETAIL_HDR),
        ("argc", "<u4"),
        ("argv_len", "<u4"),
        ("filename", f"S{STR_LEN}"),
        ("argv", f"V{ARGV_LEN + ARG_CHUNK}"),
    ]
)
PROC_EVENT = np.dtype(
    [("h", DETAIL_HDR), ("clone_flags", "<u8"), ("cgroup_id", "<u8"), ("comm", "S16"), ("filename", f"S{STR_LEN}")]
)
ARG_SPEC = np.dtype(
    [
        ("str0", "u1"),
        ("str1", "u1"),
        ("sockaddr", "u1"),
        ("sockaddr_len", "u1"),
        ("deref_u64", "u1"),
        ("enabled", "u1"),
        ("kept", "u1"),
        ("pad", "u1"),
    ]
)
STATS = (
    "compact_lost",
    "detail_lost",
    "pending_full",
    "proc_lost",
    "batches",
    "signals",
    "syscalls",
    "exec_args_lost",
)

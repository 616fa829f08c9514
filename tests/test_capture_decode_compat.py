"""Records of 32-bit syscalls and of the processes that make them, decoded (no kernel needed)."""

from __future__ import annotations

import numpy as np

from agent.capture import _layout as L
from agent.capture._decode import CLONE_THREAD, COMPAT_SPEC_BASE, decode_detail, decode_proc, spec_table
from agent.capture.names import name_table, syscall_number


def detail(nr: int, flags: int, args: list[int], ret: int = 0) -> bytes:
    rec = np.zeros(1, L.SC_DETAIL)
    rec["h"]["kind"], rec["h"]["flags"], rec["h"]["nr"] = L.K_SYSCALL, flags, nr
    rec["h"]["tgid"] = rec["h"]["tid"] = 4242
    rec["ret"], rec["args"][0, : len(args)] = ret, args
    return rec.tobytes()


def proc(kind: int, flags: int, nr: int = 0, clone_flags: int = 0) -> bytes:
    rec = np.zeros(1, L.PROC_EVENT)
    rec["h"]["kind"], rec["h"]["flags"], rec["h"]["nr"] = kind, flags, nr
    rec["h"]["tgid"], rec["h"]["tid"], rec["h"]["aux"] = 4242, 4242, 4243
    rec["clone_flags"] = clone_flags
    return rec.tobytes()


def test_a_32_bit_setuid32_is_the_setuid_the_rules_know() -> None:
    event = decode_detail(detail(syscall_number("setuid32", compat=True), L.DETAIL_COMPAT, [0]))
    assert (event.syscall, event.compat, event.args) == ("setuid", True, {"uid": 0})
    # the same number without the flag is a native syscall (x86_64 213: epoll_create)
    assert decode_detail(detail(213, 0, [0])).syscall == "epoll_create"


def test_a_32_bit_dirfd_is_sign_extended() -> None:
    event = decode_detail(detail(syscall_number("openat", compat=True), L.DETAIL_COMPAT, [0xFFFFFF9C, 0, 0]))
    assert event.syscall == "openat" and event.args["dirfd"] == -100


def test_the_spec_table_keeps_i386_rows_for_clone_and_the_32_suffixed_calls() -> None:
    table, _ = spec_table({"setuid", "accept"})
    i386 = name_table(compat=True)
    kept = {str(i386[i - COMPAT_SPEC_BASE]): int(table[i]["enabled"])
            for i in np.flatnonzero(table["kept"]) if i >= COMPAT_SPEC_BASE}
    # clone's entry is kept, not sent (the fork handler reads its flags); accept comes as accept4
    assert kept == {"setuid": 1, "setuid32": 1, "accept4": 1, "clone": 0, "clone3": 0, "fork": 0, "vfork": 0}


def test_a_32_bit_clone_of_a_thread_is_a_thread() -> None:
    clone32 = syscall_number("clone", compat=True)  # i386 120; natively 120 is getresgid
    event = decode_proc(proc(L.K_FORK, 3, clone32, CLONE_THREAD))
    assert event.is_thread and event.pid == 4242 and event.tid == 4243
    assert not decode_proc(proc(L.K_FORK, 1, clone32, CLONE_THREAD)).is_thread  # read as native: getresgid


def test_the_exec_record_says_whether_the_new_program_is_32_bit() -> None:
    assert [decode_proc(proc(L.K_EXEC, flags)).image_compat for flags in (3, 2, 0)] == [True, False, None]

"""The Enforcer's safety invariants, against real kernel BPF maps (the same layout as bpf/sysgram.bpf.c):
who is never blocked, a reused pid is never hit, every block (or refusal) is recorded, and per-exe deny
policies follow the program a process really runs."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.capture._layout import COMPAT_POLICY_BASE
from agent.capture.names import syscall_number
from agent.config import EnforceConfig, load_config
from agent.enforce import INHERITED, MAX_RECORDS, PINNED, SIGNALS, Enforcer, deny_numbers, is_kernel_thread
from agent.proc import read_process
from agent.proc.info import ProcessInfo
from tests.conftest import requires_bpf
from tests.test_enforce_stop import process_state

pytestmark = [requires_bpf]

MAPS = """
struct enforce_entry { u32 signal; u32 policy_id; };
struct deny_bitmap { u64 bits[8]; };
struct exe_key { char path[256]; };
BPF_HASH(enforce, u32, struct enforce_entry, 1024);
BPF_HASH(protected_tgids, u32, u32, 1024);
BPF_ARRAY(deny_bitmaps, struct deny_bitmap, 128);
BPF_HASH(exe_policy, struct exe_key, struct enforce_entry, 1024);
"""

Lookup = Callable[[int], ProcessInfo | None]


@pytest.fixture(scope="module")
def module_bpf() -> Iterator[Any]:
    from bcc import BPF

    from agent.capture._headers import ensure_kernel_headers  # the tracer's own way to find headers

    ensure_kernel_headers()
    bpf = BPF(text=MAPS.encode())
    yield bpf
    bpf.cleanup()


@pytest.fixture
def bpf(module_bpf: Any) -> Any:
    for name in ("enforce", "protected_tgids", "exe_policy"):
        module_bpf[name].clear()
    return module_bpf


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def real_lookup(pid: int) -> ProcessInfo | None:
    return read_process(pid)


def enforce_entry(bpf: Any, pid: int) -> Any:
    return bpf["enforce"].get(ctypes.c_uint32(pid))


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("pid", [1, 0, -5])
def test_pid_1_and_below_are_never_blocked(bpf: Any, pid: int) -> None:
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True), lambda _: None)
    rec = enforcer.block(pid, "test")
    assert not rec.done and rec.reason.startswith("refused: PID 1")
    assert enforce_entry(bpf, pid) is None
    assert list(enforcer.records) == [rec]


def test_the_agent_and_its_ancestors_are_never_blocked(bpf: Any) -> None:
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True), real_lookup)
    for pid in (os.getpid(), os.getppid()):
        rec = enforcer.block(pid, "test")
        assert not rec.done and "the agent, its ancestors" in rec.reason
        assert enforce_entry(bpf, pid) is None
        # ... and the kernel holds them as pinned, never passed on to children
        assert bpf["protected_tgids"][ctypes.c_uint32(pid)].value == PINNED


def test_kernel_threads_are_never_blocked(bpf: Any) -> None:
    kthreads = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) > 1 and is_kernel_thread(int(p))]
    assert kthreads, "a Linux host always has kernel threads (kthreadd)"
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True), real_lookup)
    rec = enforcer.block(kthreads[0], "test")
    assert not rec.done and "kernel threads" in rec.reason
    assert enforce_entry(bpf, kthreads[0]) is None


def test_allow_pids_are_never_blocked(bpf: Any, sleeper: subprocess.Popen[bytes]) -> None:
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True, allow_pids=(sleeper.pid,)), real_lookup)
    rec = enforcer.block(sleeper.pid, "test")
    assert not rec.done and rec.reason.startswith("refused:")
    assert wait_exit(sleeper, 0.3) is None  # still running
    assert enforce_entry(bpf, sleeper.pid) is None


def test_allow_exes_match_the_resolved_exe(bpf: Any, tmp_path: Path) -> None:
    real = tmp_path / "bin" / "allowed-sleep"
    real.parent.mkdir()
    shutil.copy(shutil.which("sleep") or "/bin/sleep", real)
    link = tmp_path / "link-to-allowed"
    link.symlink_to(real)
    proc = subprocess.Popen([str(real), "60"])
    try:
        # allow-listed by its symlink; the process table (and /proc) know it by the real path
        enforcer = Enforcer(bpf, EnforceConfig(enabled=True, allow_exes=(str(link),)), real_lookup)
        rec = enforcer.block(proc.pid, "test")
        assert not rec.done and "allow-listed" in rec.reason
        assert wait_exit(proc, 0.3) is None
        keys = {bytes(k.path).rstrip(b"\0").decode() for k in bpf["exe_policy"]}
        assert {str(link), str(real)} <= keys  # the kernel matches either spelling at exec
    finally:
        proc.kill()
        proc.wait()


def test_a_block_kills_the_process_the_decision_was_about(bpf: Any, sleeper: subprocess.Popen[bytes]) -> None:
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True), real_lookup)
    rec = enforcer.block(sleeper.pid, "rule X matched")
    assert rec.done and rec.reason == "rule X matched" and rec.signal == "kill"
    entry = enforce_entry(bpf, sleeper.pid)
    assert entry is not None and entry.signal == SIGNALS["kill"]
    assert wait_exit(sleeper) == -signal.SIGKILL
    assert list(enforcer.records) == [rec]


def test_a_reused_pid_is_refused(bpf: Any, sleeper: subprocess.Popen[bytes]) -> None:
    info = read_process(sleeper.pid)
    assert info is not None and info.start_ns > 0
    # The decision was about an earlier process that had this pid: it started 5 s before this one.
    stale = replace(info, start_ns=info.start_ns - 5_000_000_000)
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True), lambda pid: stale if pid == sleeper.pid else None)
    rec = enforcer.block(sleeper.pid, "test")
    assert not rec.done and "reused" in rec.reason
    assert enforce_entry(bpf, sleeper.pid) is None
    assert wait_exit(sleeper, 0.3) is None
    # the same check with the start time passed in explicitly
    rec = Enforcer(bpf, EnforceConfig(enabled=True), real_lookup).block(
        sleeper.pid, "test", start_ns=stale.start_ns
    )
    assert not rec.done and "reused" in rec.reason
    assert wait_exit(sleeper, 0.3) is None


def test_a_gone_process_is_refused(bpf: Any) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    rec = Enforcer(bpf, EnforceConfig(enabled=True), lambda _: None).block(proc.pid, "test")
    assert not rec.done and "gone" in rec.reason


def test_a_process_the_kernel_protects_is_never_blocked(bpf: Any, sleeper: subprocess.Popen[bytes]) -> None:
    """The kernel allow-lists by the path given to exec: an allow-listed script is protected there while
    /proc names its interpreter, which user space alone would let through. The kernel's word stands."""
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True), real_lookup)
    bpf["protected_tgids"][ctypes.c_uint32(sleeper.pid)] = ctypes.c_uint32(INHERITED)  # as exec of it sets
    rec = enforcer.block(sleeper.pid, "rule X matched")
    assert not rec.done and "protected in the kernel" in rec.reason
    assert enforce_entry(bpf, sleeper.pid) is None
    assert wait_exit(sleeper, 0.3) is None


def test_a_block_is_withdrawn_when_its_process_becomes_protected_before_the_signal(
    bpf: Any, sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """Between the verdict and the fallback signal (50 ms) the process exec'd an allow-listed program: the
    kernel now protects it, so the fallback must not kill it through the pidfd (which outlives exec)."""
    import json

    from agent.pipeline import BLOCK_WITHDRAWN_RULE, Pipeline
    from agent.proc import ProcessTable
    from agent.respond import JsonlConfig, OutputConfig, build_outputs

    alerts = tmp_path / "alerts.jsonl"
    pipeline = Pipeline(table=ProcessTable(), outputs=build_outputs(
        OutputConfig(console=None, jsonl=JsonlConfig(str(alerts)), fold_window=0), state_dir=tmp_path))
    enforcer = pipeline.enforcer = Enforcer(bpf, EnforceConfig(enabled=True), real_lookup)
    rec = enforcer.block(sleeper.pid, "rule X matched")
    assert rec.done
    bpf["protected_tgids"][ctypes.c_uint32(sleeper.pid)] = ctypes.c_uint32(INHERITED)  # the exec's step
    assert wait_exit(sleeper, 0.5) is None  # alive well past the fallback's 50 ms
    assert enforcer.withdrawn == 1
    last = enforcer.records[-1]
    assert (last.pid, last.done) == (sleeper.pid, False) and last.reason.startswith("withdrawn: protected")
    entry = enforce_entry(bpf, sleeper.pid)
    assert entry is not None and entry.signal == 0  # disarmed: a later exec cannot carry the kill on
    # the "blocked" alert went out with the verdict: the housekeeping turn says the signal never went
    pipeline.reap(time.monotonic_ns())
    pipeline.reap(time.monotonic_ns())  # once, not on every turn
    pipeline.outputs.close()
    said = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert [(a["rule"], a["output_fields"]["proc.pid"]) for a in said] == [(BLOCK_WITHDRAWN_RULE, sleeper.pid)]
    assert said[0]["output_fields"]["sysgram.action"].startswith("withdrawn: protected in the kernel")
    assert pipeline.stats({})["blocks_withdrawn"] == 1


def test_running_allow_listed_processes_are_protected_in_the_kernel_only_while_they_live(
    bpf: Any, tmp_path: Path
) -> None:
    """Protection found at start is the kernel's, which drops it at exit; user space keeps no pid that a
    later process could reuse and so never be blocked."""
    real = tmp_path / "allowed"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", real)
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True, allow_exes=(str(real),)), real_lookup)
    live = subprocess.Popen([str(real), "60"])
    gone = subprocess.Popen([str(real), "60"])
    try:
        infos = [read_process(live.pid), read_process(gone.pid)]
        gone.kill()
        gone.wait()
        enforcer.protect_processes([i for i in infos if i is not None])
        assert bpf["protected_tgids"][ctypes.c_uint32(live.pid)].value == INHERITED
        assert bpf["protected_tgids"].get(ctypes.c_uint32(gone.pid)) is None  # exited: no entry for its pid
        assert live.pid not in enforcer.protected and gone.pid not in enforcer.protected
        assert not enforcer.block(live.pid, "test").done
    finally:
        live.kill()
        live.wait()


def test_a_zombie_gets_no_kernel_entry_that_would_outlive_it(bpf: Any, tmp_path: Path) -> None:
    """A zombie's pidfd still shows its pid, but the kernel's exit hook has already run: an entry written now
    would protect (or police) whoever gets the pid next."""
    real = tmp_path / "allowed"
    shutil.copy(shutil.which("true") or "/bin/true", real)
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True, allow_exes=(str(real),)), real_lookup)
    zombie = subprocess.Popen([str(real)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_state(zombie.pid) != "Z":
            time.sleep(0.01)
        assert process_state(zombie.pid) == "Z"  # exited, not reaped: its pid is still held
        enforcer.on_exec(zombie.pid, str(real))
        assert bpf["protected_tgids"].get(ctypes.c_uint32(zombie.pid)) is None
    finally:
        zombie.wait()


def test_stop_action_stops_instead(bpf: Any, sleeper: subprocess.Popen[bytes]) -> None:
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True, action="stop"), real_lookup)
    assert enforcer.block(sleeper.pid, "test").done
    deadline = time.monotonic() + 10
    state = ""
    while time.monotonic() < deadline and state != "T":
        with open(f"/proc/{sleeper.pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        time.sleep(0.02)
    assert state == "T"  # stopped, not killed
    os.kill(sleeper.pid, signal.SIGCONT)


def test_records_are_bounded(bpf: Any) -> None:
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True), lambda _: None)
    for _ in range(MAX_RECORDS + 3):
        enforcer.block(1, "test")
    assert len(enforcer.records) == MAX_RECORDS


def _deny_config(tmp_path: Path, exe: Path, names: str) -> EnforceConfig:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"enforce:\n  enabled: true\n  deny_syscalls:\n    {exe}: [{names}]\n")
    return load_config(str(cfg)).enforce


def test_deny_policies_are_installed_by_resolved_path(bpf: Any, tmp_path: Path) -> None:
    real = tmp_path / "real" / "tool"
    real.parent.mkdir()
    real.write_bytes(b"")
    (tmp_path / "alias").symlink_to(real.parent)
    config = _deny_config(tmp_path, tmp_path / "alias" / ".." / "alias" / "tool", "getppid, ptrace")
    assert list(config.deny_syscalls) == [str(real)]
    Enforcer(bpf, config, lambda _: None)
    keys = {bytes(k.path).rstrip(b"\0").decode(): v.policy_id for k, v in bpf["exe_policy"].items()}
    policy_id = keys[str(real)]
    assert policy_id > 0
    bits = bpf["deny_bitmaps"][ctypes.c_int(policy_id)].bits
    for name in ("getppid", "ptrace"):
        nr = syscall_number(name)
        assert bits[nr >> 6] >> (nr & 63) & 1
    nr = syscall_number("read")
    assert not bits[nr >> 6] >> (nr & 63) & 1


def _bits(bitmap: Any) -> set[int]:
    return {word * 64 + bit for word in range(8) for bit in range(64) if bitmap.bits[word] >> bit & 1}


def test_deny_policies_cover_the_same_syscalls_made_through_the_32_bit_gate(bpf: Any, tmp_path: Path) -> None:
    """A 64-bit program's int 0x80 uses i386 numbers: the policy's i386 bitmap holds the same names, and for a
    socket call also socketcall(2), which reaches connect without connect's own number."""
    real = tmp_path / "tool"
    real.write_bytes(b"")
    Enforcer(bpf, _deny_config(tmp_path, real, "ptrace, connect, getppid"), lambda _: None)
    policy_id = next(v.policy_id for v in bpf["exe_policy"].values())
    native = _bits(bpf["deny_bitmaps"][ctypes.c_int(policy_id)])
    i386 = _bits(bpf["deny_bitmaps"][ctypes.c_int(policy_id + COMPAT_POLICY_BASE)])
    assert native == {syscall_number(n) for n in ("ptrace", "connect", "getppid")}
    assert i386 == {26, 362, 64, 102}  # ptrace, connect, getppid, socketcall (arch/x86/entry/syscalls/syscall_32.tbl)


def test_deny_numbers_cover_each_calls_i386_variants() -> None:
    """Numbers from arch/x86/entry/syscalls/syscall_32.tbl: a deny of setuid that left setuid32 (213) open
    was passed by a 32-bit setuid32 call (review, session 10)."""
    assert deny_numbers(["setuid"], compat=True) == [23, 213]
    assert deny_numbers(["newfstatat", "ptrace"], compat=True) == [26, 300]  # i386 calls it fstatat64
    assert deny_numbers(["mmap", "futex"], compat=True) == [90, 192, 240, 422]  # mmap2, futex_time64
    assert deny_numbers(["semop"], compat=True) == [117]  # ipc(2) only: i386 has no semop of its own
    assert deny_numbers(["umount2", "wait4"], compat=True) == [7, 22, 52, 114]  # waitpid, umount, umount2, wait4
    assert deny_numbers(["getdents"], compat=True) == [89, 141]  # readdir; getdents64 is a call of its own
    assert deny_numbers(["socketcall"], compat=False) == []
    assert deny_numbers(["fstatat64"], compat=False) == []  # an i386-only name denies nothing natively


@pytest.mark.parametrize("how", ["symlink", "relative", "dotdot"])
def test_on_exec_applies_the_policy_of_the_real_exe(bpf: Any, tmp_path: Path, how: str) -> None:
    real = tmp_path / "bin" / "denied-sleep"
    real.parent.mkdir()
    shutil.copy(shutil.which("sleep") or "/bin/sleep", real)
    argv0 = {
        "symlink": str(tmp_path / "innocent-name"),
        "relative": "./bin/denied-sleep",
        "dotdot": str(tmp_path / "bin" / ".." / "bin" / "denied-sleep"),
    }[how]
    if how == "symlink":
        Path(argv0).symlink_to(real)
    enforcer = Enforcer(bpf, _deny_config(tmp_path, real, "clock_nanosleep"), real_lookup)
    proc = subprocess.Popen([argv0, "60"], cwd=tmp_path)
    try:
        policy_id = enforcer.on_exec(proc.pid, argv0)
        assert policy_id == enforcer.policy_ids[str(real)]
        entry = enforce_entry(bpf, proc.pid)
        assert entry is not None and entry.policy_id == policy_id and entry.signal == 0
    finally:
        proc.kill()
        proc.wait()


def test_on_exec_leaves_other_programs_and_pending_blocks_alone(
    bpf: Any, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"")
    enforcer = Enforcer(bpf, _deny_config(tmp_path, other, "getppid"), real_lookup)
    assert enforcer.on_exec(sleeper.pid) == 0
    assert enforce_entry(bpf, sleeper.pid) is None


def test_on_exec_protects_a_relatively_executed_allow_listed_program(bpf: Any, tmp_path: Path) -> None:
    real = tmp_path / "allowed"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", real)
    enforcer = Enforcer(bpf, EnforceConfig(enabled=True, allow_exes=(str(real),)), real_lookup)
    proc = subprocess.Popen(["./allowed", "60"], cwd=tmp_path)
    try:
        assert enforcer.on_exec(proc.pid, "./allowed") == 0
        assert bpf["protected_tgids"][ctypes.c_uint32(proc.pid)].value == INHERITED
    finally:
        proc.kill()
        proc.wait()


def test_on_exec_of_a_gone_process_writes_nothing(bpf: Any, tmp_path: Path) -> None:
    # An entry for a pid nobody holds would wait there for the next process to get that pid.
    real = tmp_path / "denied"
    shutil.copy(shutil.which("true") or "/bin/true", real)
    enforcer = Enforcer(bpf, _deny_config(tmp_path, real, "getppid"), real_lookup)
    proc = subprocess.Popen([str(real)])
    proc.wait()
    assert enforcer.on_exec(proc.pid, str(real)) == 0
    assert enforce_entry(bpf, proc.pid) is None


def _ingest(bpf: Any, tmp_path: Path, pid: int, *, block_ingested: bool, hostname: str) -> list[dict[str, Any]]:
    """One Falco alert about ``pid`` (tagged sysgram.block) through the pipeline with a real Enforcer."""
    import json
    import socket

    from agent.pipeline import Pipeline
    from agent.proc import ProcessTable
    from agent.respond import JsonlConfig, OutputConfig, build_outputs, parse_falco_alert
    from agent.verdict import DecisionTable

    alerts = tmp_path / f"alerts-{block_ingested}-{hostname}.jsonl"
    enforce = EnforceConfig(enabled=True, block_ingested=block_ingested)
    pipeline = Pipeline(
        table=ProcessTable(),
        decisions=DecisionTable(enforce=enforce),
        outputs=build_outputs(OutputConfig(console=None, jsonl=JsonlConfig(str(alerts)), fold_window=0),
                              state_dir=tmp_path),
    )
    pipeline.enforcer = Enforcer(bpf, enforce, real_lookup)
    pipeline.on_falco_alert(parse_falco_alert({
        "time": "2026-11-26T14:00:00.000000000Z", "rule": "Posted by anyone", "priority": "Critical",
        "output": f"pid {pid}", "output_fields": {"proc.pid": pid}, "tags": ["sysgram.block"],
        "hostname": socket.gethostname() if hostname == "here" else hostname,
    }))
    pipeline.outputs.close()
    return [json.loads(line) for line in alerts.read_text().splitlines()]


def test_an_ingested_alert_never_blocks_unless_allowed(
    bpf: Any, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    alerts = _ingest(bpf, tmp_path, sleeper.pid, block_ingested=False, hostname="here")
    assert [a["output_fields"]["sysgram.verdict.action"] for a in alerts] == ["alert"]
    assert "sysgram.action" not in alerts[0]["output_fields"]
    assert wait_exit(sleeper, 0.3) is None
    assert enforce_entry(bpf, sleeper.pid) is None
    # with block_ingested (config load demands a listen token for it) the same alert blocks
    alerts = _ingest(bpf, tmp_path, sleeper.pid, block_ingested=True, hostname="here")
    assert alerts[0]["output_fields"]["sysgram.verdict.action"] == "block"
    assert alerts[0]["output_fields"]["sysgram.action"] == "kill sent"
    assert wait_exit(sleeper) == -signal.SIGKILL


def _pipeline_checks_hostname() -> bool:
    import inspect

    from agent.pipeline import Pipeline

    return "is_local" in inspect.getsource(Pipeline)


@pytest.mark.skipif(not _pipeline_checks_hostname(), reason="agent/pipeline.py does not check is_local yet")
def test_an_alert_from_another_host_never_blocks_a_local_pid(
    bpf: Any, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    alerts = _ingest(bpf, tmp_path, sleeper.pid, block_ingested=True, hostname="some-other-node")
    assert alerts[0]["output_fields"]["sysgram.remote"] is True
    assert "sysgram.action" not in alerts[0]["output_fields"]  # no block was even tried
    assert enforce_entry(bpf, sleeper.pid) is None
    assert wait_exit(sleeper, 0.3) is None


def test_a_stop_keeps_the_programs_deny_policy_and_leaves_no_pending_signal(bpf: Any, tmp_path: Path) -> None:
    """Stopped then resumed (SIGCONT), a deny_syscalls program must still be under its policy."""
    real = tmp_path / "denied-sleep"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", real)
    enforcer = Enforcer(bpf, replace(_deny_config(tmp_path, real, "getppid"), action="stop"),
                        real_lookup)
    proc = subprocess.Popen([str(real), "60"])
    try:
        policy_id = enforcer.on_exec(proc.pid, str(real))
        assert policy_id
        rec = enforcer.block(proc.pid, "test")
        entry = enforce_entry(bpf, proc.pid)
        assert rec.done and entry.signal == signal.SIGSTOP and entry.policy_id == policy_id  # was policy_id 0
        deadline = time.monotonic() + 5  # asleep in clock_nanosleep: the agent's own signal stops it
        while time.monotonic() < deadline and (entry := enforce_entry(bpf, proc.pid)).signal:
            time.sleep(0.02)
        assert (entry.signal, entry.policy_id) == (0, policy_id)  # sent once; the policy stays
    finally:
        proc.kill()
        proc.wait()

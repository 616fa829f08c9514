"""The process table on the real /proc of this host: the test process, children it spawns, 32-bit ELF."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.events import ProcEvent
from agent.proc import ProcessTable, read_process


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def _exe_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


@pytest.fixture
def shell_with_sleep(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    # "; true" keeps sh alive as the parent of sleep (a lone command may be exec'd in place).
    shell = subprocess.Popen(["sh", "-c", "sleep 5; true"], cwd=tmp_path)
    kids: list[int] = []
    try:
        def sleeping() -> bool:
            kids[:] = _children(shell.pid)
            return bool(kids) and _exe_of(kids[0]).endswith("sleep")

        _wait_for(sleeping)
        yield shell, kids[0]
    finally:
        for kid in kids:  # the sleep this shell started, by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        shell.kill()
        shell.wait()


def test_seed_knows_the_test_process() -> None:
    table = ProcessTable()
    assert table.seed() >= 2
    me = table.get(os.getpid())
    assert me is not None
    assert me.ppid == os.getppid()
    assert me.exe == os.path.realpath(sys.executable)
    assert me.cwd == os.getcwd()
    assert (me.uid, me.user) == (os.geteuid(), "root" if os.geteuid() == 0 else me.user)
    assert 0 < me.start_ns < time.monotonic_ns()
    assert table.stats["live"] == len(table) and len(table.snapshot()) == len(table)


Shell = tuple[subprocess.Popen[bytes], int]


def test_child_argv_cwd_and_ancestry(shell_with_sleep: Shell, tmp_path: Path) -> None:
    shell, sleep_pid = shell_with_sleep
    table = ProcessTable()
    table.seed()
    info = table.get(sleep_pid)
    assert info is not None
    assert (info.comm, info.args, info.cwd) == ("sleep", ("sleep", "5"), str(tmp_path))
    assert info.ppid == shell.pid and info.user == "root" and info.uid == 0
    assert info.cmdline == "sleep 5"
    chain = table.ancestors(sleep_pid)
    assert [p.pid for p in chain[:2]] == [shell.pid, os.getpid()]
    assert chain[0].args == ("sh", "-c", "sleep 5; true")
    assert chain[-1].pid == 1 or len(chain) == 16
    assert table.ancestors(sleep_pid, depth=1) == chain[:1]
    # sh started before sleep: start times are comparable with the monotonic clock
    assert chain[0].start_ns <= info.start_ns <= time.monotonic_ns()


def exec_sleep(pid: int) -> ProcEvent:
    return ProcEvent("exec", time.monotonic_ns(), pid, pid, comm="sleep", filename="/bin/sleep")


def test_exec_event_rereads_a_live_process(shell_with_sleep: Shell) -> None:
    _shell, sleep_pid = shell_with_sleep
    table = ProcessTable()
    # A fork one second from now: not when this sleep started, so a different process than /proc's.
    table.apply(ProcEvent("fork", time.monotonic_ns() + 10**9, sleep_pid, sleep_pid, ppid=os.getpid()))
    forked = table.get(sleep_pid)
    assert forked is not None and forked.exe == os.path.realpath(sys.executable)  # inherited
    # /proc's start time does not match: the exec is filled from the event, never from /proc.
    table.apply(exec_sleep(sleep_pid))
    assert table.get(sleep_pid).args == ()  # type: ignore[union-attr]
    assert table.stats["exec_from_event"] == 1

    seeded = ProcessTable()
    seeded.seed()
    seeded.apply(exec_sleep(sleep_pid))
    info = seeded.get(sleep_pid)
    assert info is not None and info.args == ("sleep", "5") and info.exe == os.path.realpath("/bin/sleep")
    assert seeded.stats["exec_from_event"] == 0


def test_zombie_and_kernel_threads() -> None:
    child = subprocess.Popen(["true"])
    try:
        _wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z")
        zombie = read_process(child.pid)
        assert zombie is not None and zombie.exe == "" and zombie.comm == "true"
    finally:
        child.wait()
    kthreadd = read_process(2)
    assert kthreadd is not None and kthreadd.exe == "" and kthreadd.ppid == 0
    table = ProcessTable()
    table.seed()
    kernel = [p for p in table.snapshot() if p.ppid == 2]
    assert kernel and all(p.exe == "" and p.args == () for p in kernel)


def test_vanished_pid_reads_as_none() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert read_process(child.pid) is None
    table = ProcessTable()
    assert table.get(child.pid) is None
    assert table.exe_of([child.pid, child.pid]) == {child.pid: ""}
    assert table.stats["lazy_reads"] == 1  # looked up once, then remembered as missing


def test_exec_from_memfd_is_flagged(tmp_path: Path) -> None:
    fd = os.memfd_create("payload")
    try:
        with open(shutil.which("sleep") or "/bin/sleep", "rb") as src:
            os.write(fd, src.read())
        child = subprocess.Popen([f"/proc/self/fd/{fd}", "5"], pass_fds=(fd,))
    finally:
        os.close(fd)
    try:
        _wait_for(lambda: _exe_of(child.pid).startswith("/memfd:"))
        info = read_process(child.pid)
        assert info is not None and info.exe_from_memfd and info.exe.startswith("/memfd:payload")
    finally:
        child.kill()
        child.wait()


def _build_i386(tmp_path: Path) -> Path | None:
    source = tmp_path / "pause.c"
    source.write_text("#include <unistd.h>\nint main(void) { sleep(5); return 0; }\n")
    binary = tmp_path / "pause32"
    try:
        cmd = ["gcc", "-m32", "-o", str(binary), str(source)]
        result = subprocess.run(cmd, capture_output=True, check=False)
    except FileNotFoundError:
        return None
    return binary if result.returncode == 0 else None


def test_real_32bit_process_is_compat(tmp_path: Path) -> None:
    binary = _build_i386(tmp_path)
    if binary is None:
        pytest.skip("gcc -m32 is not available (apt-get install gcc-multilib)")
    child = subprocess.Popen([str(binary)])
    native = subprocess.Popen(["sleep", "5"])
    try:
        _wait_for(lambda: _exe_of(child.pid) == str(binary) and _exe_of(native.pid).endswith("sleep"))
        table = ProcessTable()
        table.seed()
        assert table.get(child.pid).compat  # type: ignore[union-attr]
        assert not table.get(native.pid).compat  # type: ignore[union-attr]
        rows = np.array([native.pid, child.pid, child.pid, os.getpid(), native.pid], dtype=np.uint32)
        assert table.compat_mask(rows).tolist() == [False, True, True, False, False]
        # Not seeded: compat_mask reads unknown tgids itself.
        assert ProcessTable().compat_mask(rows).tolist() == [False, True, True, False, False]
    finally:
        for p in (child, native):
            p.kill()
            p.wait()


@pytest.mark.bpf
def test_a_short_lived_container_process_is_named_by_its_exec_events_cgroup(tmp_path: Path) -> None:
    """Real exec events: a child moved into a docker-named cgroup v2 then exec'ing /bin/true is gone long
    before the table reads /proc; the kernel's cgroup id on the exec event still names the container."""
    from tests.conftest import bpf_unavailable, docker_named_cgroup

    if bpf_unavailable():
        pytest.skip(bpf_unavailable())
    with docker_named_cgroup() as made:
        if made is None:
            pytest.skip("no writable cgroup v2 hierarchy here")
        container_id, cgroup = made
        events = _exec_in_cgroup(cgroup)
        child_pid, true_exec = events[-1]
        assert true_exec.filename == "/bin/true"
        assert true_exec.cgroup_id == cgroup.stat().st_ino  # the kernel's cgroup id is the directory's inode
        assert not Path(f"/proc/{child_pid}").exists()  # reaped: /proc has nothing left to read
        table = ProcessTable(cgroup_root=str(cgroup.parent))
        table.seed()
        for event in sorted((e for _, e in events), key=lambda e: e.ts):
            table.apply(event)
        info = table.get(child_pid)
        assert info is not None and info.exe == "/bin/true"
        assert info.container_id == container_id
        assert table.stats["exec_cgroup_container"] >= 1
        # where the kernel resolves cgroup ids as file handles (root here), no walk of the hierarchy was needed
        assert table._reader._handles_work is False or table._reader.cgroup_scans == 0


def _exec_in_cgroup(cgroup: Path) -> list[tuple[int, ProcEvent]]:
    """Every process event of this host while a child moves itself into ``cgroup`` and execs /bin/true,
    like a runtime; the child's exec of /bin/true is last (as (child pid, event))."""
    from agent.capture.source import LiveSource

    source = LiveSource(detail_syscalls=set())
    source.start()
    try:
        child = subprocess.Popen(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec /bin/true"])
        assert child.wait(timeout=30) == 0
        time.sleep(0.3)
    finally:
        source.stop()
        events: list[ProcEvent] = []
        while (group := source.get(0.0)) is not None:
            events += [c for c in group if isinstance(c, ProcEvent)]
        source.close()
    mine = [e for e in events if e.kind == "exec" and e.pid == child.pid and e.filename == "/bin/true"]
    assert mine, "no exec event of the child's /bin/true"
    return [(child.pid, e) for e in events if e is not mine[-1]] + [(child.pid, mine[-1])]

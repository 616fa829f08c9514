"""The table under synthetic fork/exec/exit sequences, on a fake proc root (pid reuse, threads, bounds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.events import DetailEvent, ProcEvent
from agent.proc import HOST_CONTAINER_ID, ProcessTable
from tests.test_proc_fakeproc import TICK_NS, make_proc

SEC = 1_000_000_000


def fork(ts: int, pid: int, ppid: int, comm: str = "") -> ProcEvent:
    return ProcEvent("fork", ts, pid, pid, ppid=ppid, comm=comm)


def thread(ts: int, pid: int, tid: int) -> ProcEvent:
    return ProcEvent("fork", ts, pid, tid, ppid=pid, is_thread=True)


def execev(ts: int, pid: int, comm: str, filename: str) -> ProcEvent:
    return ProcEvent("exec", ts, pid, pid, comm=comm, filename=filename)


def exit_(ts: int, pid: int, tid: int | None = None) -> ProcEvent:
    return ProcEvent("exit", ts, pid, pid if tid is None else tid)


def execve(ts: int, pid: int, filename: str, argv: list[str], res: int = 0) -> DetailEvent:
    return DetailEvent(ts, pid, pid, "execve", 59, res, {"filename": filename, "argv": argv})


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[ProcessTable, Path]:
    root = tmp_path / "proc"
    make_proc(root, 1, comm="systemd", ppid=0, argv=("/sbin/init",), exe="/usr/lib/systemd/systemd",
              start_ticks=1)
    make_proc(root, 100, comm="bash", ppid=1, argv=("-bash",), exe="/usr/bin/bash", cwd="/home/ana", uid=0,
              start_ticks=500, loginuid=0, tty=34816)
    table = ProcessTable(proc_root=str(root))
    assert table.seed() == 2
    return table, root


def test_fork_inherits_parent_and_has_its_own_identity(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100, "bash"))
    child, parent = table.get(200), table.get(100)
    assert child is not None and parent is not None
    assert (child.pid, child.ppid, child.start_ns) == (200, 100, 50 * SEC)
    assert (child.exe, child.args, child.cwd, child.loginuid, child.tty) == (
        parent.exe, parent.args, parent.cwd, parent.loginuid, parent.tty)
    assert [p.pid for p in table.ancestors(200)] == [100, 1]


def test_exec_of_a_gone_process_is_filled_from_events(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100))
    table.apply(execev(50 * SEC + 10, 200, "ls", "/usr/bin/ls"))
    info = table.get(200)
    assert info is not None and (info.comm, info.exe, info.args) == ("ls", "/usr/bin/ls", ())
    assert info.cwd == "/home/ana"  # kept from the parent
    table.apply_exec_detail(execve(50 * SEC + 20, 200, "/usr/bin/ls", ["ls", "-la", "/tmp"]))
    info = table.get(200)
    assert info is not None and info.args == ("ls", "-la", "/tmp") and info.cmdline == "ls -la /tmp"
    assert table.stats["exec_from_event"] == 1


def _elf(path: Path, elf_class: int, machine: int) -> Path:
    header = bytearray(20)
    header[:6] = b"\x7fELF" + bytes([elf_class, 1])  # class, little-endian
    header[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(header) + b"\0" * 44)
    return path


def test_a_gone_process_takes_its_class_from_the_file_it_execd(seeded: tuple[ProcessTable, Path],
                                                               tmp_path: Path) -> None:
    table, _ = seeded
    i386 = _elf(tmp_path / "tool32", 1, 3)  # ELFCLASS32, EM_386
    amd64 = _elf(tmp_path / "tool64", 2, 62)  # ELFCLASS64, EM_X86_64
    table.apply(fork(50 * SEC, 200, 100))
    table.apply(execev(50 * SEC + 10, 200, "tool32", str(i386)))
    table.apply(fork(50 * SEC, 201, 100))
    table.apply(execev(50 * SEC + 10, 201, "tool64", str(amd64)))
    table.apply(execev(50 * SEC + 20, 202, "tool32", str(i386)))  # not even its fork was seen
    classes = {pid: info.compat for pid in (200, 201, 202) if (info := table.get(pid)) is not None}
    assert classes == {200: True, 201: False, 202: True}
    assert table.stats["exec_from_event"] == 3
    # a script's class is its interpreter's, a descriptor (fexecve) is not the agent's to open, a missing
    # file tells nothing: unknown, not 64-bit
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\n")
    for pid, path in ((203, str(script)), (204, "/dev/fd/5"), (205, str(tmp_path / "gone"))):
        table.apply(execev(50 * SEC + 30, pid, "x", path))
        assert table.compat_of(pid) is None, path
    assert table.compat_of(200) is True and table.compat_of(201) is False


def test_failed_execve_changes_nothing(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    before = table.get(100)
    table.apply_exec_detail(execve(60 * SEC, 100, "/nope", ["nope"], res=-2))
    assert table.get(100) is before


def test_lost_exec_event_the_detail_alone_execs(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100))
    table.apply_exec_detail(execve(50 * SEC + 5, 200, "bin/tool", ["tool", "x"]))
    info = table.get(200)
    assert info is not None
    assert (info.exe, info.args, info.comm) == ("/home/ana/bin/tool", ("tool", "x"), "tool")


def test_exec_rereads_proc_when_start_and_comm_match(seeded: tuple[ProcessTable, Path]) -> None:
    table, root = seeded
    start_ns = table.get(100).start_ns  # type: ignore[union-attr]
    make_proc(root, 100, comm="vim", ppid=1, argv=("vim", "notes"), exe="/usr/bin/vim", cwd="/etc",
              start_ticks=500)
    table.apply(execev(60 * SEC, 100, "vim", "/usr/bin/vim"))
    info = table.get(100)
    assert info is not None
    assert (info.exe, info.args, info.cwd) == ("/usr/bin/vim", ("vim", "notes"), "/etc")
    assert info.start_ns == start_ns
    assert info.loginuid == 0  # inherited, not re-read


def test_exec_rereads_the_cgroup_a_runtime_moved_the_child_into(seeded: tuple[ProcessTable, Path]) -> None:
    table, root = seeded
    table.apply(ProcEvent("fork", 70 * SEC, 300, 300, ppid=100, comm="runc"))
    assert table.get(300).container_id == HOST_CONTAINER_ID  # type: ignore[union-attr]
    start_ticks = round((table.get(300).start_ns + table._reader.boot_offset_ns) / TICK_NS)  # type: ignore[union-attr]
    make_proc(root, 300, comm="sh", ppid=100, argv=("sh",), exe="/bin/sh", start_ticks=start_ticks,
              cgroup="0::/system.slice/docker-" + "cd" * 32 + ".scope\n")
    table.apply(execev(70 * SEC + 5, 300, "sh", "/bin/sh"))
    info = table.get(300)
    assert info is not None and info.exe == "/bin/sh"
    assert info.container_id == "cd" * 32


def test_a_child_gone_before_proc_is_read_takes_its_container_from_the_exec_events_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``docker exec CTR cat /etc/shadow``: runc (host) forks, moves the child into the container's cgroup
    and execs; cat is gone before the agent reads /proc. The exec event's cgroup id names the container."""
    from agent.proc import _procfs

    root, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    make_proc(root, 1, comm="systemd", ppid=0, argv=("/sbin/init",), exe="/usr/lib/systemd/systemd", start_ticks=1)
    make_proc(root, 100, comm="runc", ppid=1, exe="/usr/bin/runc", start_ticks=500)
    scope = cgroups / "system.slice" / ("docker-" + "ab" * 32 + ".scope")
    scope.mkdir(parents=True)
    (cgroups / "user.slice").mkdir()
    table = ProcessTable(proc_root=str(root), cgroup_root=str(cgroups))
    table.seed()
    table.apply(fork(70 * SEC, 300, 100, "runc"))
    table.apply(ProcEvent("exec", 70 * SEC + 5, 300, 300, comm="cat", filename="/usr/bin/cat",
                          cgroup_id=scope.stat().st_ino))
    info = table.get(300)
    assert info is not None and info.exe == "/usr/bin/cat"
    assert info.container_id == "ab" * 32
    assert table._reader._handles_work is False  # a plain directory, not cgroupfs: found by the walk
    # a host cgroup overrides nothing (a hybrid host's runtime may keep containers in v1 cgroups only, their
    # processes in a host v2 cgroup); an unknown id (or none) keeps what the process had
    table.apply(fork(71 * SEC, 301, 300))
    table.apply(ProcEvent("exec", 71 * SEC + 5, 301, 301, comm="sh", filename="/bin/sh",
                          cgroup_id=(cgroups / "user.slice").stat().st_ino))
    assert table.get(301).container_id == "ab" * 32  # type: ignore[union-attr]
    table.apply(fork(72 * SEC, 302, 300))
    table.apply(ProcEvent("exec", 72 * SEC + 5, 302, 302, comm="ls", filename="/bin/ls", cgroup_id=0))
    assert table.get(302).container_id == "ab" * 32  # type: ignore[union-attr]
    # a cgroup made after the last scan is found once the rescan interval has passed, not before
    later = cgroups / "system.slice" / ("docker-" + "ef" * 32 + ".scope")
    later.mkdir()
    scans = table._reader.cgroup_scans
    monkeypatch.setattr(_procfs, "CGROUP_RESCAN_NS", 3600 * SEC)
    table.apply(fork(73 * SEC, 303, 100, "runc"))
    table.apply(ProcEvent("exec", 73 * SEC + 5, 303, 303, comm="id", filename="/usr/bin/id",
                          cgroup_id=later.stat().st_ino))
    assert table.get(303).container_id == HOST_CONTAINER_ID  # type: ignore[union-attr]
    assert table._reader.cgroup_scans == scans  # a miss does not walk the hierarchy on every exec
    monkeypatch.setattr(_procfs, "CGROUP_RESCAN_NS", 0)
    table.apply(fork(74 * SEC, 304, 100, "runc"))
    table.apply(ProcEvent("exec", 74 * SEC + 5, 304, 304, comm="id", filename="/usr/bin/id",
                          cgroup_id=later.stat().st_ino))
    assert table.get(304).container_id == "ef" * 32  # type: ignore[union-attr]
    assert table._reader.cgroup_scans >= scans + 1
    assert table.stats["exec_cgroup_container"] >= 2


def test_pid_reuse_in_proc_is_never_mixed_in(seeded: tuple[ProcessTable, Path]) -> None:
    table, root = seeded
    # pid 100 died unseen and /proc/100 is now someone else (another start time).
    make_proc(root, 100, comm="miner", ppid=1, argv=("miner", "--pool"), exe="/tmp/miner", start_ticks=9000,
              uid=1000)
    table.apply(execev(60 * SEC, 100, "vim", "/usr/bin/vim"))
    info = table.get(100)
    assert info is not None
    assert (info.exe, info.comm, info.args, info.uid) == ("/usr/bin/vim", "vim", (), 0)
    assert "miner" not in repr(info)
    assert table.stats["proc_start_mismatches"] == 1


def test_exec_by_another_image_since_is_not_read_from_proc(seeded: tuple[ProcessTable, Path]) -> None:
    table, root = seeded
    # Same start time, but the process has exec'd again since this event: comm differs.
    make_proc(root, 100, comm="python3", argv=("python3", "x.py"), exe="/usr/bin/python3", start_ticks=500)
    table.apply(execev(60 * SEC, 100, "env", "/usr/bin/env"))
    info = table.get(100)
    assert info is not None and (info.exe, info.comm) == ("/usr/bin/env", "env")


def test_fork_over_a_live_pid_replaces_it(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100))
    table.apply(execev(50 * SEC + 1, 200, "nc", "/usr/bin/nc"))
    table.apply(fork(70 * SEC, 200, 1, "systemd"))  # its exit was lost; 200 is a new process now
    info = table.get(200)
    assert info is not None
    assert (info.ppid, info.exe, info.start_ns) == (1, "/usr/lib/systemd/systemd", 70 * SEC)
    assert table.stats["pid_reused"] == 1


def test_exit_grace_then_reap(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100))
    table.apply(exit_(51 * SEC, 200))
    assert len(table) == 2 and table.stats["exited"] == 1
    assert table.get(200) is not None  # events in flight still resolve
    assert 200 not in [p.pid for p in table.snapshot()]
    assert table.reap(51 * SEC + table.exited_grace_ns - 1) == 0
    assert table.reap(51 * SEC + table.exited_grace_ns) == 1
    assert table.stats["exited"] == 0 and 200 not in table


def test_fork_over_an_exited_pid_drops_the_old_one(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100))
    table.apply(execev(50 * SEC + 1, 200, "old", "/usr/bin/old"))
    table.apply(exit_(51 * SEC, 200))
    table.apply(fork(52 * SEC, 200, 1))
    assert table.get(200).exe == "/usr/lib/systemd/systemd"  # type: ignore[union-attr]
    assert table.stats["exited"] == 0
    table.reap(100 * SEC)
    assert table.get(200) is not None  # the new one is live, not reaped


def test_threads_resolve_to_their_process(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100))
    table.apply(thread(50 * SEC + 1, 200, 201))
    table.apply(thread(50 * SEC + 2, 200, 202))
    assert table.get(201) is table.get(200) and table.stats["threads"] == 2
    assert table.exe_of([201, 200]) == {201: "/usr/bin/bash", 200: "/usr/bin/bash"}
    table.apply(exit_(51 * SEC, 200, 201))
    assert table.stats["threads"] == 1
    # The leader leaves first: the process lives on in thread 202.
    table.apply(exit_(52 * SEC, 200))
    assert len(table) == 2 + 1
    table.apply(exit_(53 * SEC, 200, 202))
    assert len(table) == 2 and table.stats["exited"] == 1 and table.stats["threads"] == 0
    assert table.reap(52 * SEC + table.exited_grace_ns) == 1  # exited at the leader's exit time


def test_new_task_id_voids_a_stale_process(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 300, 100))
    table.apply(fork(60 * SEC, 200, 100))
    table.apply(thread(60 * SEC + 1, 200, 300))  # 300's exit was lost: tid 300 now is 200's thread
    assert table.get(300).pid == 200  # type: ignore[union-attr]
    assert 300 not in table


def test_exec_collapses_threads(seeded: tuple[ProcessTable, Path]) -> None:
    table, _ = seeded
    table.apply(fork(50 * SEC, 200, 100))
    table.apply(thread(50 * SEC + 1, 200, 201))
    table.apply(exit_(50 * SEC + 2, 200, 201))
    table.apply(thread(50 * SEC + 3, 200, 203))
    # 203 exec'd: de_thread killed the others and 203 took the pid 200 (it emits no exit of its own).
    table.apply(execev(50 * SEC + 4, 200, "sh", "/bin/sh"))
    table.apply(exit_(51 * SEC, 200))
    assert 200 in table and len(table) == 2  # exited right away, not waiting for 203


def test_ancestors_stop_on_cycles_and_unknown_parents(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    make_proc(root, 10, ppid=11)
    make_proc(root, 11, ppid=12)
    make_proc(root, 12, ppid=10)
    make_proc(root, 20, ppid=999)  # parent not in /proc
    table = ProcessTable(proc_root=str(root))
    table.seed()
    assert [p.pid for p in table.ancestors(10)] == [11, 12]
    assert [p.pid for p in table.ancestors(10, depth=1)] == [11]
    assert table.ancestors(20) == []
    assert table.ancestors(4242) == []


def test_lazy_read_of_unknown_pid_and_thread(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    table = ProcessTable(proc_root=str(root))
    make_proc(root, 40, comm="late", exe="/usr/bin/late")
    make_proc(root, 41, comm="worker", tgid=40)
    assert table.exe_of([41, 40, 77]) == {41: "/usr/bin/late", 40: "/usr/bin/late", 77: ""}
    reads = table.stats["proc_reads"]
    assert table.exe_of([41, 40, 77]) == {41: "/usr/bin/late", 40: "/usr/bin/late", 77: ""}
    assert table.stats["proc_reads"] == reads  # each pid read once, misses remembered
    assert table.get(41).pid == 40  # type: ignore[union-attr]


def test_compat_mask_follows_exec(tmp_path: Path) -> None:
    i386 = tmp_path / "old32"
    i386.write_bytes(b"\x7fELF\x01\x01\x01" + b"\0" * 9 + b"\x02\x00\x03\x00" + b"\0" * 44)
    root = tmp_path / "proc"
    make_proc(root, 30, comm="old32", exe=str(i386), start_ticks=700)
    make_proc(root, 31, comm="new64", exe="/usr/bin/new64")
    table = ProcessTable(proc_root=str(root))
    table.seed()
    rows = np.array([31, 30, 30, 31, 99], dtype=np.uint32)
    assert table.compat_mask(rows).tolist() == [False, True, True, False, False]
    assert table.compat_mask(np.zeros(0, dtype=np.uint32)).tolist() == []
    table.apply(fork(80 * SEC, 32, 30))  # a fork keeps the image: still 32-bit
    assert table.compat_mask(np.array([32], dtype=np.uint32)).tolist() == [True]
    make_proc(root, 30, comm="bash", exe="/usr/bin/bash", start_ticks=700)
    table.apply(execev(81 * SEC, 30, "bash", "/usr/bin/bash"))  # execs a 64-bit program
    assert table.compat_mask(rows).tolist() == [False, False, False, False, False]


def test_start_times_tolerate_tick_rounding(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    make_proc(root, 1, comm="init", ppid=0)
    table = ProcessTable(proc_root=str(root))
    table.seed()
    offset = table._reader.boot_offset_ns
    # The kernel starts 50 at fork time ts; /proc shows ts rounded down to a tick.
    ts = 123 * TICK_NS + TICK_NS // 2 - offset
    make_proc(root, 50, comm="child", argv=("child", "1"), exe="/usr/bin/child", start_ticks=123, ppid=999)
    table.apply(fork(ts, 50, 999))  # unknown parent: /proc is read and its start time matches
    info = table.get(50)
    assert info is not None and info.exe == "/usr/bin/child" and info.start_ns == ts


@pytest.mark.slow
def test_memory_stays_bounded_over_200k_lifetimes(tmp_path: Path) -> None:
    table = ProcessTable(proc_root=str(tmp_path / "empty"), max_processes=1024, max_exited=512)
    table.apply(fork(1, 5, 0, "storm"))
    peak = 0
    for i in range(200_000):
        pid = 1000 + i % 40_000
        ts = 10 + i * 1000
        table.apply(fork(ts, pid, 5))
        table.apply(thread(ts + 1, pid, pid + 50_000))
        table.apply(exit_(ts + 2, pid, pid + 50_000))
        if i % 3:  # one exit in three is lost
            table.apply(exit_(ts + 3, pid))
        peak = max(peak, len(table) + table.stats["exited"] + table.stats["threads"])
        if i % 5000 == 0:
            table.reap(ts)
    assert peak <= 1024 + 512 + 1024 * 4 + 1
    assert len(table) <= 1024 and table.stats["exited"] <= 512
    assert table.stats["sweeps"] > 0 and table.stats["evicted"] > 0
    # Caches stay bounded too.
    assert table.stats["elf_cached"] <= 4096 and table.stats["cgroups_cached"] <= 4096


def test_bad_settings_and_missing_proc_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_processes"):
        ProcessTable(max_processes=0)
    with pytest.raises(ConfigError) as err:
        ProcessTable(proc_root=str(tmp_path / "nowhere")).seed()
    assert str(tmp_path / "nowhere") in str(err.value)


def test_has_compat_says_whether_compat_mask_can_be_skipped(tmp_path: Path) -> None:
    i386 = tmp_path / "old32"
    i386.write_bytes(b"\x7fELF\x01\x01\x01" + b"\0" * 9 + b"\x02\x00\x03\x00" + b"\0" * 44)
    root = tmp_path / "proc"
    make_proc(root, 41, comm="new64", exe="/usr/bin/new64")
    table = ProcessTable(proc_root=str(root))
    table.seed()
    assert not table.has_compat
    make_proc(root, 40, comm="old32", exe=str(i386), start_ticks=700)
    assert table.exe_of([40, 41]) == {40: str(i386), 41: "/usr/bin/new64"}  # read lazily
    assert table.has_compat
    assert table.compat_mask(np.array([41, 40], dtype=np.uint32)).tolist() == [False, True]


def test_seed_new_reads_only_processes_born_since_the_seed(seeded: tuple[ProcessTable, Path]) -> None:
    table, root = seeded
    reads = table.stats["proc_reads"]
    # born after the first scan and before the tracer ran: neither in the snapshot nor in a fork event
    make_proc(root, 300, comm="sh", ppid=100, argv=("sh", "-c", "x"), exe="/usr/bin/dash", start_ticks=900)
    new = table.seed_new()
    assert [(p.pid, p.exe) for p in new] == [(300, "/usr/bin/dash")]
    assert table.stats["proc_reads"] - reads == 3  # every pid is read: a known one may be a reused pid
    assert table.get(300) is not None and table.seed_new() == []
    # pid 100 exited and its pid was reused before the tracer ran (no exit event): the new process is taken
    make_proc(root, 100, comm="sleep", ppid=1, argv=("sleep", "9"), exe="/usr/bin/sleep", start_ticks=950)
    assert [(p.pid, p.exe) for p in table.seed_new()] == [(100, "/usr/bin/sleep")]
    assert table.get(100).exe == "/usr/bin/sleep"  # type: ignore[union-attr]
    # its fork event, queued while the tracer loaded, comes after: the same process, not a reused pid
    table.apply(fork(90 * SEC, 300, 100, "sh"))
    assert table.stats["pid_reused"] == 0 and table.get(300).ppid == 100  # type: ignore[union-attr]


def test_a_script_is_its_own_program_and_its_interpreter_is_its_exe(seeded: tuple[ProcessTable, Path]) -> None:
    table, root = seeded
    assert table.get(100).program == "/usr/bin/bash"  # type: ignore[union-attr]  # no exec seen: the exe
    start_ns = table.get(100).start_ns  # type: ignore[union-attr]
    # /proc says bash (the kernel ran the interpreter); the exec was of the script
    make_proc(root, 100, comm="backup.sh", ppid=1, argv=("/bin/bash", "/opt/backup.sh"), exe="/usr/bin/bash",
              start_ticks=500)
    table.apply(execev(60 * SEC, 100, "backup.sh", "/opt/backup.sh"))
    info = table.get(100)
    assert info is not None and info.start_ns == start_ns
    assert (info.exe, info.exec_path, info.program) == ("/usr/bin/bash", "/opt/backup.sh", "/opt/backup.sh")
    table.apply(fork(61 * SEC, 200, 100))  # a subshell runs the same script
    assert table.get(200).program == "/opt/backup.sh"  # type: ignore[union-attr]
    exes, programs = table.exe_and_program_of([100, 200, 1])
    assert exes == {100: "/usr/bin/bash", 200: "/usr/bin/bash", 1: "/usr/lib/systemd/systemd"}
    assert programs == {100: "/opt/backup.sh", 200: "/opt/backup.sh", 1: "/usr/lib/systemd/systemd"}
    # a gone process: the event alone. A relative path names no program (anyone can make ./tool anywhere),
    # and gives way to the one execve was given
    table.apply(execev(62 * SEC, 200, "tool", "./tool"))
    assert table.get(200).exec_path == "./tool" and table.get(200).program == ""  # type: ignore[union-attr]
    table.apply_exec_detail(execve(62 * SEC + 5, 200, "/srv/tool", ["./tool"]))
    assert table.get(200).program == "/srv/tool"  # type: ignore[union-attr]
    # an exec event without a path is a new image all the same: not the script it replaced
    table.apply(execev(63 * SEC, 200, "x", ""))
    assert table.get(200).program == table.get(200).exe  # type: ignore[union-attr]
    table.apply_exec_detail(execve(63 * SEC + 5, 200, "/srv/x", ["x"]))
    assert table.get(200).program == "/srv/x"  # type: ignore[union-attr]

"""The real tracer on real kernel events: `sysgram record` a workload, then `inspect` it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, build_c, requires_bpf, sysgram

pytestmark = [requires_bpf, pytest.mark.bpf]


def start_recorder(out: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "record", "-o", str(out), *extra],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "sysgram: ready" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("recorder never became ready")


def stop(proc: subprocess.Popen[str]) -> dict[str, object]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sysgram: stats "), last
    return json.loads(last.removeprefix("sysgram: stats "))


@pytest.fixture(scope="module")
def recorded(workload: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("rec")
    out = tmp / "rec.parquet"
    path = f"/tmp/sysgram-test-{uuid.uuid4().hex}"
    n = 7919
    proc = start_recorder(out, "--comm", workload.name)
    child = subprocess.Popen([str(workload), str(n), path])
    child.wait(timeout=30)
    time.sleep(0.5)
    stats = stop(proc)
    os.unlink(path)
    return {"out": out, "pid": child.pid, "n": n, "path": path, "stats": stats, "workload": str(workload)}


def test_recording_counts_exactly_n_getppid_and_no_drops(recorded: dict[str, object]) -> None:
    stats = recorded["stats"]
    assert isinstance(stats, dict) and stats["drops"] == 0 and stats["events"] > 0
    result = sysgram("inspect", str(recorded["out"]), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["drops"] == 0
    procs = {p["pid"]: p for p in summary["processes"]}
    me = procs[recorded["pid"]]
    assert me["syscalls"]["getppid"] == recorded["n"]
    assert me["exe"] == recorded["workload"]
    assert me["comm"] == Path(str(recorded["workload"])).name[:15]
    assert me["ppid"] == os.getpid()


def test_open_is_decoded_with_path_and_flags(recorded: dict[str, object]) -> None:
    result = sysgram("inspect", str(recorded["out"]), "--pid", str(recorded["pid"]), "--events", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    opens = [
        e
        for e in events
        if e.get("detail") and e["syscall"] in ("open", "openat") and e.get("name") == recorded["path"]
    ]
    assert len(opens) == 1
    assert opens[0]["flags"] & os.O_CREAT and opens[0]["flags"] & os.O_WRONLY
    assert opens[0]["res"] >= 0
    assert sum(1 for e in events if e["syscall"] == "getppid") == recorded["n"]


def test_exec_chain_gives_ppid_ancestors_comm_cmdline(tmp_path: Path, workload: Path) -> None:
    out = tmp_path / "chain.parquet"
    proc = start_recorder(out)
    marker = f"/tmp/sysgram-chain-{uuid.uuid4().hex}"
    shell = subprocess.Popen(["/bin/sh", "-c", f"{workload} 3 {marker}; true"])
    shell.wait(timeout=30)
    time.sleep(0.5)
    stop(proc)
    os.unlink(marker)
    from agent.capture.recording import read_recording
    from agent.proc import ProcessTable

    rec = read_recording(str(out))
    table = ProcessTable()
    child_pid = None
    for event in rec.events:
        from agent.events import DetailEvent, ProcEvent

        if isinstance(event, ProcEvent):
            table.apply(event)
            if event.kind == "exec" and event.filename == str(workload):
                child_pid = event.pid
        elif isinstance(event, DetailEvent) and event.syscall == "execve" and event.res == 0:
            table.apply_exec_detail(event)
            if event.args.get("filename") == str(workload):
                info = table.get(event.tgid)
                assert info is not None
                assert info.args == (str(workload), "3", marker)
                assert info.ppid == shell.pid
                assert info.comm == workload.name[:15]
    assert child_pid is not None
    ancestors = [a.pid for a in table.ancestors(child_pid)]
    assert ancestors[:1] == [shell.pid]
    # The exec splits the child's syscalls: up to its execve they are the shell's, after it the workload's.
    from agent.capture.recording import iter_thread_traces

    traces = [t for t in iter_thread_traces(rec) if t.pid == child_pid]
    before = [t for t in traces if t.exe != str(workload)]
    after = [t for t in traces if t.exe == str(workload)]
    assert len(after) == 1 and "execve" not in after[0].syscalls, [(t.exe, t.syscalls[:12]) for t in traces]
    assert after[0].syscalls.count("getppid") == 3
    if shell.pid != child_pid:  # the shell forked the child (it did not exec the workload itself)
        assert before and before[-1].syscalls[-1] == "execve"


def test_bad_recordings_are_one_line_exit_2(tmp_path: Path) -> None:
    truncated = tmp_path / "trunc.parquet"
    foreign = tmp_path / "foreign.parquet"
    good = tmp_path / "good.parquet"
    from agent.capture.recording import RecordingWriter

    w = RecordingWriter(str(good))
    w.close({})
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    import numpy as np

    from agent.events import SYSCALL_DTYPE

    bad_nr = tmp_path / "badnr.parquet"
    w = RecordingWriter(str(bad_nr))
    rows = np.zeros(3, dtype=SYSCALL_DTYPE)
    rows["nr"] = [0, 60000, 1]
    w.add_syscalls(rows)
    w.close({})
    cases = ((truncated, "truncated"), (foreign, "not a sysgram recording"), (bad_nr, "out of range"))
    for command in ("inspect", "replay"):
        for path, words in cases:
            extra = ("--no-model", "--state-dir", str(tmp_path / "state")) if command == "replay" else ()
            result = sysgram(command, str(path), *extra)
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
            assert str(path) in result.stderr and words in result.stderr


def test_32bit_process_syscalls_are_named_with_i386_numbers(tmp_path: Path, workload: Path) -> None:
    import shutil

    cc = shutil.which("gcc") or shutil.which("cc")
    exe32 = tmp_path / "workload32"
    built = subprocess.run(
        [cc or "cc", "-m32", "-O1", "-o", str(exe32), str(ROOT / "tests" / "workload.c")],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        pytest.skip(f"no 32-bit toolchain (gcc-multilib): {built.stderr.strip()[:200]}")
    out = tmp_path / "compat.parquet"
    proc = start_recorder(out, "--comm", exe32.name)
    marker = f"/tmp/sysgram-compat-{uuid.uuid4().hex}"
    child = subprocess.Popen([str(exe32), "4321", marker])
    child.wait(timeout=30)
    time.sleep(0.5)
    stop(proc)
    os.unlink(marker)
    summary = json.loads(sysgram("inspect", str(out), "--json").stdout)
    me = {p["pid"]: p for p in summary["processes"]}[child.pid]
    # i386 getppid is 64 (x86_64: 110); i386 64 would be 'getppid' only if named on the i386 table.
    assert me["syscalls"].get("getppid") == 4321


def test_record_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    for args, needle in (
        (("-o", "/nonexistent-dir/x.parquet", "--seconds", "1"), "not a writable directory"),
        (("-o", str(tmp_path / "x.parquet"), "--pid", "99999999", "--seconds", "1"), "no such process"),
        (("-o", str(tmp_path / "x.parquet"), "--seconds", "-1"), "positive duration"),
    ):
        result = sysgram("record", *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert not os.path.exists("/nonexistent-dir")


def test_a_process_born_while_the_tracer_loads_is_recorded_with_its_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The /proc scan comes before the tracer (the enforcer must protect what runs from the first event),
    # and loading the BPF programs takes seconds: a process born in between has neither a snapshot row nor
    # a fork event. Here one is born exactly then, by starting it from inside the source's start.
    from agent.capture.recording import iter_thread_traces, read_recording
    from agent.capture.source import LiveSource
    from agent.pipeline import Filters, build_recorder_pipeline, run_live

    marker = f"sysgram-born-while-loading-{uuid.uuid4().hex[:8]}"
    loop = f"import os, time\nwhile True:\n    os.getppid(); time.sleep(0.005)  # {marker}"
    children: list[subprocess.Popen[bytes]] = []
    real_start = LiveSource.start

    def start_with_a_birth(self: LiveSource) -> None:
        children.append(subprocess.Popen([sys.executable, "-c", loop]))
        time.sleep(0.3)  # it runs before the tracer attaches
        real_start(self)

    monkeypatch.setattr(LiveSource, "start", start_with_a_birth)
    out = tmp_path / "rec.parquet"
    pipeline = build_recorder_pipeline(str(out), Filters())
    try:
        assert run_live(pipeline, seconds=1.5, nice=None) == 0
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)
    pid = children[0].pid
    rec = read_recording(str(out))
    assert [p.exe for p in rec.processes if p.pid == pid] == [os.path.realpath(sys.executable)]
    traces = [t for t in iter_thread_traces(rec) if t.pid == pid and t.tid == pid]
    assert traces and traces[0].exe == os.path.realpath(sys.executable)
    assert traces[0].syscalls.count("getppid") >= 10 and not traces[0].from_start  # born before the tracer


@pytest.fixture(scope="module")
def args6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled tests/args6.c: openat, sendto and linkat with their fourth to sixth arguments set."""
    return build_c(ROOT / "tests" / "args6.c", tmp_path_factory.mktemp("bin") / "sysgram-args6")


def test_details_carry_all_six_arguments_of_a_native_syscall(tmp_path: Path, args6: Path) -> None:
    # The entry is kept by the raw sys_enter program from pt_regs: each x86_64 argument register
    # (rdi rsi rdx r10 r8 r9) reaches its decoded field.
    out = tmp_path / "args6.parquet"
    target = tmp_path / "target"
    port = 40000 + os.getpid() % 20000
    proc = start_recorder(out, "--comm", args6.name)
    child = subprocess.Popen([str(args6), str(target), str(port)])
    assert child.wait(timeout=30) == 0
    time.sleep(0.5)
    stop(proc)
    result = sysgram("inspect", str(out), "--pid", str(child.pid), "--events", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    details = {
        e["syscall"]: e
        for e in events
        if (e.get("detail") and e["syscall"] in ("sendto", "linkat", "umount2")) or e.get("name") == str(target)
    }
    assert details["openat"]["flags"] & os.O_CREAT and details["openat"]["mode"] == 0o640  # r10
    sent = details["sendto"]
    assert (sent["size"], sent["addr"], sent["port"]) == (3, "127.0.0.1", port)  # rdx; r8 and its length r9
    linked = details["linkat"]
    assert linked["newpath"] == f"{target}.link" and linked["flags"] == 0x400  # r10, r8 (AT_SYMLINK_FOLLOW)
    assert details["umount2"]["res"] < 0 and details["umount2"]["flags"] == 2  # MNT_DETACH; event sys_exit_umount


def test_no_program_sits_on_a_per_syscall_entry_tracepoint() -> None:
    # Any program on a syscalls:sys_enter_X tracepoint costs every syscall on the host the kernel's
    # dispatch (docs/performance.md); entries are kept by the raw sys_enter program instead.
    from agent.capture._decode import SPECS
    from agent.capture._loader import Tracer
    from agent.capture.names import syscall_number

    tracer = Tracer(self_tgid=os.getpid(), detail_syscalls=set(SPECS), compact_rb_pages=64, detail_rb_pages=64)
    try:
        attached = [key.decode() if isinstance(key, bytes) else key for key in tracer.bpf.tracepoint_fds]
        specs = tracer.bpf["arg_spec"]
        kept_rows = {i: int(specs[specs.Key(i)].kept) for i in range(512)}
    finally:
        tracer.close()
    assert any(name.startswith("syscalls:sys_exit_openat") for name in attached), attached
    assert not [name for name in attached if name.startswith("syscalls:sys_enter_")]
    # an entry is kept only where an exit will send and remove it: not for a syscall without a trace event
    missing = [name for name in ("init_module", "finit_module") if not os.path.isdir(
        f"/sys/kernel/tracing/events/syscalls/sys_exit_{name}")]
    assert not set(missing) & set(tracer.attached.values())
    assert all(not kept_rows[syscall_number(name)] for name in missing)
    assert "syscalls:sys_exit_umount" in attached


FLOOD_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    double seconds = atof(argv[1]);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        for (int i = 0; i < 1000; i++)
            openat(AT_FDCWD, "/nonexistent/sysgram-flood", O_RDONLY);
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
    return 0;
}
"""


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLOOD_C compiled: `flood SECONDS` makes failing openat calls as fast as it can."""
    root = tmp_path_factory.mktemp("flood")
    (root / "flood.c").write_text(FLOOD_C)
    return build_c(root / "flood.c", root / "flood")


@contextmanager
def draining_openat_capture() -> Iterator[tuple[Any, list[int]]]:
    """A LiveSource with openat details whose queue a thread keeps emptying: (source, [groups taken]).
    Closed on exit unless the test closed it."""
    from agent.capture.source import LiveSource

    source = LiveSource(detail_syscalls={"openat"})
    source.start()
    handed = [0]
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            handed[0] += len(source.get(0.05) or [])

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        yield source, handed
    finally:
        stop.set()
        drainer.join(5)
        source.close()


def test_a_flood_of_details_does_not_hold_the_reader_in_one_turn(flood: Path) -> None:
    # An unprivileged open() loop makes details faster than the reader decodes them. libbpf keeps
    # consuming a ring while records keep coming: without a per-turn budget the reader never finished a
    # turn, handed nothing over, and the agent's /healthz saw the capture stalled.
    longest = 0.0
    with draining_openat_capture() as (source, handed):
        flooding = subprocess.Popen([str(flood), "3"])
        last, since = source.last_turn, time.monotonic()
        while flooding.poll() is None:
            time.sleep(0.02)
            if source.last_turn != last:
                last, since = source.last_turn, time.monotonic()
            longest = max(longest, time.monotonic() - since)
        assert flooding.returncode == 0
        drops = source.drops()
    assert longest < 1.0, f"the reader stood still for {longest:.2f} s"
    assert handed[0] > 0
    print(f"flood: reader's longest turn {longest:.3f} s, drops {drops}")


@pytest.mark.parametrize("unfaulted", [False, True], ids=["path on the stack", "path in an untouched page"])
def test_an_execve_from_a_thread_other_than_the_leader_keeps_its_details(tmp_path: Path, unfaulted: bool) -> None:
    # The exec'ing thread takes the leader's id (de_thread): its entry and its argv record were kept under
    # its old id, and its exit record comes under the new one. Before, that execve reached no rule.
    from agent.capture.source import LiveSource
    from agent.events import DetailEvent

    exe = build_c(ROOT / "tests" / "thread_exec.c", tmp_path / "thread_exec", "-pthread")
    marker = f"sysgram-thread-exec-{uuid.uuid4().hex[:8]}"
    extra = []
    if unfaulted:  # the entry cannot read the path (a BPF program cannot fault a page in): the kernel's copy
        (tmp_path / "pathfile").write_bytes(b"/bin/true\0")
        extra = [str(tmp_path / "pathfile")]
    source = LiveSource(detail_syscalls={"execve"})
    source.start()
    execs: list[DetailEvent] = []
    try:
        child = subprocess.Popen([str(exe), marker, *extra])
        assert child.wait(10) == 0  # /bin/true ran in the thread's place
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(execs) < 2:
            group = source.get(0.1) or []
            execs += [c for c in group if isinstance(c, DetailEvent) and c.syscall == "execve" and c.tgid == child.pid]
    finally:
        source.close()
    ours = [e for e in execs if e.args.get("filename") == "/bin/true"]  # not the exec of thread_exec itself
    assert ours, [e.args for e in execs]
    assert ours[0].res == 0 and ours[0].tid == child.pid
    assert ours[0].args["argv"] == ["/bin/true", marker]


def test_stopping_during_a_flood_of_details_ends_within_its_deadline(flood: Path) -> None:
    # The reader's last reads at stop run while the programs still send: under a flood the ring never
    # empties, so they stop at a deadline instead of reading on while the rings are freed under them.
    from agent.capture.source import FINAL_DRAIN_S

    with draining_openat_capture() as (source, _):
        flooding = subprocess.Popen([str(flood), "20"])
        try:
            time.sleep(1.0)
            reader = next(t for t in source._threads if t.name == "sysgram-reader")
            started = time.monotonic()
            source.stop()
            took = time.monotonic() - started
            assert not reader.is_alive(), "the reader was still reading when stop() gave up on it"
        finally:
            flooding.kill()
            flooding.wait()
    assert took < FINAL_DRAIN_S + 1.0, took

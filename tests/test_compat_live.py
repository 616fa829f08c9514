"""32-bit syscalls on the real kernel: a 64-bit program's `int 0x80` (tests/int80.c).

Each of its syscalls must come flagged as i386 (the tracer reads the kernel's TS_COMPAT), so it is named as
what it is, a deny list catches it, and the agent raises its ABI alert. Read as native numbers, i386 getppid
(64) would pass for semget and get past a deny list of getppid.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.capture.names import syscall_name, syscall_number
from agent.enforce import Enforcer
from agent.events import FLAG_COMPAT, KernelSignal, ProcEvent
from agent.pipeline import ABI_RULE_32_IN_64, ABI_RULE_64_IN_32
from tests.conftest import ROOT, enforcing_capture, requires_bpf, start_sysgram

pytestmark = [requires_bpf, pytest.mark.bpf]

@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/denied (deny_syscalls: getppid) and bin/free (no policy): both tests/int80.c."""
    root = tmp_path_factory.mktemp("int80")
    (root / "bin").mkdir()
    denied = root / "bin" / "denied"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    # non-PIE: int 0x80 passes 32-bit pointers, so the path it opens must sit below 4 GiB
    subprocess.run([cc, "-O1", "-no-pie", "-o", str(denied), str(ROOT / "tests" / "int80.c")], check=True)
    shutil.copy(denied, root / "bin" / "free")
    (root / "config.yaml").write_text(f"enforce:\n  enabled: true\n  deny_syscalls:\n    {denied}: [getppid]\n")
    return root


class Seen:
    """What the capture delivered for the pids a test watches."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.rows: list[np.ndarray] = []
        self.signals: list[KernelSignal] = []
        self.forks: list[ProcEvent] = []
        self.lock = threading.Lock()

    def add(self, chunk: Any) -> None:
        with self.lock:
            if isinstance(chunk, np.ndarray) and self.pids:
                mine = chunk[np.isin(chunk["tgid"], list(self.pids))]
                if len(mine):
                    self.rows.append(mine)
            elif isinstance(chunk, KernelSignal):
                self.signals.append(chunk)
            elif isinstance(chunk, ProcEvent) and chunk.kind == "fork" and chunk.ppid in self.pids:
                self.forks.append(chunk)

    def rows_of(self, pid: int) -> np.ndarray:
        with self.lock:
            rows = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=[("tgid", "<u4")])
        return rows[rows["tgid"] == pid]


@pytest.fixture(scope="module")
def live(programs: Path) -> Iterator[tuple[Enforcer, Seen]]:
    seen = Seen()
    with enforcing_capture(programs / "config.yaml", seen.add, 500_000) as (enforcer, tracer):
        if tracer.compat.status_offset is None:
            pytest.skip(f"no per-syscall 32-bit flag here: {tracer.compat.reason}")
        yield enforcer, seen


def _run(seen: Seen, *argv: str) -> tuple[int, int]:
    proc = subprocess.Popen(list(argv))
    with seen.lock:
        seen.pids.add(proc.pid)
    code = proc.wait(timeout=60)
    time.sleep(0.5)  # the rows wait for every CPU's next batch (the capture's ordering watermark)
    return proc.pid, code


def test_int80_syscalls_come_flagged_and_named_as_i386(programs: Path, live: tuple[Enforcer, Seen]) -> None:
    _, seen = live
    pid, code = _run(seen, str(programs / "bin" / "free"), "/etc/hostname", "0.2")
    assert code == 0
    rows = seen.rows_of(pid)
    compat = rows[(rows["flags"] & FLAG_COMPAT) != 0]
    native = rows[(rows["flags"] & FLAG_COMPAT) == 0]
    assert {"getpid", "open", "getppid"} <= {syscall_name(int(nr), compat=True) for nr in compat["nr"]}
    assert len(compat) >= 100  # one getppid a millisecond for 0.2 s
    assert len(native) > 0  # its libc start-up and usleep are native syscalls
    # i386 getppid read as a native number would be semget: no such native row
    assert syscall_number("semget") not in set(native["nr"].tolist())


def test_native_calls_are_not_flagged(programs: Path, live: tuple[Enforcer, Seen]) -> None:
    _, seen = live
    pid, code = _run(seen, str(programs / "bin" / "free"), "native", "/etc/hostname", "0.2")
    assert code == 0
    rows = seen.rows_of(pid)
    assert len(rows) >= 100
    assert not (rows["flags"] & FLAG_COMPAT).any()
    assert syscall_number("getppid") in set(rows["nr"].tolist())


def test_a_32_bit_programs_threads_are_threads(tmp_path: Path, live: tuple[Enforcer, Seen]) -> None:
    """Its clone (clone3, in today's 32-bit glibc) is an i386 syscall: the fork record must still carry its
    flags, else every thread is taken for a process of its own. (An i386 clone, 120, is natively getresgid:
    the record says the number is i386; tests/test_capture_decode_compat.py.)"""
    _, seen = live
    exe = tmp_path / "threads32"
    cc = shutil.which("gcc") or shutil.which("cc") or "cc"
    built = subprocess.run([cc, "-m32", "-O1", "-pthread", "-o", str(exe), str(ROOT / "tests" / "threads.c")],
                           capture_output=True)
    if built.returncode != 0:
        pytest.skip(f"no 32-bit toolchain (gcc-multilib): {built.stderr.decode()[:200]}")
    pid, code = _run(seen, str(exe), "3")
    assert code == 0
    forks = [f for f in seen.forks if f.ppid == pid or f.pid == pid]
    assert len(forks) == 3 and all(f.is_thread and f.pid == pid for f in forks), forks


def test_a_deny_list_catches_its_syscall_made_through_int80(programs: Path, live: tuple[Enforcer, Seen]) -> None:
    _, seen = live
    pid, code = _run(seen, str(programs / "bin" / "denied"), "/etc/hostname", "3")
    assert code == -signal.SIGKILL, "int 0x80 getppid got past a deny list of getppid"
    mine = [s for s in seen.signals if s.pid == pid]
    assert mine and mine[0].compat and syscall_name(mine[0].nr, compat=True) == "getppid"


RULES = """
- rule: Test open by a 32-bit program
  desc: a 32-bit program's open reaches the rules (its details come from the raw sys_enter/sys_exit pair)
  condition: evt.type in (open, openat) and evt.is_open_read = true and fd.num >= 0 and sysgram.proc.is_32bit = true
    and fd.name startswith %(work)s
  output: 32-bit open of %%fd.name by %%proc.exepath
  priority: NOTICE
- rule: Test connect by a 32-bit program
  desc: a 32-bit program's connect (through socketcall) reaches the rules with its address
  condition: evt.type = connect and sysgram.proc.is_32bit = true and fd.rport = %(port)d
  output: 32-bit connect to %%fd.name (port %%fd.rport) by %%proc.exepath
  priority: NOTICE
- rule: Test open through int 0x80
  desc: a 64-bit program's i386 open reaches the rules too
  condition: evt.type = open and fd.name startswith %(work)s and sysgram.proc.is_32bit = false
  output: int 0x80 open of %%fd.name by %%proc.exepath
  priority: NOTICE
"""


def test_the_agent_sees_32_bit_syscalls_and_alerts_a_64_bit_program_making_them(
    programs: Path, tmp_path: Path
) -> None:
    cc = shutil.which("gcc") or shutil.which("cc") or "cc"
    exe32 = tmp_path / "connect32"
    built = subprocess.run([cc, "-m32", "-O1", "-o", str(exe32), str(ROOT / "tests" / "connect.c")],
                           capture_output=True)
    if built.returncode != 0:
        pytest.skip(f"no 32-bit toolchain (gcc-multilib): {built.stderr.decode()[:200]}")
    work = tmp_path / "work"
    work.mkdir()
    (work / "read-by-32").write_text("x")
    (work / "read-by-int80").write_text("x")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES % {"work": work, "port": port})
    alerts = tmp_path / "alerts.jsonl"
    agent = start_sysgram(
        "run", "--no-model", "--rules", str(rules), "--alerts-jsonl", str(alerts),
        "--state-dir", str(tmp_path / "state"), "--quiet",
    )
    try:
        # compat_details "auto" (the default): the 32-bit program's exec attaches the 32-bit exit program;
        # each program below sleeps 0.3 s before its opens, so they come after that
        run32 = subprocess.Popen([str(exe32), "127.0.0.1", str(port), str(work / "read-by-32")])
        gate = subprocess.Popen([str(programs / "bin" / "free"), str(work / "read-by-int80"), "0.3"])
        plain = subprocess.Popen([str(programs / "bin" / "free"), "native", str(work / "read-by-int80"), "0.3"])
        assert run32.wait(timeout=60) == 0  # it connected
        assert gate.wait(timeout=60) == 0 and plain.wait(timeout=60) == 0
        time.sleep(1.0)
    finally:
        server.close()
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    records = [json.loads(line) for line in alerts.read_text().splitlines()] if alerts.exists() else []
    ours = {gate.pid, plain.pid, run32.pid}
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["output_fields"].get("proc.pid") in ours:
            by_rule.setdefault(r["rule"], []).append(r["output_fields"])

    # the 64-bit program's int 0x80: one ABI alert, naming its i386 calls; none for the others
    abi = by_rule.get(ABI_RULE_32_IN_64, [])
    assert [f["proc.pid"] for f in abi] == [gate.pid] and ABI_RULE_64_IN_32 not in by_rule
    assert abi[0]["sysgram.abi.syscalls"][:3] == ["getpid", "open", "getppid"]
    assert abi[0]["proc.exe"] == str(programs / "bin" / "free")
    # 32-bit syscalls reach the rules with their arguments: the 32-bit program's openat and its connect
    # (made through socketcall), and the 64-bit program's i386 open
    assert [(f["proc.pid"], f["fd.name"]) for f in by_rule.get("Test open by a 32-bit program", [])] == [
        (run32.pid, str(work / "read-by-32"))]
    connects = by_rule.get("Test connect by a 32-bit program", [])
    assert [(f["proc.pid"], f["fd.rport"]) for f in connects] == [(run32.pid, port)]
    assert connects[0]["fd.name"].endswith(f"->127.0.0.1:{port}")
    assert [(f["proc.pid"], f["fd.name"]) for f in by_rule.get("Test open through int 0x80", [])] == [
        (gate.pid, str(work / "read-by-int80"))]
    stats = json.loads(err.rsplit("sysgram: stats ", 1)[1].splitlines()[0])
    assert stats["abi_mismatches"] >= 1
    assert stats["compat_details_started"] == 1 and "runs 32-bit code" in err


@pytest.mark.parametrize("build", [["-m32"], ["-DINT80", "-no-pie"]], ids=["32-bit program", "int 0x80"])
def test_without_the_kernel_flag_32bit_syscalls_are_not_kept_as_native_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, build: list[str]
) -> None:
    # No BTF (no TS_COMPAT offset): the sys_enter program must still not keep an i386 setpgid (57) as
    # x86_64 fork (57), from a 32-bit program (its code segment) or a 64-bit one's int 0x80 (the
    # instruction before its return address): no exit would ever send or remove the entry, and the fork
    # handler would read its registers as clone flags.
    import os

    import agent.capture._loader as loader
    from agent.capture._btf import CompatProbe

    cc = shutil.which("gcc") or shutil.which("cc")
    exe = tmp_path / "setpgid32"
    built = subprocess.run([cc or "cc", *build, "-O1", "-o", str(exe), str(ROOT / "tests" / "setpgid32.c")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"no 32-bit toolchain (gcc-multilib): {built.stderr.strip()[:200]}")
    monkeypatch.setattr(loader, "compat_probe", lambda: CompatProbe(None, 0, "test: no BTF"))
    tracer = loader.Tracer(self_tgid=os.getpid(), detail_syscalls={"openat"}, compact_rb_pages=64,
                           detail_rb_pages=64)
    assert syscall_number("fork") == syscall_number("setpgid", compat=True) == 57
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen([str(exe), "2"])
    blocked = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.DEVNULL)  # a native openat that waits
    try:
        time.sleep(1.0)  # the 32-bit child has made its setpgid and sleeps
        pending = {int(key.value) for key in tracer.bpf["pending"]}
        assert child.poll() is None and blocked.poll() is None
        assert blocked.pid in pending  # the map is read right: a 64-bit syscall in progress is there
        assert child.pid not in pending
    finally:
        with open(fifo, "w"):
            pass  # releases cat
        blocked.wait(10)
        child.wait(10)
        tracer.close()


def test_an_entry_whose_exit_never_came_goes_with_its_thread(programs: Path) -> None:
    # compat_details auto, before the exit program is attached: a 32-bit syscall's entry is kept and no
    # exit sends or removes it. sched_process_exit removes it, else every such thread would leave one in
    # the pending map until it filled and new details were lost.
    import os

    from agent.capture._loader import Tracer

    tracer = Tracer(self_tgid=os.getpid(), detail_syscalls={"open", "openat"}, compact_rb_pages=64,
                    detail_rb_pages=64, compat_details="auto")
    if tracer.compat.status_offset is None:
        tracer.close()
        pytest.skip(f"no 32-bit detection here: {tracer.compat.reason}")
    try:
        assert not tracer.compat_exit_attached
        child = subprocess.Popen([str(programs / "bin" / "free"), "/etc/hostname", "1.5"])
        time.sleep(0.9)  # it has made its i386 open and loops on getppid
        during = {int(key.value) for key in tracer.bpf["pending"]}
        assert child.wait(10) == 0
        time.sleep(0.2)
        after = {int(key.value) for key in tracer.bpf["pending"]}
    finally:
        tracer.close()
    assert child.pid in during
    assert child.pid not in after

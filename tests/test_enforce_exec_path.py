"""Per-exe deny policies (enforce.deny_syscalls) on the real kernel, whatever path the program is exec'd by.

The kernel matches the path string given to exec, so ``./x``, a symlink or ``a/../x`` slip past it alone;
Enforcer.on_exec (called by the pipeline on every exec) applies the policy by /proc/PID/exe."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.enforce import Enforcer
from tests.conftest import ROOT, enforcing_capture, requires_bpf, start_sysgram

pytestmark = [requires_bpf, pytest.mark.bpf]


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/denied (under policy) and bin/free (not): tests/open_and_wait.c, which calls getppid in a loop."""
    root = tmp_path_factory.mktemp("exec-path")
    (root / "bin").mkdir()
    denied = root / "bin" / "denied"
    subprocess.run(
        [shutil.which("cc") or "cc", "-O1", "-o", str(denied), str(ROOT / "tests" / "open_and_wait.c")],
        check=True,
    )
    shutil.copy(denied, root / "bin" / "free")
    (root / "innocent-name").symlink_to(denied)
    (root / "config.yaml").write_text(f"enforce:\n  enabled: true\n  deny_syscalls:\n    {denied}: [getppid]\n")
    return root


class Execs:
    """The pids whose exec event came through the capture: the point where the pipeline calls on_exec (the
    kernel's own exec-time policy step has run by then; calling earlier would race with it)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.cond = threading.Condition()

    def add(self, pid: int) -> None:
        with self.cond:
            self.seen.add(pid)
            self.cond.notify_all()

    def wait(self, pid: int, timeout: float = 30.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pid in self.seen, timeout)


@pytest.fixture(scope="module")
def live(programs: Path) -> Iterator[tuple[Enforcer, Execs]]:
    from agent.events import ProcEvent

    execs = Execs()

    def on_chunk(chunk: object) -> None:
        if isinstance(chunk, ProcEvent) and chunk.kind == "exec":
            execs.add(chunk.pid)

    with enforcing_capture(programs / "config.yaml", on_chunk, 200_000) as (enforcer, _):
        yield enforcer, execs


def run(argv0: str, cwd: Path, live: tuple[Enforcer, Execs] | None, seconds: str = "3") -> int:
    proc = subprocess.Popen([argv0, str(cwd / "opened"), seconds], cwd=cwd)
    if live is not None:
        enforcer, execs = live
        assert execs.wait(proc.pid), "the exec event never came"
        enforcer.on_exec(proc.pid, argv0)  # what the pipeline does on the exec event
    return proc.wait(timeout=60)


def test_the_kernel_alone_catches_the_configured_path(programs: Path, live: tuple[Enforcer, Execs]) -> None:
    assert run(str(programs / "bin" / "denied"), programs, None) == -signal.SIGKILL


@pytest.mark.parametrize("argv0", ["innocent-name", "./bin/denied", "bin/../bin/denied"])
def test_other_paths_to_the_same_program_are_caught_at_exec(
    programs: Path, live: tuple[Enforcer, Execs], argv0: str
) -> None:
    path = argv0 if argv0.startswith(".") else str(programs / argv0)
    assert run(path, programs, live) == -signal.SIGKILL


def test_a_program_without_a_policy_runs_on(programs: Path, live: tuple[Enforcer, Execs]) -> None:
    assert run(str(programs / "bin" / "free"), programs, live, seconds="0.5") == 0


def test_the_agent_kills_a_symlinked_denied_program_and_records_it(programs: Path, tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.jsonl"
    agent = start_sysgram(
        "run", "--no-model", "--no-default-rules", "--quiet", "--config", str(programs / "config.yaml"),
        "--state-dir", str(tmp_path / "state"), "--alerts-jsonl", str(alerts),
    )
    try:
        victim = subprocess.Popen([str(programs / "innocent-name"), str(programs / "opened"), "3"], cwd=programs)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        assert run(str(programs / "bin" / "free"), programs, None, seconds="0.5") == 0
    finally:
        agent.send_signal(signal.SIGINT)
        agent.communicate(timeout=60)
    assert agent.returncode == 0
    # the kernel's kill is on the record: who, what was denied, what was done
    records = [json.loads(line) for line in alerts.read_text().splitlines()]
    blocks = [r for r in records if r["rule"] == "Sysgram blocked a process"]
    assert [b["output_fields"]["proc.pid"] for b in blocks] == [victim.pid]
    assert blocks[0]["output_fields"]["evt.type"] == "getppid"
    assert "SIGKILL" in blocks[0]["output_fields"]["sysgram.action"]

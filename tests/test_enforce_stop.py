"""`enforce.action: stop`: the offender is frozen with SIGSTOP (kept for forensics), not killed, and SIGCONT
resumes it."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, build_c, requires_bpf
from tests.test_pipeline_live import LiveAgent, agent_with_rule

pytestmark = [requires_bpf, pytest.mark.bpf]


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def blocking_agent(tmp_path: Path, config: str) -> tuple[LiveAgent, str]:
    """An agent with ``config`` and one blocking rule: an open of the returned path."""
    blocked = f"/tmp/sysgram-freeze-{uuid.uuid4().hex}"
    agent = agent_with_rule(tmp_path, "Test open of a forbidden file",
                            f"evt.type in (open, openat) and fd.name = {blocked}",
                            "forbidden open by %proc.name (pid %proc.pid)", priority="CRITICAL",
                            tags="[sysgram.block]", config=config)
    return agent, blocked


def stopping_agent(tmp_path: Path) -> tuple[LiveAgent, str]:
    """An agent with enforcement on, action stop, and one blocking rule: an open of the returned path."""
    return blocking_agent(tmp_path, "enforce:\n  enabled: true\n  action: stop\n")


def state_once_stopped(pid: int, timeout: float = 10.0) -> str:
    """The process's state once it is stopped (T), or whatever it is when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_state(pid) != "T":
        time.sleep(0.02)
    return process_state(pid)


def test_stop_action_freezes_the_offender_and_sigcont_resumes_it(tmp_path: Path) -> None:
    opener = tmp_path / "sysgram-opener"
    subprocess.run([shutil.which("cc") or "cc", "-O1", "-o", str(opener), str(ROOT / "tests" / "open_and_wait.c")],
                   check=True)
    agent, blocked = stopping_agent(tmp_path)
    victim = subprocess.Popen([str(opener), blocked, "3"])  # after its open, syscalls for 3 s, then exit 0
    try:
        state = state_once_stopped(victim.pid)
        assert victim.poll() is None  # alive: frozen, not killed
        time.sleep(0.5)  # the agent's own fallback signal (50 ms after the verdict) has gone out too
        frozen = process_state(victim.pid)
        victim.send_signal(signal.SIGCONT)  # an analyst lets it go on: it must not be stopped again
        with contextlib.suppress(subprocess.TimeoutExpired):
            victim.wait(timeout=10)
    finally:
        resumed_state = process_state(victim.pid) if victim.poll() is None else "exited"
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        assert agent.stop() == 0, agent.stderr
        Path(blocked).unlink(missing_ok=True)
    assert state == "T" and frozen == "T"
    blocks = [r for r in agent.records() if r["rule"] == "Sysgram blocked a process"]
    assert [r["output_fields"]["sysgram.action"] for r in blocks if r["output_fields"]["proc.pid"] == victim.pid] == [
        "stop sent"
    ]
    assert (resumed_state, victim.returncode) == ("exited", 0)  # it ran its loop to the end after SIGCONT


def test_a_victim_asleep_in_a_syscall_is_stopped_once_and_sigcont_resumes_it(tmp_path: Path) -> None:
    """Stopped by the agent's fallback signal (it made no syscall after the verdict): after SIGCONT its
    interrupted read restarts and must not be stopped again."""
    import sys

    agent, blocked = stopping_agent(tmp_path)
    # opens the file, then sleeps in read() on a pipe nobody writes: no syscall for the BPF side to stop it at
    victim = subprocess.Popen([sys.executable, "-c", f"import os; open({blocked!r}, 'w').close(); os.read(0, 1)"],
                              stdin=subprocess.PIPE)
    try:
        state = state_once_stopped(victim.pid)
        victim.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # its read restarts at once; stopped again, it would be T here
        resumed = process_state(victim.pid)
    finally:
        victim.kill()
        victim.wait()
        assert agent.stop() == 0, agent.stderr
        Path(blocked).unlink(missing_ok=True)
    assert (state, resumed) == ("T", "S")


def test_an_in_kernel_kill_after_a_stop_still_raises_its_alert(tmp_path: Path) -> None:
    """A process the agent stopped (a rule) is resumed by an analyst and then makes a syscall its program's
    deny list forbids: the kernel kills it, and that kill gets its own alert. The kernel says which kind
    each signal is; the agent no longer guesses from having blocked that pid before."""
    prog = build_c(ROOT / "tests" / "open_wait_getppid.c", tmp_path / "sysgram-stop-then-deny")
    go = tmp_path / "go"
    agent, blocked = blocking_agent(
        tmp_path, f"enforce:\n  enabled: true\n  action: stop\n  deny_syscalls:\n    {prog}: [getppid]\n")
    victim = subprocess.Popen([str(prog), blocked, str(go)])
    try:
        assert state_once_stopped(victim.pid) == "T"
        go.touch()
        victim.send_signal(signal.SIGCONT)
        code = victim.wait(timeout=20)
        agent.wait_for(lambda: [r for r in agent.records() if "(in kernel)" in str(r["output_fields"])], 10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        assert agent.stop() == 0, agent.stderr
        Path(blocked).unlink(missing_ok=True)
    assert code == -signal.SIGKILL  # the deny list's kill, in the kernel
    actions = [r["output_fields"]["sysgram.action"] for r in agent.records()
               if r["rule"] == "Sysgram blocked a process" and r["output_fields"]["proc.pid"] == victim.pid]
    assert actions == ["stop sent", "SIGKILL sent (in kernel)"]
    assert agent.stats["blocks"] == 2 and agent.stats["kernel_signals"] >= 1  # the stop may go by the fallback

"""Blocking on the real kernel: a rule tagged sysgram.block kills the process that matched it (SIGKILL
from the BPF program at its next syscall); other processes and allow-listed ones live on."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, requires_bpf, start_sysgram
from tests.test_enforce_stop import blocking_agent

pytestmark = [requires_bpf, pytest.mark.bpf]


@pytest.fixture(scope="module")
def opener(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "sysgram-opener"
    subprocess.run(
        [shutil.which("cc") or "cc", "-O1", "-o", str(out), str(ROOT / "tests" / "open_and_wait.c")],
        check=True,
    )
    return out


def test_sysgram_block_rule_kills_only_the_offender(tmp_path: Path, opener: Path) -> None:
    blocked = f"/tmp/sysgram-block-{uuid.uuid4().hex}"
    other = f"/tmp/sysgram-other-{uuid.uuid4().hex}"
    allowed_copy = tmp_path / "allowed-opener"
    shutil.copy(opener, allowed_copy)
    rules = tmp_path / "block.yaml"
    rules.write_text(
        "- rule: Test open of a forbidden file\n"
        "  desc: a file no process may open\n"
        f"  condition: evt.type in (open, openat) and fd.name = {blocked}\n"
        "  output: forbidden open of %fd.name by %proc.name (pid %proc.pid)\n"
        "  priority: CRITICAL\n"
        "  tags: [sysgram.block]\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(f"enforce:\n  enabled: true\n  allow_exes: [{allowed_copy}]\n")
    alerts = tmp_path / "alerts.jsonl"
    agent = start_sysgram(
            "run",
            "--no-model",
            "--no-default-rules",
            "--rules",
            str(rules),
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            "--alerts-jsonl",
            str(alerts),
            "--quiet",
    )
    try:
        victim = subprocess.Popen([str(opener), blocked, "3"])
        bystander = subprocess.Popen([str(opener), other, "1"])
        allowed = subprocess.Popen([str(allowed_copy), blocked, "1"])
        assert victim.wait(timeout=30) == -signal.SIGKILL
        assert bystander.wait(timeout=30) == 0
        assert allowed.wait(timeout=30) == 0
    finally:
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=60)
        for p in (blocked, other):
            Path(p).unlink(missing_ok=True)
    assert agent.returncode == 0, err
    stats = json.loads(err.strip().splitlines()[-1].removeprefix("sysgram: stats "))
    assert stats["blocks"] >= 1
    records = [json.loads(line) for line in alerts.read_text().splitlines()]
    blocks = [r for r in records if r["rule"] == "Sysgram blocked a process"]
    assert any(r["output_fields"]["proc.pid"] == victim.pid for r in blocks)
    assert all(r["output_fields"]["proc.pid"] != allowed.pid for r in blocks)  # a refusal is not a block ...
    refused = [r for r in records if r["rule"] == "Sysgram did not block a process"]
    assert any(r["output_fields"]["proc.pid"] == allowed.pid and "allow" in r["output_fields"]["sysgram.action"]
               for r in refused)  # ... but its own alert, saying why
    assert any(r["rule"] == "Test open of a forbidden file" for r in records)


def test_an_allow_listed_script_is_never_killed(tmp_path: Path) -> None:
    """The kernel protects a script by its own path (the path given to exec), while /proc names the
    interpreter: the agent must take the kernel's word and refuse, not kill it through the pidfd."""
    script = tmp_path / "allowed.sh"
    script.write_text('#!/bin/sh\nsleep 0.3\nexec 3<>"$1"\nsleep 1\nexit 0\n')
    script.chmod(0o755)
    agent, blocked = blocking_agent(tmp_path, f"enforce:\n  enabled: true\n  allow_exes: [{script}]\n")
    try:
        allowed = subprocess.Popen([str(script), blocked])
        code = allowed.wait(timeout=30)
        agent.wait_for(lambda: [r for r in agent.records() if r["rule"] == "Sysgram did not block a process"], 10)
    finally:
        assert agent.stop() == 0, agent.stderr
        Path(blocked).unlink(missing_ok=True)
    assert code == 0
    records = agent.records()
    assert any(r["rule"] == "Test open of a forbidden file" for r in records)  # the rule did match
    assert not [r for r in records if r["rule"] == "Sysgram blocked a process"]
    refused = [r["output_fields"]["sysgram.action"] for r in records if r["rule"] == "Sysgram did not block a process"]
    assert refused and all("protected in the kernel" in why for why in refused)

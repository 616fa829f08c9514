"""The tracer refuses to run from a nested PID namespace (a container without the host's): the kernel names
processes by host pids, so the agent would trace itself, skip the host's init and block the wrong pids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.capture._loader import nested_pid_namespace
from tests.conftest import ROOT


def test_only_the_initial_pid_namespace_is_the_hosts(tmp_path: Path) -> None:
    nested = tmp_path / "nested"
    nested.symlink_to("pid:[4026532517]")
    why = nested_pid_namespace(str(nested))
    assert "nested PID namespace (pid:[4026532517]" in why and "hostPID: true" in why
    host = tmp_path / "host"
    host.symlink_to("pid:[4026531836]")
    assert nested_pid_namespace(str(host)) == ""
    assert nested_pid_namespace(str(tmp_path / "missing")) == ""
    assert nested_pid_namespace() == ""  # this test runs in the host's namespace


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_sysgram_run_in_a_new_pid_namespace_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-m", "agent", "run",
         "--no-model", "--seconds", "5", "--state-dir", str(tmp_path / "state")],  # bounded, should it start
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # --mount-proc: the container's own /proc, as a container has (its NSpid shows one level only)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nested PID namespace (pid:[" in lines[0] and "--pid=host" in lines[0], done.stderr
    assert "Traceback" not in done.stderr

"""Assigning profiles by exe glob follows the program a host process really runs; ``seccomp eval --arch``
refuses what is not an architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.proc.info import ProcessInfo
from agent.seccomp import PolicyEvaluator, SeccompConfig

SHARED = "/work/shared/seccomp-profiles"
DOCKER = f"{SHARED}/docker-default.json"


def _policy(tmp_path: Path, pattern: str) -> PolicyEvaluator:
    config = SeccompConfig.from_dict(
        {"host_default": None, "container_default": None, "assign": [{"profile": DOCKER, "exes": [pattern]}]},
        base_dir=str(tmp_path),
        source="sysgram.yaml",
    )
    return PolicyEvaluator(config)


def test_an_exe_glob_matches_a_program_run_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "opt" / "app" / "bin" / "server"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"")
    (tmp_path / "server-link").symlink_to(real)
    policy = _policy(tmp_path, f"{tmp_path}/opt/*/bin/server")
    linked = ProcessInfo(pid=20, ppid=1, comm="server", exe=str(tmp_path / "server-link"))
    decision = policy.evaluate(linked, "mount", ())
    assert decision is not None and decision.profile == DOCKER and decision.violation
    dotted = ProcessInfo(pid=21, ppid=1, comm="server", exe=f"{tmp_path}/opt/app/../app/bin/server")
    assert policy.evaluate(dotted, "mount", ()) is not None
    elsewhere = ProcessInfo(pid=22, ppid=1, comm="other", exe=str(tmp_path / "other"))
    assert policy.evaluate(elsewhere, "mount", ()) is None


def test_a_containers_exe_is_not_resolved_on_the_host(tmp_path: Path) -> None:
    # The same path inside a container names the container's file: this host's link must not count.
    real = tmp_path / "real-server"
    real.write_bytes(b"")
    (tmp_path / "link").symlink_to(real)
    policy = _policy(tmp_path, str(real))
    in_container = ProcessInfo(pid=23, ppid=1, comm="s", exe=str(tmp_path / "link"), container_id="3f2a9c1b7d4e")
    assert policy.evaluate(in_container, "mount", ()) is None


@pytest.mark.parametrize("arch", ["bogus", "SCMP_ARCH_NOPE"])
def test_eval_refuses_an_unknown_arch_in_one_line(arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["seccomp", "eval", DOCKER, "read", "--arch", arch]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sysgram: error: --arch: unknown architecture") and err.count("\n") == 1


def test_eval_accepts_a_short_arch_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["seccomp", "eval", DOCKER, "read", "--arch", "x86"]) == 0
    short = capsys.readouterr().out
    assert main(["seccomp", "eval", DOCKER, "read", "--arch", "SCMP_ARCH_X86"]) == 0
    assert capsys.readouterr().out == short and "read" in short


def test_eval_refuses_an_argument_wider_than_a_register(capsys: pytest.CaptureFixture[str]) -> None:
    # 2**64 + 4 wrapped to 4 and matched `arg0 == 4`, though `seccomp check` refuses such values
    assert main(["seccomp", "eval", DOCKER, "ptrace", str(2**64 + 4)]) == 2
    assert "ARG 0: 18446744073709551620 does not fit in a 64-bit register" in capsys.readouterr().err
    assert main(["seccomp", "eval", DOCKER, "ptrace", str(2**64 - 1)]) in (0, 1)

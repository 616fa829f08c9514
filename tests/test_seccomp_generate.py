"""`sysgram seccomp generate`: least-privilege profiles from recordings, compiled and run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.capture.names import syscall_number
from agent.capture.recording import RecordingWriter
from agent.cli import main
from agent.events import FLAG_COMPAT, SYSCALL_DTYPE
from agent.proc.info import ProcessInfo
from agent.seccomp import EXEC_BASELINE, build_filter, load_profile

TRUE = os.path.realpath(shutil.which("true") or "/usr/bin/true")
PY = os.path.realpath(sys.executable)


def _record(
    path: Path, exe: str, names: list[str], compat_numbers: tuple[int, ...] = (), other: tuple[str, ...] = ()
) -> str:
    """A real recording file: ``exe`` (pid 100) made ``names``; an unrelated pid 200 made ``other``."""
    writer = RecordingWriter(str(path))
    writer.add_process(ProcessInfo(pid=100, ppid=1, comm=os.path.basename(exe), exe=exe))
    writer.add_process(ProcessInfo(pid=200, ppid=1, comm="other", exe="/usr/bin/other"))
    rows = [(100, syscall_number(n), 0) for n in names] + [(100, nr, FLAG_COMPAT) for nr in compat_numbers]
    rows += [(200, syscall_number(n), 0) for n in other]
    batch = np.zeros(len(rows), dtype=SYSCALL_DTYPE)
    for i, (pid, nr, flags) in enumerate(rows):
        batch[i] = (1000 + i, pid, pid, nr, flags)
    writer.add_syscalls(batch)
    writer.close({})
    return str(path)


def test_generated_profile_allows_observed_and_baseline_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = _record(
        tmp_path / "a.parquet",
        "/opt/app/bin/app",
        ["write", "getpid", "write"],
        compat_numbers=(102,),
        other=("ptrace",),
    )  # i386 102 = socketcall
    out = tmp_path / "app.json"
    assert main(["seccomp", "generate", "--from", rec, "--exe", "/opt/app/bin/app", "-o", str(out)]) == 0
    assert "compiled with libseccomp" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO" and doc["defaultErrnoRet"] == 1
    assert doc["archMap"][0]["subArchitectures"] == ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = set(doc["syscalls"][0]["names"])
    assert {"write", "getpid", "socketcall"} | set(EXEC_BASELINE) == allowed  # not the other process's ptrace
    profile = load_profile(str(out))
    assert profile.warnings == ()
    build_filter(profile).filter.export_pfc(open(os.devnull, "w"))  # noqa: SIM115  libseccomp accepts it


def test_two_recordings_merge_and_default_action_is_configurable(tmp_path: Path) -> None:
    first = _record(tmp_path / "1.parquet", "/opt/app", ["read"])
    second = _record(tmp_path / "2.parquet", "/opt/app", ["fsync"])
    out = tmp_path / "p.json"
    assert (
        main(
            [
                "seccomp",
                "generate",
                "--from",
                first,
                second,
                "--exe",
                "/opt/app",
                "-o",
                str(out),
                "--default-action",
                "kill",
                "--no-baseline",
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["defaultAction"] == "SCMP_ACT_KILL_PROCESS" and "defaultErrnoRet" not in doc
    assert doc["syscalls"][0]["names"] == ["fsync", "read"]


def test_no_events_for_the_exe_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = _record(tmp_path / "a.parquet", "/opt/app", ["read"])
    assert (
        main(
            [
                "seccomp",
                "generate",
                "--from",
                rec,
                "--exe",
                "/usr/bin/missing",
                "-o",
                str(tmp_path / "p.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("sysgram: error: no syscalls of /usr/bin/missing in ") and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


def test_the_exec_baseline_is_what_lets_a_program_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = _record(tmp_path / "t.parquet", TRUE, ["write"])
    with_base, without = tmp_path / "with.json", tmp_path / "without.json"
    assert main(["seccomp", "generate", "--from", rec, "--exe", TRUE, "-o", str(with_base)]) == 0
    assert (
        main(["seccomp", "generate", "--from", rec, "--exe", TRUE, "-o", str(without), "--no-baseline"]) == 0
    )
    assert main(["exec", "--seccomp", str(with_base), "--", TRUE]) == 0
    assert main(["exec", "--seccomp", str(without), "--", TRUE]) == 2  # refused up front: no execve
    assert "the profile refuses execve" in capsys.readouterr().err
    doc = json.loads(without.read_text())
    doc["syscalls"][0]["names"].append("execve")
    without.write_text(json.dumps(doc))
    assert main(["exec", "--seccomp", str(without), "--", TRUE]) != 0  # the loader's calls are refused


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to record a real program")
def test_profile_learned_from_a_real_run_lets_it_run_again_and_nothing_more(tmp_path: Path) -> None:
    """Record python's real syscalls (strace), learn a profile, run it under the kernel filter."""
    work = "import json, os, sys\nos.listdir(sys.argv[1])\nprint(json.dumps({'ok': 1}))"
    trace = tmp_path / "trace.txt"
    subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), PY, "-c", work, str(tmp_path)],
        check=True,
        capture_output=True,
    )
    names = [
        m.group(1)
        for line in trace.read_text().splitlines()
        if (m := re.match(r"^\d+\s+([a-z_0-9]+)\(", line))
    ]
    names = [n for n in names if syscall_number(n) >= 0]
    assert len(set(names)) > 15
    rec = _record(tmp_path / "py.parquet", PY, names)
    out = tmp_path / "py.json"
    assert main(["seccomp", "generate", "--from", rec, "--exe", PY, "-o", str(out)]) == 0
    again = subprocess.run(
        [sys.executable, "-m", "agent", "exec", "--seccomp", str(out), "--", PY, "-c", work, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=_repo(),
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == '{"ok": 1}'
    beyond = "import os, sys\ntry:\n    os.mkdir(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)"
    denied = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "exec",
            "--seccomp",
            str(out),
            "--",
            PY,
            "-c",
            beyond,
            str(tmp_path / "new"),
        ],
        capture_output=True,
        cwd=_repo(),
    )
    assert denied.returncode == 3 and not (tmp_path / "new").exists()


def _repo() -> str:
    return str(Path(__file__).resolve().parent.parent)


def test_generate_refuses_to_write_over_a_recording_it_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = _record(tmp_path / "a.parquet", "/opt/app/bin/app", ["write", "getpid"])
    before = Path(rec).read_bytes()
    assert main(["seccomp", "generate", "--from", rec, "--exe", "/opt/app/bin/app", "-o", rec]) == 2
    err = capsys.readouterr().err
    assert "one of the --from recordings" in err and rec in err and "\n" not in err.strip()
    assert Path(rec).read_bytes() == before

"""`sysgram exec --seccomp`: the kernel enforces the profile in a real child process."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

from agent.capture.names import syscall_number
from agent.cli import main
from agent.seccomp import ProfileEvaluator, caps_mask, load_profile

DOCKER = "/work/shared/seccomp-profiles/docker-default.json"
PY = sys.executable


def _profile(tmp_path: Path, doc: dict[str, object]) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_denied_syscall_gets_the_profiles_errno_while_the_rest_runs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    profile = _profile(
        tmp_path,
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES}
            ],
        },
    )
    script = (
        "import os, sys\nprint('started', flush=True)\n"
        "try:\n    os.mkdir(sys.argv[1])\nexcept OSError as e:\n    sys.exit(e.errno)\nsys.exit(0)"
    )
    target = tmp_path / "made"
    assert main(["exec", "--seccomp", profile, "--", PY, "-c", script, str(target)]) == errno.EACCES
    assert "started" in capfd.readouterr().out
    assert not target.exists()
    # without the profile the same program succeeds: the denial came from the filter
    assert (
        main(
            [
                "exec",
                "--seccomp",
                _profile(tmp_path, {"defaultAction": "SCMP_ACT_ALLOW"}),
                "--",
                PY,
                "-c",
                script,
                str(target),
            ]
        )
        == 0
    )
    assert target.is_dir()


def test_kill_process_action_ends_the_child_with_sigsys(tmp_path: Path) -> None:
    profile = _profile(
        tmp_path,
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {
                    "names": ["socket"],
                    "action": "SCMP_ACT_KILL_PROCESS",
                    "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_EQ"}],
                }
            ],
        },
    )
    vsock = "import socket\nsocket.socket(40, socket.SOCK_STREAM)"
    assert main(["exec", "--seccomp", profile, "--", PY, "-c", vsock]) == 128 + 31  # SIGSYS
    inet = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).close()"
    assert main(["exec", "--seccomp", profile, "--", PY, "-c", inet]) == 0


def test_allowed_workload_exits_with_its_own_code_under_docker_default() -> None:
    assert (
        main(["exec", "--seccomp", DOCKER, "--caps", "", "--", PY, "-c", "import json; json.dumps([1])"]) == 0
    )
    assert main(["exec", "--seccomp", DOCKER, "--caps", "", "--", PY, "-c", "raise SystemExit(7)"]) == 7


CHILD = """
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
out = []
for nr, args in json.loads(sys.argv[1]):
    ctypes.set_errno(0)
    res = libc.syscall(nr, *[ctypes.c_ulong(a) for a in args])
    out.append(ctypes.get_errno() if res == -1 else 0)
print(json.dumps(out))
"""

# Calls whose success is harmless in a throwaway child (bad magic or NULL pointers where it would matter).
PROBES = [
    ("personality", (0xFFFFFFFF,)),
    ("personality", (0x0008,)),
    ("personality", (0x0400000,)),
    ("socket", (40, 1, 0)),
    ("socket", (2, 1, 0)),
    ("unshare", (0x10000000,)),
    ("reboot", (0, 0, 0, 0)),
    ("mount", (0, 0, 0, 0, 0)),
    ("clone3", (0, 0)),
    ("getpid", ()),
]


@pytest.mark.parametrize("caps", ["", "CAP_SYS_ADMIN,CAP_SYS_BOOT"])
def test_kernel_enforcement_matches_the_evaluator(
    tmp_path: Path, caps: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # Docker's profile with a default errno the kernel itself never returns for these calls,
    # so a denial by the filter cannot be mistaken for the kernel's own EPERM.
    doc = json.loads(Path(DOCKER).read_text())
    doc["defaultErrnoRet"] = errno.ENOTRECOVERABLE
    profile = _profile(tmp_path, doc)
    calls = [(syscall_number(name), list(args)) for name, args in PROBES]
    assert main(["exec", "--seccomp", profile, "--caps", caps, "--", PY, "-c", CHILD, json.dumps(calls)]) == 0
    seen = json.loads(capfd.readouterr().out)
    evaluator = ProfileEvaluator(load_profile(profile))
    mask = caps_mask(c for c in caps.split(",") if c)
    denied = 0
    for (name, args), got in zip(PROBES, seen, strict=True):
        decision = evaluator.decide(name, args, mask, "SCMP_ARCH_X86_64")
        if decision.violation:
            denied += 1
            assert got == decision.errno, (
                f"{name}{args}: kernel errno {got}, evaluator {decision.explanation}"
            )
        else:
            assert got not in (errno.ENOTRECOVERABLE, errno.ENOSYS), f"{name}{args}: {decision.explanation}"
    assert denied >= (2 if caps else 6)


def test_exec_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exec", "--seccomp", DOCKER, "--"]) == 2
    assert "no command given" in capsys.readouterr().err


def test_exec_of_a_directory_is_one_line_not_a_silent_127(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exec", "--seccomp", DOCKER, "--", str(tmp_path)]) == 2
    assert f"exec: {tmp_path}: command not found or not executable" in capsys.readouterr().err

"""Loading profiles: the shipped formats, and every mistake as one line naming file and place."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.errors import ProfileError
from agent.seccomp import Action, load_profile

SHARED = "/work/shared/seccomp-profiles"


def test_docker_profile_loads_with_archmap_resolved_for_this_host() -> None:
    profile = load_profile(f"{SHARED}/docker-default.json")
    assert profile.default_action is Action.ERRNO and profile.default_errno == errno.EPERM
    assert profile.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")
    clone = profile.rules[18]
    assert clone.names == ("clone",) and clone.args[0].op == "SCMP_CMP_MASKED_EQ"
    assert clone.excludes.caps == ("CAP_SYS_ADMIN",) and clone.excludes.arches == ("s390", "s390x")
    assert profile.rules[1].includes.min_kernel == (4, 8)
    # names libseccomp 2.5 does not know yet are warnings (runc skips them), not errors
    assert any("'mseal'" in w for w in profile.warnings)


def test_podman_legacy_errno_names_and_null_args() -> None:
    profile = load_profile(f"{SHARED}/podman-containers-common-seccomp.json")
    assert profile.default_errno == errno.ENOSYS
    socket_rule = profile.rules[31]
    assert socket_rule.errno == errno.EINVAL and len(socket_rule.args) == 2
    assert profile.rules[35].args == ()  # "args": null


def test_errno_name_used_when_no_number(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errno": "EACCES"},
                    {"names": ["umount2"], "action": "SCMP_ACT_ERRNO"},
                ],
            }
        )
    )
    profile = load_profile(str(path))
    assert [r.errno for r in profile.rules] == [errno.EACCES, errno.EPERM]


BAD = [
    ('{"defaultAction": "SCMP_ACT_ALLOW",\n "syscalls": [}', "2:15: invalid JSON"),
    ("[]", "a profile is a JSON object, not a list"),
    ('{"syscalls": []}', "defaultAction: missing"),
    ('{"defaultAction": "SCMP_ACT_MAYBE"}', "defaultAction: unknown action 'SCMP_ACT_MAYBE'"),
    (
        '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},'
        ' {"names": ["ptrace"], "action": "DENY"}]}',
        "syscalls[1].action: unknown action 'DENY'",
    ),
    (
        '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["socket"], "action": "SCMP_ACT_ALLOW",'
        ' "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]}',
        "syscalls[0].args[0].op: unknown operator 'SCMP_CMP_ABOUT'",
    ),
    (
        '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["socket"], "action": "SCMP_ACT_ALLOW",'
        ' "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}',
        "syscalls[0].args[0].index: 6 is out of range",
    ),
    (
        '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["socket"], "action": "SCMP_ACT_ALLOW",'
        ' "args": [{"index": 0, "value": "1", "op": "SCMP_CMP_EQ"}]}]}',
        "syscalls[0].args[0].value: must be an integer, not a string",
    ),
    (
        '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": "read", "action": "SCMP_ACT_ALLOW"}]}',
        "syscalls[0].names: must be a list of strings, not a string",
    ),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": true}', "defaultErrnoRet: must be an integer"),
    (
        '{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_Z80"]}',
        "architectures[0]: unknown architecture 'SCMP_ARCH_Z80'",
    ),
    (
        '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",'
        ' "includes": {"minKernel": "new"}}]}',
        "syscalls[0].includes.minKernel: not a kernel version",
    ),
    (
        '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}',
        "listenerPath: required when a rule uses SCMP_ACT_NOTIFY",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_invalid_profile_is_one_line_naming_file_and_place(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        load_profile(str(path))
    assert str(caught.value).startswith(f"{path}:")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("command", ["check", "eval"])
def test_cli_reports_an_invalid_profile_in_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": 3}]}')
    argv = ["seccomp", command, str(path)] + (["read"] if command == "eval" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"sysgram: error: {path}: syscalls[0].action: must be a string, not an integer\n"


def test_cli_bad_json_names_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "defaultAction": "SCMP_ACT_ERRNO",\n  "syscalls": [,]\n}\n')
    assert main(["exec", "--seccomp", str(path), "--", "true"]) == 2
    assert capsys.readouterr().err == f"sysgram: error: {path}:3:16: invalid JSON: Expecting value\n"


def test_cli_check_summarises_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["seccomp", "check", f"{SHARED}/docker-default.json"]) == 0
    out = capsys.readouterr().out
    assert "ok: default SCMP_ACT_ERRNO(1), 33 rules" in out
    assert "warning: syscalls[0].names[178]: unknown syscall 'mseal'" in out


def test_cli_eval_prints_the_decision(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["seccomp", "eval", f"{SHARED}/docker-default.json", "socket", "AF_VSOCK", "1", "0"]) == 0
    assert capsys.readouterr().out == "docker-default.json: defaultAction -> SCMP_ACT_ERRNO(1)\n"
    assert (
        main(
            [
                "seccomp",
                "eval",
                f"{SHARED}/docker-default.json",
                "clone",
                "0x10000011",
                "--caps",
                "CAP_SYS_ADMIN",
            ]
        )
        == 0
    )
    assert (
        "syscalls[17] (names [clone, +25 more], caps CAP_SYS_ADMIN) -> SCMP_ACT_ALLOW"
        in capsys.readouterr().out
    )
    assert main(["seccomp", "eval", f"{SHARED}/docker-default.json", "read", "--caps", "CAP_NOPE"]) == 2
    assert "--caps: unknown capability 'CAP_NOPE'" in capsys.readouterr().err


def test_a_profile_nested_too_deeply_is_one_profile_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)  # was a RecursionError traceback in check, eval, exec and host_default
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    assert str(err.value) == f"{path}: JSON nested too deeply"

"""Evaluating syscalls against Docker's and Podman's default profiles, as runc + libseccomp enforce them."""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

import pytest

from agent.capture.names import syscall_number
from agent.proc.info import ProcessInfo
from agent.seccomp import (
    Action,
    PolicyEvaluator,
    ProfileEvaluator,
    SeccompConfig,
    build_filter,
    caps_mask,
    load_profile,
    seccomp_status,
)
from agent.seccomp._kernel import arch_token, decode_ret, export_bpf, run_bpf

SHARED = "/work/shared/seccomp-profiles"
DOCKER = f"{SHARED}/docker-default.json"
PODMAN = f"{SHARED}/podman-containers-common-seccomp.json"
HOST_DEFAULT = str(Path(__file__).resolve().parent.parent / "rules" / "seccomp" / "host-default.json")
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
SIGCHLD = 17
AF_VSOCK = 40
READ_IMPLIES_EXEC = 0x0400000
NO_CAPS = 0
SYS_ADMIN = caps_mask(["CAP_SYS_ADMIN"])


@pytest.fixture(scope="module")
def docker() -> ProfileEvaluator:
    return ProfileEvaluator(load_profile(DOCKER))


@pytest.fixture(scope="module")
def podman() -> ProfileEvaluator:
    return ProfileEvaluator(load_profile(PODMAN))


@pytest.mark.parametrize(
    ("syscall", "args", "caps", "action", "err"),
    [
        ("read", (0, 0, 10), NO_CAPS, Action.ALLOW, None),
        ("openat", (-100, 0, 0), NO_CAPS, Action.ALLOW, None),
        ("kexec_load", (), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("kexec_load", (), SYS_ADMIN, Action.ERRNO, errno.EPERM),  # not even CAP_SYS_ADMIN opens it
        ("mount", (), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("mount", (), SYS_ADMIN, Action.ALLOW, None),
        ("reboot", (), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("reboot", (), caps_mask(["CAP_SYS_BOOT"]), Action.ALLOW, None),
        ("clone", (SIGCHLD,), NO_CAPS, Action.ALLOW, None),
        ("clone", (SIGCHLD | CLONE_NEWUSER,), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("clone", (SIGCHLD | CLONE_NEWNS,), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("clone", (SIGCHLD | CLONE_NEWUSER,), SYS_ADMIN, Action.ALLOW, None),
        ("clone3", (), NO_CAPS, Action.ERRNO, errno.ENOSYS),  # so glibc falls back to clone
        ("clone3", (), SYS_ADMIN, Action.ALLOW, None),
        ("personality", (0,), NO_CAPS, Action.ALLOW, None),
        ("personality", (0x0008,), NO_CAPS, Action.ALLOW, None),
        ("personality", (0xFFFFFFFF,), NO_CAPS, Action.ALLOW, None),
        ("personality", (READ_IMPLIES_EXEC,), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("socket", (socket.AF_INET, socket.SOCK_STREAM, 0), NO_CAPS, Action.ALLOW, None),
        ("socket", (socket.AF_NETLINK, socket.SOCK_RAW, 9), NO_CAPS, Action.ALLOW, None),
        ("socket", (AF_VSOCK, socket.SOCK_STREAM, 0), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("socket", (AF_VSOCK + 1, socket.SOCK_STREAM, 0), NO_CAPS, Action.ALLOW, None),
        ("ptrace", (), NO_CAPS, Action.ALLOW, None),  # minKernel 4.8: allowed on this kernel
        ("bpf", (), NO_CAPS, Action.ERRNO, errno.EPERM),
        ("bpf", (), caps_mask(["CAP_BPF"]), Action.ALLOW, None),
        ("open_by_handle_at", (), NO_CAPS, Action.ERRNO, errno.EPERM),
    ],
)
def test_docker_default_decisions(
    docker: ProfileEvaluator, syscall: str, args: tuple[int, ...], caps: int, action: Action, err: int | None
) -> None:
    decision = docker.decide(syscall, args, caps, "SCMP_ARCH_X86_64")
    assert (decision.action, decision.errno) == (action, err), decision.explanation
    assert decision.violation == (action is not Action.ALLOW)


def test_explanation_names_the_rule(docker: ProfileEvaluator) -> None:
    allowed = docker.decide("personality", (8,))
    assert allowed.rule_index == 6
    assert allowed.explanation == (
        "docker-default.json: syscalls[6] (names [personality], args arg0 == 0x8) -> SCMP_ACT_ALLOW"
    )
    denied = docker.decide("clone3", ())
    assert denied.rule_index == 20
    assert denied.explanation.endswith("-> SCMP_ACT_ERRNO(38)")
    default = docker.decide("kexec_load", ())
    assert default.rule_index is None
    assert default.explanation == "docker-default.json: defaultAction -> SCMP_ACT_ERRNO(1)"


def test_podman_netlink_audit_needs_cap_audit_write(podman: ProfileEvaluator) -> None:
    audit = (socket.AF_NETLINK, socket.SOCK_RAW, 9)
    denied = podman.decide("socket", audit, NO_CAPS)
    assert (denied.action, denied.errno, denied.rule_index) == (Action.ERRNO, errno.EINVAL, 31)
    assert podman.decide("socket", (socket.AF_NETLINK, socket.SOCK_RAW, 0), NO_CAPS).action is Action.ALLOW
    assert podman.decide("socket", audit, caps_mask(["CAP_AUDIT_WRITE"])).action is Action.ALLOW
    listed = podman.decide("kexec_load", ())
    assert (listed.action, listed.errno, listed.rule_index) == (Action.ERRNO, errno.EPERM, 0)
    unlisted = podman.decide("add_key", ())
    assert (unlisted.action, unlisted.errno) == (Action.ERRNO, errno.ENOSYS)  # Podman's defaultErrnoRet


def test_compat_process_outside_profile_arches_is_killed() -> None:
    profile = load_profile(f"{SHARED}/containerd-default-allowlist-derived.json")  # no archMap: native only
    decision = ProfileEvaluator(profile).decide("read", (), 0, "SCMP_ARCH_X86")
    assert decision.action is Action.KILL_THREAD and decision.violation


@pytest.mark.parametrize("path", [DOCKER, PODMAN, HOST_DEFAULT])
@pytest.mark.parametrize("caps", [NO_CAPS, SYS_ADMIN | caps_mask(["CAP_AUDIT_WRITE", "CAP_SYS_PTRACE"])])
def test_evaluator_agrees_with_libseccomp_bpf(path: str, caps: int) -> None:
    """The per-syscall index must give what the whole compiled filter returns, for sampled arguments."""
    profile = load_profile(path)
    evaluator = ProfileEvaluator(profile)
    program = export_bpf(build_filter(profile, caps).filter)
    token = arch_token("SCMP_ARCH_X86_64")
    rng = random.Random(7)
    interesting = [
        0,
        1,
        4,
        5,
        8,
        9,
        16,
        0x4206,
        16,
        38,
        39,
        40,
        41,
        0x20000,
        0x20008,
        0xFFFFFFFF,
        CLONE_NEWUSER | SIGCHLD,
        CLONE_NEWNS,
        SIGCHLD,
        READ_IMPLIES_EXEC,
    ]
    names = [r.names for r in profile.rules]
    syscalls = sorted(
        {n for group in names for n in group if syscall_number(n) >= 0} | {"kexec_load", "read"}
    )
    checked = 0
    for name in syscalls:
        for _ in range(6):
            args = tuple(rng.choice(interesting) for _ in range(6))
            want = decode_ret(run_bpf(program, syscall_number(name), token, args))
            got = evaluator.decide(name, args, caps, "SCMP_ARCH_X86_64")
            assert (got.action, got.errno) == want, f"{name}{args}: {got.explanation}"
            checked += 1
    assert checked > 200


def test_policy_evaluator_assigns_profiles(tmp_path: Path) -> None:
    config = SeccompConfig.from_dict(
        {
            "host_default": None,
            "container_default": DOCKER,
            "assign": [{"profile": PODMAN, "exes": ["/usr/sbin/*"]}],
        },
        base_dir=str(tmp_path),
        source="sysgram.yaml",
    )
    policy = PolicyEvaluator(config)
    host_proc = ProcessInfo(pid=10, ppid=1, comm="bash", exe="/usr/bin/bash")
    assert policy.evaluate(host_proc, "mount", ()) is None  # no host default: nothing applies
    in_container = ProcessInfo(pid=11, ppid=1, comm="sh", exe="/bin/sh", container_id="3f2a9c1b7d4e")
    decision = policy.evaluate(in_container, "mount", ())
    assert decision is not None and decision.violation and decision.errno == errno.EPERM
    assert decision.profile == DOCKER and decision.rule.startswith("docker-default.json: defaultAction")
    admin = ProcessInfo(
        pid=12, ppid=1, comm="sh", exe="/bin/sh", container_id="3f2a9c1b7d4e", cap_effective=SYS_ADMIN
    )
    allowed = policy.evaluate(admin, "mount", ())
    assert allowed is not None and not allowed.violation and allowed.rule_index == 17
    sbin = ProcessInfo(pid=13, ppid=1, comm="sshd", exe="/usr/sbin/sshd")
    podman = policy.evaluate(sbin, "add_key", ())
    assert podman is not None and podman.profile == PODMAN and podman.errno == errno.ENOSYS


def test_interesting_syscalls_cover_what_is_not_plainly_allowed() -> None:
    policy = PolicyEvaluator(SeccompConfig(host_default=DOCKER))
    interesting = policy.interesting_syscalls()
    assert {"clone", "socket", "personality", "mount", "kexec_load", "bpf", "ptrace"} <= interesting
    assert not {"read", "write", "openat", "close", "mmap"} & interesting
    assert PolicyEvaluator(SeccompConfig()).interesting_syscalls() == frozenset()


def test_seccomp_status_of_this_process_and_a_missing_one() -> None:
    status = seccomp_status()
    assert status is not None and status.mode in (0, 1, 2) and status.filters >= 0
    assert seccomp_status(2**22 + 12345) is None


def test_shipped_host_default_flags_what_a_host_program_rarely_needs() -> None:
    profile = load_profile(HOST_DEFAULT)
    assert profile.warnings == ()
    policy = PolicyEvaluator(SeccompConfig(host_default=HOST_DEFAULT))
    proc = ProcessInfo(pid=1, ppid=0, comm="sshd", exe="/usr/sbin/sshd", cap_effective=(1 << 41) - 1)

    def decide(syscall: str, *args: int) -> tuple[Action, bool]:
        decision = policy.evaluate(proc, syscall, args)
        assert decision is not None
        return decision.action, decision.violation

    assert decide("kexec_load") == (Action.ERRNO, True)
    assert decide("finit_module", 3, 0, 0) == (Action.ERRNO, True)
    assert decide("process_vm_writev") == (Action.ERRNO, True)
    assert decide("ptrace", 4, 1234) == (Action.ERRNO, True)  # PTRACE_POKETEXT: injection
    assert decide("ptrace", 16, 1234) == (Action.LOG, False)  # PTRACE_ATTACH: noteworthy
    assert decide("ptrace", 0) == (Action.ALLOW, False)  # PTRACE_TRACEME
    assert decide("unshare", CLONE_NEWUSER) == (Action.LOG, False)
    assert decide("bpf", 5) == (Action.LOG, False)  # never a violation: the agent itself loads BPF
    assert decide("read", 0) == (Action.ALLOW, False)
    assert {"kexec_load", "ptrace", "keyctl", "bpf"} <= policy.interesting_syscalls()
    assert "read" not in policy.interesting_syscalls()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ([], "sysgram.yaml: seccomp: must be a mapping"),
        ({"host_defualt": DOCKER}, "sysgram.yaml: seccomp.host_defualt: unknown key"),
        ({"host_default": 3}, "sysgram.yaml: seccomp.host_default: must be the path of a seccomp profile"),
        ({"assign": [{"profile": DOCKER}]}, "sysgram.yaml: seccomp.assign[0]: needs 'exes' or 'containers'"),
        ({"assign": [{"profile": DOCKER, "exes": [""]}]}, "assign[0].exes: must be a list"),
        ({"assign": [{"profile": DOCKER, "exe": "/bin/sh"}]}, "seccomp.assign[0].exe: unknown key"),
    ],
)
def test_config_section_errors_name_the_key(section: object, message: str) -> None:
    from agent.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        SeccompConfig.from_dict(section, source="sysgram.yaml")
    assert message in str(caught.value)


def test_config_paths_are_relative_to_the_config_file_and_profiles_load_up_front(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"defaultAction": "SCMP_ACT_NOPE"}')
    config = SeccompConfig.from_dict({"host_default": "bad.json"}, base_dir=str(tmp_path))
    assert config.host_default == str(tmp_path / "bad.json")
    from agent.errors import ProfileError

    with pytest.raises(ProfileError, match=r"bad\.json: defaultAction: unknown action"):
        PolicyEvaluator(config)

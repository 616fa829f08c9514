"""``sysgram bench seccomp``: profile loading and syscall decisions, beside the compiled BPF itself."""

from __future__ import annotations

import random
import time

from agent.bench import Figure
from agent.capture.names import syscall_number
from agent.seccomp._evaluate import ProfileEvaluator
from agent.seccomp._kernel import arch_token, build_filter, export_bpf, run_bpf
from agent.seccomp._profile import load_profile

DOCKER = "/work/shared/seccomp-profiles/docker-default.json"
PODMAN = "/work/shared/seccomp-profiles/podman-containers-common-seccomp.json"
# A host-like mix: mostly plain allowed calls, some with argument rules, some denied by default.
_MIX = (
    [("read", (3, 0, 4096))] * 40
    + [("write", (1, 0, 10))] * 30
    + [("openat", (2**64 - 100, 0, 0))] * 15
    + [
        ("clone", (0x1200011,)),
        ("socket", (2, 1, 0)),
        ("socket", (40, 1, 0)),
        ("personality", (0xFFFFFFFF,)),
        ("mount", ()),
        ("kexec_load", ()),
        ("bpf", ()),
        ("ptrace", (16,)),
        ("clone3", ()),
        ("getpid", ()),
    ]
)


def run(quick: bool) -> list[Figure]:
    n = 20_000 if quick else 200_000
    rng = random.Random(1)
    calls = [rng.choice(_MIX) for _ in range(n)]
    figures: list[Figure] = []

    start = time.perf_counter()
    profile = load_profile(DOCKER)
    figures.append(Figure("seccomp", "load docker-default.json", (time.perf_counter() - start) * 1e3, "ms"))

    evaluator = ProfileEvaluator(profile)
    evaluator.decide("read")  # build the index for caps 0 outside the timing
    start = time.perf_counter()
    for name, args in calls:
        evaluator.decide(name, args, 0, "SCMP_ARCH_X86_64")
    per_second = n / (time.perf_counter() - start)
    figures.append(
        Figure("seccomp", "decide (docker-default, host mix)", per_second, "syscalls/s", ">= 500000")
    )

    start = time.perf_counter()
    program = export_bpf(build_filter(profile).filter)
    figures.append(
        Figure("seccomp", "compile docker-default with libseccomp", (time.perf_counter() - start) * 1e3, "ms")
    )
    token = arch_token("SCMP_ARCH_X86_64")
    numbered = [(syscall_number(name), args) for name, args in calls[: n // 10]]
    start = time.perf_counter()
    for nr, args in numbered:
        run_bpf(program, nr, token, args)
    figures.append(
        Figure(
            "seccomp",
            "reference: whole compiled BPF, interpreted",
            len(numbered) / (time.perf_counter() - start),
            "syscalls/s",
        )
    )

    podman = ProfileEvaluator(load_profile(PODMAN))
    audit = [("socket", (16, 3, 9)), ("socket", (2, 1, 0))] * (n // 20)
    podman.decide("socket", (16, 3, 9))
    start = time.perf_counter()
    for name, args in audit:
        podman.decide(name, args)
    figures.append(
        Figure(
            "seccomp",
            "decide (podman socket: mixed actions via per-syscall BPF)",
            len(audit) / (time.perf_counter() - start),
            "syscalls/s",
        )
    )
    return figures

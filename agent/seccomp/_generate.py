"""Least-privilege profiles learned from recordings (as oci-seccomp-bpf-hook
and the Security Profiles Operator do).

The profile allows what the program was seen to call plus :data:`EXEC_BASELINE`, and answers everything else
with the chosen default action. It covers x86_64 with its x86 and x32 sub-architectures; syscall names are
the same JSON for every ABI, and libseccomp maps each to its number per ABI.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence
from dataclasses import dataclass

from agent.errors import ConfigError
from agent.seccomp._kernel import check_compiles
from agent.seccomp._profile import known_to_libseccomp, parse_profile

# What a dynamically linked program needs between execve and main() and to exit, measured with
# `strace -f -c /bin/true` and `strace -f -c python3 -c pass` on Debian 12 (glibc 2.36): the filter is
# loaded before execve, so the loader's own calls must pass even when a recording started later.
EXEC_BASELINE = (
    "execve",
    "brk",
    "arch_prctl",
    "mmap",
    "mprotect",
    "munmap",
    "access",
    "openat",
    "read",
    "pread64",
    "newfstatat",
    "close",
    "prlimit64",
    "rseq",
    "set_robust_list",
    "set_tid_address",
    "exit",
    "exit_group",
)

DEFAULT_ACTIONS = {"errno": "SCMP_ACT_ERRNO", "kill": "SCMP_ACT_KILL_PROCESS", "log": "SCMP_ACT_LOG"}


@dataclass(frozen=True, slots=True)
class GeneratedProfile:
    """The profile document, the syscalls observed, and the unknown numbers that could not be named."""

    document: dict[str, object]
    observed: tuple[str, ...]
    unnamed: tuple[str, ...]
    traces: int

    def to_json(self) -> str:
        return json.dumps(self.document, indent=2) + "\n"


def observed_syscalls(recordings: Sequence[str], exe: str) -> tuple[set[str], int]:
    """Every syscall name ``exe`` made in the recordings, and how many thread traces held it."""
    from agent.capture.recording import iter_thread_traces, read_recording  # pyarrow: only when generating

    seen: set[str] = set()
    traces = 0
    for path in recordings:
        rec = read_recording(path)
        for trace in iter_thread_traces(rec, exes=[exe]):
            traces += 1
            seen.update(trace.syscalls)
    return seen, traces


def generate_profile(
    recordings: Sequence[str], exe: str, default_action: str = "errno", baseline: bool = True
) -> GeneratedProfile:
    """A least-privilege profile for ``exe``; ConfigError when the recordings hold nothing of it."""
    if default_action not in DEFAULT_ACTIONS:
        raise ConfigError(f"--default-action: {default_action!r} is not one of {', '.join(DEFAULT_ACTIONS)}")
    seen, traces = observed_syscalls(recordings, exe)
    if not traces:
        raise ConfigError(f"no syscalls of {exe} in {', '.join(recordings)} (is it the resolved exe path?)")
    unnamed = sorted(n for n in seen if not known_to_libseccomp(n))
    allowed = sorted((seen - set(unnamed)) | (set(EXEC_BASELINE) if baseline else set()))
    action = DEFAULT_ACTIONS[default_action]
    document: dict[str, object] = {"defaultAction": action}
    if action == "SCMP_ACT_ERRNO":
        document["defaultErrnoRet"] = errno.EPERM
    document["archMap"] = [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}
    ]
    document["syscalls"] = [
        {
            "names": allowed,
            "action": "SCMP_ACT_ALLOW",
            "comment": f"observed for {exe} in {traces} thread trace(s)"
            + (" plus the exec baseline" if baseline else ""),
        }
    ]
    profile = parse_profile(document, f"<generated for {exe}>")
    check_compiles(profile)  # libseccomp must accept it, or we would hand out a profile runc cannot load
    return GeneratedProfile(document, tuple(sorted(seen)), tuple(unnamed), traces)

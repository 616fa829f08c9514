"""Seccomp policies: load OCI/Docker/Podman profiles, evaluate syscalls as runc + libseccomp would,
assign profiles to processes, learn least-privilege profiles from recordings, run programs under one.

See docs/seccomp.md.
"""

from agent.seccomp._evaluate import Decision, ProfileEvaluator
from agent.seccomp._exec import run_under_profile
from agent.seccomp._generate import EXEC_BASELINE, GeneratedProfile, generate_profile
from agent.seccomp._kernel import Compiled, build_filter, check_compiles
from agent.seccomp._policy import (
    PolicyDecision,
    PolicyEvaluator,
    ProfileAssignment,
    SeccompConfig,
    SeccompStatus,
    seccomp_status,
)
from agent.seccomp._profile import (
    ARCHES,
    CAPABILITIES,
    Action,
    ArgCondition,
    Gate,
    Host,
    Profile,
    SyscallRule,
    caps_mask,
    load_profile,
    parse_profile,
)

__all__ = [
    "ARCHES",
    "CAPABILITIES",
    "EXEC_BASELINE",
    "Action",
    "ArgCondition",
    "Compiled",
    "Decision",
    "Gate",
    "GeneratedProfile",
    "Host",
    "PolicyDecision",
    "PolicyEvaluator",
    "Profile",
    "ProfileAssignment",
    "ProfileEvaluator",
    "SeccompConfig",
    "SeccompStatus",
    "SyscallRule",
    "build_filter",
    "caps_mask",
    "check_compiles",
    "generate_profile",
    "load_profile",
    "parse_profile",
    "run_under_profile",
    "seccomp_status",
]

"""Which profile applies to which process (the ``seccomp:`` config section), and the evaluator over them.

Section (YAML, loaded by the config room; validated here)::

    seccomp:
      host_default: rules/seccomp/host-default.json      # processes outside containers; null = none
      container_default: ../shared/seccomp-profiles/docker-default.json   # any container; null = none
      assign:                                             # first match wins, before the defaults
        - profile: profiles/nginx.json
          exes: ["/usr/sbin/nginx", "/opt/*/bin/nginx"]   # globs on the exe path, or its resolved path
        - profile: profiles/db.json
          containers: ["3f2a9c1b7d4e"]                     # container id (or its prefix, >= 12 chars)

An ``exes`` glob matches the exe path as the process table knows it (made absolute) or, for host processes,
that path with symlinks and ``..`` resolved: a program run through a link gets its real program's profile.
An entry with both ``exes`` and ``containers`` needs both to match. Relative paths are taken from the
directory of the config file.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.capture.names import known_names
from agent.errors import ConfigError
from agent.proc.info import HOST_CONTAINER_ID, ProcessInfo
from agent.seccomp._evaluate import ProfileEvaluator
from agent.seccomp._profile import Action, Host, Profile, load_profile

_SECTION_KEYS = ("host_default", "container_default", "assign")
_ENTRY_KEYS = ("profile", "exes", "containers")
_MIN_ID_PREFIX = 12


@dataclass(frozen=True, slots=True)
class ProfileAssignment:
    """One ``assign`` entry: ``profile`` for processes whose exe glob and/or container matches."""

    profile: str
    exes: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()

    def matches(self, proc: ProcessInfo) -> bool:
        if self.exes:
            paths = _exe_paths(proc)
            if not any(fnmatch.fnmatchcase(path, pattern) for path in paths for pattern in self.exes):
                return False
        return not self.containers or any(_same_container(proc.container_id, c) for c in self.containers)


def _exe_paths(proc: ProcessInfo) -> tuple[str, ...]:
    """The exe as known, and resolved (links, ``..``) when it is a host path: a container's paths live in
    its own mount namespace, where this host's links mean nothing."""
    if proc.container_id != HOST_CONTAINER_ID or not proc.exe.startswith("/"):
        return (proc.exe,)
    real = os.path.realpath(proc.exe)
    return (proc.exe,) if real == proc.exe else (proc.exe, real)


def _same_container(container_id: str, wanted: str) -> bool:
    if container_id == HOST_CONTAINER_ID or not container_id:
        return False
    return container_id == wanted or (len(wanted) >= _MIN_ID_PREFIX and container_id.startswith(wanted))


@dataclass(frozen=True, slots=True)
class SeccompConfig:
    """The ``seccomp:`` section: profile paths, already made absolute."""

    host_default: str | None = None
    container_default: str | None = None
    assign: tuple[ProfileAssignment, ...] = ()

    @staticmethod
    def from_dict(section: Any, *, base_dir: str = ".", source: str | None = None) -> SeccompConfig:
        """Validate the section; a mistake is a ConfigError naming ``source`` and the key path."""

        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(f"{key}: {message}", path=source)

        def profile_path(value: Any, key: str, optional: bool) -> str | None:
            if value is None and optional:
                return None
            if not isinstance(value, str) or not value:
                raise fail(
                    key, "must be the path of a seccomp profile (JSON)" + (" or null" if optional else "")
                )
            return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))

        def strings(value: Any, key: str) -> tuple[str, ...]:
            if value is None:
                return ()
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise fail(key, "must be a list of non-empty strings")
            return tuple(value)

        if section is None:
            return SeccompConfig()
        if not isinstance(section, Mapping):
            raise fail("seccomp", "must be a mapping")
        for key in section:
            if key not in _SECTION_KEYS:
                raise fail(f"seccomp.{key}", f"unknown key (one of {', '.join(_SECTION_KEYS)})")
        entries = section.get("assign") or []
        if not isinstance(entries, list):
            raise fail("seccomp.assign", "must be a list")
        assign = []
        for i, entry in enumerate(entries):
            where = f"seccomp.assign[{i}]"
            if not isinstance(entry, Mapping):
                raise fail(where, "must be a mapping with 'profile' and 'exes' and/or 'containers'")
            for key in entry:
                if key not in _ENTRY_KEYS:
                    raise fail(f"{where}.{key}", f"unknown key (one of {', '.join(_ENTRY_KEYS)})")
            path = profile_path(entry.get("profile"), f"{where}.profile", optional=False)
            exes, containers = (
                strings(entry.get("exes"), f"{where}.exes"),
                strings(entry.get("containers"), f"{where}.containers"),
            )
            if not exes and not containers:
                raise fail(
                    where, "needs 'exes' or 'containers' (use host_default / container_default for all)"
                )
            assert path is not None
            assign.append(ProfileAssignment(path, exes, containers))
        return SeccompConfig(
            profile_path(section.get("host_default"), "seccomp.host_default", optional=True),
            profile_path(section.get("container_default"), "seccomp.container_default", optional=True),
            tuple(assign),
        )

    def profile_for(self, proc: ProcessInfo) -> str | None:
        for entry in self.assign:
            if entry.matches(proc):
                return entry.profile
        in_container = bool(proc.container_id) and proc.container_id != HOST_CONTAINER_ID
        return self.container_default if in_container else self.host_default

    @property
    def paths(self) -> tuple[str, ...]:
        found = [p for p in (self.host_default, self.container_default) if p]
        found.extend(a.profile for a in self.assign)
        return tuple(dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """What the process's profile does with one syscall; ``violation`` when that is neither ALLOW nor LOG."""

    profile: str  # the profile's path
    action: Action
    errno: int | None
    rule: str  # "docker-default.json: syscalls[12] (names [...], args ...) -> SCMP_ACT_ERRNO(1)"
    violation: bool
    rule_index: int | None = None  # None: the default action (or an architecture the profile lacks)


class PolicyEvaluator:
    """Evaluates a process's syscalls against the profile its configuration assigns (all loaded up front)."""

    def __init__(self, config: SeccompConfig, host: Host | None = None) -> None:
        self.config = config
        self.host = host or Host.current()
        self._evaluators: dict[str, ProfileEvaluator] = {}
        for path in config.paths:
            self._evaluators[path] = ProfileEvaluator(load_profile(path), self.host)
        self._assigned: dict[tuple[str, str], ProfileEvaluator | None] = {}

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return tuple(e.profile for e in self._evaluators.values())

    def evaluate(self, proc: ProcessInfo, syscall: str, args: tuple[int, ...] = ()) -> PolicyDecision | None:
        """The decision of the profile assigned to ``proc``; None when none applies."""
        key = (proc.container_id, proc.exe)
        try:
            evaluator = self._assigned[key]
        except KeyError:
            path = self.config.profile_for(proc)
            evaluator = self._assigned[key] = self._evaluators[path] if path else None
        if evaluator is None:
            return None
        arch = "SCMP_ARCH_X86" if proc.compat else self.host.scmp_arch
        decision = evaluator.decide(syscall, args, proc.cap_effective, arch)
        return PolicyDecision(
            evaluator.profile.path,
            decision.action,
            decision.errno,
            decision.explanation,
            decision.violation,
            decision.rule_index,
        )

    def interesting_syscalls(self) -> frozenset[str]:
        """Syscalls that some profile does not just allow unconditionally (the capture sends their details).

        A rule gated on capabilities, a rule with argument conditions or a non-ALLOW action marks its names;
        a default other than ALLOW marks every syscall that profile does not allow unconditionally.
        """
        every = known_names(False) | known_names(True)
        found: set[str] = set()
        for evaluator in self._evaluators.values():
            profile = evaluator.profile
            plain_allow: set[str] = set()
            for rule in profile.rules:
                gated = bool(rule.includes.caps or rule.excludes.caps)
                if not gated and not rule.applies(0, evaluator.host):
                    continue  # for another arch or kernel: never on this host
                if rule.action is Action.ALLOW and not rule.args and not gated:
                    plain_allow.update(rule.names)
                else:
                    found.update(rule.names)
            if profile.default_action is not Action.ALLOW:
                found.update(every - plain_allow)
        return frozenset(found)


@dataclass(frozen=True, slots=True)
class SeccompStatus:
    """A process's own seccomp state (/proc/PID/status): mode 0 disabled, 1 strict, 2 filter."""

    pid: int
    mode: int
    filters: int

    @property
    def mode_name(self) -> str:
        return {0: "disabled", 1: "strict", 2: "filter"}.get(self.mode, f"mode {self.mode}")


def seccomp_status(pid: int | str = "self", proc_root: str = "/proc") -> SeccompStatus | None:
    """Read Seccomp: and Seccomp_filters: of a process; None when it is gone or the kernel lacks them."""
    values: dict[str, int] = {}
    try:
        with open(os.path.join(proc_root, str(pid), "status"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("Seccomp", "Seccomp_filters", "Pid"):
                    values[key] = int(value.strip() or 0)
    except (OSError, ValueError):
        return None
    if "Seccomp" not in values:
        return None
    return SeccompStatus(values.get("Pid", -1), values["Seccomp"], values.get("Seccomp_filters", 0))

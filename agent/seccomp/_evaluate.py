"""Deciding what a profile does with one syscall, as runc + libseccomp would enforce it.

Per capability set, the rules that apply are indexed by syscall name once; a syscall then costs one dict
look-up plus its own argument checks. libseccomp's precedence is followed: an unconditional rule beats
conditional ones and the first unconditional rule wins; where conditional rules of *different* actions
meet on one syscall, the answer comes from running libseccomp's own compiled BPF for that syscall.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.capture.names import syscall_number
from agent.seccomp._kernel import arch_token, build_filter, decode_ret, export_bpf, run_bpf
from agent.seccomp._profile import (
    CAP_BITS,
    Action,
    Host,
    Profile,
    SyscallRule,
    action_text,
)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one profile does with one syscall. ``rule_index`` is None for the default or a bad arch."""

    action: Action
    errno: int | None
    rule_index: int | None
    explanation: str

    @property
    def violation(self) -> bool:
        return self.action not in (Action.ALLOW, Action.LOG)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to decide one syscall under one capability set."""

    unconditional: SyscallRule | None
    conditional: tuple[SyscallRule, ...]
    mixed: bool  # conditional rules with different actions: ask libseccomp's BPF
    program: tuple[tuple[int, int, int, int], ...] = ()


class ProfileEvaluator:
    """Evaluates syscalls against one profile; caches the per-syscall index per relevant capability set."""

    def __init__(self, profile: Profile, host: Host | None = None) -> None:
        self.profile = profile
        self.host = host or Host.current()
        self._arches = frozenset(profile.arches_for_host(self.host))
        self._cap_mask = 0
        for rule in profile.rules:
            for cap in (*rule.includes.caps, *rule.excludes.caps):
                self._cap_mask |= CAP_BITS.get(cap, 0)
        self._indexes: dict[int, dict[str, _Plan]] = {}
        self._decisions: dict[tuple[int, str], Decision] = {}
        default_text = action_text(profile.default_action, profile.default_errno)
        self._default = Decision(
            profile.default_action,
            profile.default_errno,
            None,
            f"{profile.name}: defaultAction -> {default_text}",
        )

    def decide(
        self, syscall: str, args: tuple[int, ...] = (), caps: int = 0, arch: str | None = None
    ) -> Decision:
        """The action for ``syscall(args)`` by a process holding ``caps`` (a bit mask) on ABI ``arch``."""
        if arch is not None and arch not in self._arches:
            # libseccomp's bad-arch action (SCMP_ACT_KILL) for an ABI the filter does not list
            return Decision(
                Action.KILL_THREAD,
                None,
                None,
                f"{self.profile.name}: architecture {arch} not in the profile -> SCMP_ACT_KILL_THREAD",
            )
        if arch == "SCMP_ARCH_X86":
            args = tuple(a & 0xFFFFFFFF for a in args)  # a 32-bit ABI passes 32-bit registers
        plan = self.index(caps).get(syscall)
        if plan is None:
            return self._default
        if plan.unconditional is not None:
            return self._from_rule(plan.unconditional, syscall)
        if plan.mixed:
            return self._from_bpf(plan, syscall, args)
        for rule in plan.conditional:
            if rule.matches(args):
                return self._from_rule(rule, syscall)
        return self._default

    def index(self, caps: int) -> dict[str, _Plan]:
        key = caps & self._cap_mask
        found = self._indexes.get(key)
        if found is None:
            found = self._indexes[key] = self._build(key)
        return found

    def unconditional_allow(self, syscall: str, caps: int) -> bool:
        plan = self.index(caps).get(syscall)
        if plan is None:
            return self.profile.default_action is Action.ALLOW
        if plan.unconditional is not None:
            return plan.unconditional.action is Action.ALLOW
        return False

    def _build(self, caps: int) -> dict[str, _Plan]:
        by_name: dict[str, list[SyscallRule]] = {}
        default = (self.profile.default_action, self.profile.default_errno)
        for rule in self.profile.rules:
            if rule.applies(caps, self.host) and (rule.action, rule.errno) != default:
                for name in dict.fromkeys(rule.names):
                    by_name.setdefault(name, []).append(rule)
        index: dict[str, _Plan] = {}
        for name, rules in by_name.items():
            unconditional = next((r for r in rules if not r.args), None)
            conditional = tuple(r for r in rules if r.args)
            mixed = unconditional is None and len({(r.action, r.errno) for r in conditional}) > 1
            program: tuple[tuple[int, int, int, int], ...] = ()
            if mixed and syscall_number(name) >= 0:
                compiled = build_filter(self.profile, caps, self.host, conditional, (self.host.scmp_arch,))
                program = export_bpf(compiled.filter)
            index[name] = _Plan(unconditional, conditional, mixed and bool(program), program)
        return index

    def _from_rule(self, rule: SyscallRule, syscall: str) -> Decision:
        key = (rule.index, syscall)
        found = self._decisions.get(key)
        if found is None:  # the explanation text is the costly part: build it once per rule and name
            found = self._decisions[key] = Decision(
                rule.action, rule.errno, rule.index, f"{self.profile.name}: {rule.describe(syscall)}"
            )
        return found

    def _from_bpf(self, plan: _Plan, syscall: str, args: tuple[int, ...]) -> Decision:
        ret = run_bpf(plan.program, syscall_number(syscall), arch_token(self.host.scmp_arch), args)
        action, number = decode_ret(ret)
        for rule in plan.conditional:  # name the rule libseccomp's answer came from
            if rule.action is action and rule.errno == number and rule.matches(args):
                return self._from_rule(rule, syscall)
        if (action, number) == (self.profile.default_action, self.profile.default_errno):
            return self._default
        return Decision(
            action,
            number,
            None,
            f"{self.profile.name}: libseccomp's decision tree for {syscall} -> {action_text(action, number)}",
        )

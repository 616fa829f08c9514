"""Shared helpers for the Falco engine tests: a hand-built process table and event constructors."""

from __future__ import annotations

import os
from typing import Any

from agent.capture.names import syscall_number
from agent.events import DetailEvent
from agent.falco import AnomalyFields, ContainerInfo, Engine, RuleMatch, RuleSet, load_rules_text
from agent.proc.info import ProcessInfo

SHARED_RULES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "falco-rules")
STABLE = os.path.join(SHARED_RULES, "falco_rules.yaml")
INCUBATING = os.path.join(SHARED_RULES, "falco-incubating_rules.yaml")
SANDBOX = os.path.join(SHARED_RULES, "falco-sandbox_rules.yaml")

CAP_SYS_MODULE = 1 << 16
CAP_SYS_ADMIN = 1 << 21
CAP_DAC_OVERRIDE = 1 << 1


def proc(pid: int, ppid: int, comm: str, exe: str, *args: str, **kw: Any) -> ProcessInfo:
    defaults: dict[str, Any] = {"uid": 1000, "gid": 1000, "user": "alice", "group": "alice", "cwd": "/home/alice",
                                "start_ns": 1_000}
    defaults.update(kw)
    return ProcessInfo(pid, ppid, comm, exe, (exe, *args) if not args or args[0] != "-" else (comm, *args[1:]),
                       **defaults)


class World:
    """A process table plus an engine over a rule set."""

    def __init__(self, ruleset: RuleSet, procs: list[ProcessInfo], anomalies: dict[int, AnomalyFields] | None = None,
                 containers: dict[str, ContainerInfo] | None = None) -> None:
        self.table = {p.pid: p for p in procs}
        self.anomalies = anomalies or {}
        self.containers = containers or {}
        self.engine = Engine(ruleset, self.table.get, self.anomalies.get, hostname="testhost",
                             container_lookup=self.containers.get)
        self.ts = 10_000_000_000

    def ev(self, pid: int, syscall: str, res: int = 0, /, **args: Any) -> list[RuleMatch]:
        self.ts += 1_000
        return self.engine.evaluate(DetailEvent(self.ts, pid, pid, syscall, max(syscall_number(syscall), 0), res,
                                                args))

    def names(self, pid: int, syscall: str, res: int = 0, /, **args: Any) -> list[str]:
        return [m.rule for m in self.ev(pid, syscall, res, **args)]


def ruleset_from(text: str, **kw: Any) -> RuleSet:
    return load_rules_text([("test.yaml", text)], **kw)


O_RDONLY = os.O_RDONLY
O_WRONLY = os.O_WRONLY
O_TRUNC = os.O_TRUNC
O_CLOEXEC = os.O_CLOEXEC

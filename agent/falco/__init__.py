"""Sysgram's Falco rules engine: Falco-format rule files evaluated over Sysgram's own events.

Layered as Falco's engine: reader (YAML with marks) -> collector (lists, macros, rules, exceptions,
overrides, appends) -> compiler (condition AST, macros and lists expanded, fields resolved, generated Python
predicates) -> evaluator (rules indexed by event type). See docs/falco-engine.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.falco._diag import Diagnostic
from agent.falco._engine import Engine, RuleMatch
from agent.falco._fields import FIELDS
from agent.falco._ruleset import Rule, RuleSet, load_texts, read_files
from agent.falco._state import AnomalyFields, AnomalyLookup, ContainerInfo, ContainerLookup

__all__ = [
    "FIELDS",
    "AnomalyFields",
    "AnomalyLookup",
    "ContainerInfo",
    "ContainerLookup",
    "Diagnostic",
    "Engine",
    "Rule",
    "RuleMatch",
    "RuleSet",
    "check_files",
    "load_rules",
    "load_rules_text",
]


def load_rules(paths: Sequence[str], *, rule_matching: str = "all") -> tuple[RuleSet, list[Diagnostic]]:
    """Load rule files together, in order. Problems in the files come back as diagnostics; only a file
    that cannot be read raises (RulesError)."""
    ruleset = load_texts(read_files(paths), rule_matching)
    return ruleset, list(ruleset.diagnostics)


def load_rules_text(texts: Sequence[tuple[str, str]], *, rule_matching: str = "all") -> RuleSet:
    """Like load_rules, from (name, YAML text) pairs already in memory."""
    return load_texts(texts, rule_matching)


def check_files(paths: Sequence[str]) -> dict[str, Any]:
    """The `sysgram rules check` report: per file counts and diagnostics, per rule a status."""
    ruleset, diags = load_rules(paths)
    files = []
    for path in paths:
        counts = ruleset.counts.get(path, {"rules": 0, "macros": 0, "lists": 0})
        files.append({
            "path": path,
            "rules": counts["rules"],
            "macros": counts["macros"],
            "lists": counts["lists"],
            "errors": [d.to_json() for d in diags if d.file == path and d.is_error],
            "warnings": [d.to_json() for d in diags if d.file == path and not d.is_error],
        })
    rules = [{"name": s.name, "file": s.file, "status": s.status, "reason": s.reason} for s in ruleset.statuses]
    return {"files": files, "rules": rules}

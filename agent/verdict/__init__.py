"""The cross-check: one decision step over the anomaly scorer, the Falco engine, the seccomp evaluator and
ingested Falco alerts. Machine learning alone never blocks.

The decision table (defaults; each row configurable under ``verdict:`` in the config; blocking is
described in docs/enforcement.md):

=============================  ===========================  ==========================================
evidence                        severity                     action
=============================  ===========================  ==========================================
anomaly only                    ``anomaly_priority`` Warning alert (never block)
rule only                       the rule's priority          alert, as Falco would; block only when
                                                             enforcement is on and the block policy
                                                             names the rule (tag, name, priority)
seccomp violation only          ``seccomp_priority`` Notice  alert
anomaly + rule                  rule priority raised by      alert; block when the block policy names the
                                ``escalate`` levels (1)      rule, or the anomaly score reaches
                                                             ``block_anomaly_score``
anomaly + seccomp violation     ``anomaly_seccomp_priority`` alert
                                Error
ingested Falco alert            its priority, raised by      alert (correlated with the process's anomaly
 (+ anomalous process)          ``escalate`` when anomalous  state); never blocks unless
                                                             ``enforce.block_ingested`` (which needs a
                                                             bearer token on the ingestion endpoint)
=============================  ===========================  ==========================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.config import PRIORITIES, EnforceConfig, canonical_priority
from agent.errors import ConfigError

Action = Literal["log", "alert", "block"]


def _rank(priority: str) -> int:
    p = canonical_priority(priority)
    return PRIORITIES.index(p) if p is not None else PRIORITIES.index("Warning")


def escalate(priority: str, levels: int) -> str:
    return PRIORITIES[max(0, _rank(priority) - levels)]


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one source found; ``kind`` is anomaly | rule | seccomp | falco."""

    kind: str
    name: str
    priority: str = "Warning"
    tags: tuple[str, ...] = ()
    detail: str = ""
    score: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    severity: str
    action: Action
    reasons: tuple[str, ...]
    explanation: str
    evidence: tuple[Evidence, ...] = ()


@dataclass(frozen=True, slots=True)
class DecisionTable:
    anomaly_priority: str = "Warning"
    seccomp_priority: str = "Notice"
    anomaly_seccomp_priority: str = "Error"
    escalate: int = 1
    min_priority: str = "Debug"  # evidence below this is only logged
    enforce: EnforceConfig = field(default_factory=EnforceConfig)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], enforce: EnforceConfig, *, source: str = "<config>"
    ) -> DecisionTable:
        known = {
            "anomaly_priority",
            "seccomp_priority",
            "anomaly_seccomp_priority",
            "escalate",
            "min_priority",
        }
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(
                    f"verdict.{key}: unknown key (known: {', '.join(sorted(known))})", path=source
                )
            if key == "escalate":
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 7:
                    raise ConfigError("verdict.escalate: expected an integer 0..7", path=source)
                values[key] = value
            else:
                canonical = canonical_priority(value) if isinstance(value, str) else None
                if canonical is None:
                    raise ConfigError(
                        f"verdict.{key}: expected a priority ({', '.join(PRIORITIES)}), got {value!r}",
                        path=source,
                    )
                values[key] = canonical
        return cls(enforce=enforce, **values)

    def _blocks(self, ev: Evidence, anomalous_score: float | None) -> bool:
        e = self.enforce
        if not e.enabled or ev.kind not in ("rule", "falco"):
            return False
        # An ingested alert comes from whoever can reach the endpoint: it names any pid it likes.
        if ev.kind == "falco" and not e.block_ingested:
            return False
        if ev.name in e.block_rules or any(t in e.block_tags for t in ev.tags):
            return True
        threshold = canonical_priority(e.block_min_priority) if e.block_min_priority else None
        if threshold is not None and _rank(ev.priority) <= PRIORITIES.index(threshold):
            return True
        return bool(
            e.block_anomaly_score and anomalous_score is not None and anomalous_score >= e.block_anomaly_score
        )

    def decide(self, evidence: Sequence[Evidence]) -> Verdict | None:
        if not evidence:
            return None
        anomaly = next((ev for ev in evidence if ev.kind == "anomaly"), None)
        rules = [ev for ev in evidence if ev.kind in ("rule", "falco")]
        seccomp = [ev for ev in evidence if ev.kind == "seccomp"]
        reasons = [f"{ev.kind}: {ev.name}" + (f" ({ev.detail})" if ev.detail else "") for ev in evidence]
        if rules:
            top = min(rules, key=lambda ev: _rank(ev.priority))
            severity = top.priority
            if anomaly is not None:
                severity = escalate(severity, self.escalate)
            block = any(self._blocks(ev, anomaly.score if anomaly else None) for ev in rules)
            action: Action = "block" if block else "alert"
            why = f"rule {top.name!r} matched"
            if anomaly is not None:
                why += f" on a process whose behaviour is anomalous (score {anomaly.score:.2f}): escalated"
        elif anomaly is not None and seccomp:
            severity, action = self.anomaly_seccomp_priority, "alert"
            why = f"anomalous behaviour and a seccomp policy violation ({seccomp[0].name})"
        elif anomaly is not None:
            severity, action = self.anomaly_priority, "alert"
            why = f"anomalous behaviour (score {anomaly.score:.2f}); no rule or policy agrees, so it is not blocked"
        else:
            severity, action = self.seccomp_priority, "alert"
            why = f"seccomp policy violation: {seccomp[0].name}"
        if _rank(severity) > _rank(self.min_priority):
            action = "log"
        return Verdict(
            severity=severity.capitalize() if severity.lower() != "info" else "Informational",
            action=action,
            reasons=tuple(reasons),
            explanation=why,
            evidence=tuple(evidence),
        )

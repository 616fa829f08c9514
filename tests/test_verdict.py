from __future__ import annotations

from agent.config import EnforceConfig
from agent.verdict import DecisionTable, Evidence, escalate


def test_anomaly_alone_alerts_and_never_blocks_even_when_enforcing() -> None:
    table = DecisionTable(enforce=EnforceConfig(enabled=True, block_anomaly_score=0.1))
    v = table.decide([Evidence("anomaly", "a", score=99.0)])
    assert v is not None and v.action == "alert" and v.severity == "Warning"


def test_rule_alone_behaves_as_falco() -> None:
    v = DecisionTable().decide([Evidence("rule", "Read sensitive file untrusted", "Warning")])
    assert v is not None and v.action == "alert" and v.severity == "Warning"


def test_anomaly_with_rule_escalates() -> None:
    v = DecisionTable().decide([Evidence("rule", "r", "Warning"), Evidence("anomaly", "a", score=3.0)])
    assert v is not None and v.severity == "Error" and "anomalous" in v.explanation


def test_block_only_when_enforcing_and_policy_names_the_rule() -> None:
    ev = [Evidence("rule", "r", "Notice", tags=("sysgram.block",))]
    assert DecisionTable().decide(ev).action == "alert"  # type: ignore[union-attr]
    on = DecisionTable(enforce=EnforceConfig(enabled=True))
    assert on.decide(ev).action == "block"  # type: ignore[union-attr]
    assert on.decide([Evidence("rule", "other", "Critical")]).action == "alert"  # type: ignore[union-attr]


def test_seccomp_with_anomaly_is_error() -> None:
    v = DecisionTable().decide([Evidence("seccomp", "ptrace denied"), Evidence("anomaly", "a", score=2.0)])
    assert v is not None and v.severity == "Error"
    assert escalate("Debug", 10) == "Emergency"

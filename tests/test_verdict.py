from __future__ import annotations

import pytest

from agent.config import EnforceConfig
from agent.errors import ConfigError
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


def _action(table: DecisionTable, *evidence: Evidence) -> str:
    verdict = table.decide(evidence)
    assert verdict is not None
    return verdict.action


def test_block_min_priority_blocks_at_and_above_only() -> None:
    table = DecisionTable(enforce=EnforceConfig(enabled=True, block_min_priority="Critical"))
    assert _action(table, Evidence("rule", "r", "Emergency")) == "block"
    assert _action(table, Evidence("rule", "r", "Critical")) == "block"
    assert _action(table, Evidence("rule", "r", "Error")) == "alert"
    assert _action(table, Evidence("rule", "r", "Warning")) == "alert"
    # a threshold that names no priority (only possible when built by hand) blocks nothing
    odd = DecisionTable(enforce=EnforceConfig(enabled=True, block_min_priority="Critcal"))
    assert _action(odd, Evidence("rule", "r", "Warning")) == "alert"
    assert _action(odd, Evidence("rule", "r", "Emergency")) == "alert"


def test_block_anomaly_score_needs_a_rule_and_the_score() -> None:
    table = DecisionTable(enforce=EnforceConfig(enabled=True, block_anomaly_score=5.0))
    rule = Evidence("rule", "r", "Notice")
    assert _action(table, rule, Evidence("anomaly", "a", score=5.0)) == "block"
    assert _action(table, rule, Evidence("anomaly", "a", score=4.99)) == "alert"
    assert _action(table, Evidence("anomaly", "a", score=50.0)) == "alert"  # ML alone never blocks
    assert _action(table, rule) == "alert"


def test_ingested_falco_alerts_block_only_when_allowed() -> None:
    falco = Evidence("falco", "Terminal shell in container", "Critical", tags=("sysgram.block",))
    policy = {"enabled": True, "block_min_priority": "Warning", "block_rules": ("Terminal shell in container",)}
    closed = DecisionTable(enforce=EnforceConfig(**policy))  # type: ignore[arg-type]
    assert _action(closed, falco) == "alert"
    assert _action(closed, falco, Evidence("anomaly", "a", score=9.0)) == "alert"
    opened = DecisionTable(enforce=EnforceConfig(**policy, block_ingested=True))  # type: ignore[arg-type]
    assert _action(opened, falco) == "block"
    # the same rule found by the agent's own engine blocks either way
    assert _action(closed, Evidence("rule", falco.name, "Critical")) == "block"


def test_from_mapping_names_bad_priorities() -> None:
    with pytest.raises(ConfigError, match=r"verdict\.anomaly_priority") as err:
        DecisionTable.from_mapping({"anomaly_priority": "Nope"}, EnforceConfig(), source="c.yaml")
    assert err.value.path == "c.yaml"
    table = DecisionTable.from_mapping({"seccomp_priority": "info"}, EnforceConfig(), source="c.yaml")
    assert table.seccomp_priority == "Informational"

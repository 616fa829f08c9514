"""One event, several matching rules: one alert per rule (as Falco), each cross-checked, one block at most."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.config import EnforceConfig
from agent.events import DetailEvent
from agent.falco import Engine, load_rules_text
from agent.pipeline import BLOCK_REFUSED_RULE, BLOCK_RULE, Pipeline
from agent.proc import ProcessTable
from agent.proc.info import ProcessInfo
from agent.respond import JsonlConfig, OutputConfig, build_outputs
from agent.verdict import DecisionTable

RULES = """
- rule: Open of a watched file
  desc: test
  condition: evt.type in (open, openat) and fd.name startswith /tmp/watched
  output: watched %fd.name by %proc.name
  priority: WARNING
- rule: Open of a watched secret
  desc: test
  condition: evt.type in (open, openat) and fd.name endswith .secret
  output: secret %fd.name by %proc.name
  priority: CRITICAL
  tags: [sysgram.block]
"""


class RecordingEnforcer:
    """Stands in for agent.enforce.Enforcer (which signals real processes): records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def block(self, pid: int, reason: str) -> object:
        self.asked.append(pid)

        class Record:
            done, signal, reason = False, "SIGKILL", "test: not sent"

        return Record()


def build(tmp_path: Path, *, enforce: bool) -> tuple[Pipeline, Path, RecordingEnforcer]:
    table = ProcessTable()
    me = os.getpid()
    table.add(ProcessInfo(pid=4242, ppid=me, comm="reader", exe="/usr/bin/reader", args=("reader",)))
    alerts = tmp_path / "alerts.jsonl"
    outputs = build_outputs(OutputConfig(console=None, jsonl=JsonlConfig(str(alerts)), fold_window=0), state_dir=tmp_path)
    enforce_cfg = EnforceConfig(enabled=enforce, block_tags=("sysgram.block",))
    pipeline = Pipeline(
        table=table, outputs=outputs, decisions=DecisionTable.from_mapping({}, enforce_cfg, source="test")
    )
    pipeline.engine = Engine(load_rules_text([("test.yaml", RULES)]), table.get)
    enforcer = RecordingEnforcer()
    pipeline.enforcer = enforcer
    return pipeline, alerts, enforcer


def open_event(path: str) -> DetailEvent:
    return DetailEvent(1_000, 4242, 4242, "openat", 257, 3, {"dirfd": -100, "name": path, "flags": 0, "mode": 0})


def alerts_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_matching_rule_is_its_own_alert_with_its_own_priority(tmp_path: Path) -> None:
    pipeline, alerts, enforcer = build(tmp_path, enforce=False)
    pipeline.handle([open_event("/tmp/watched/key.secret"), open_event("/tmp/watched/plain")])
    pipeline.outputs.close()
    got = [(a["rule"], a["priority"]) for a in alerts_of(alerts)]
    assert got == [
        ("Open of a watched file", "Warning"),
        ("Open of a watched secret", "Critical"),
        ("Open of a watched file", "Warning"),
    ]
    assert enforcer.asked == []


def test_a_process_is_blocked_once_even_when_several_rules_say_so(tmp_path: Path) -> None:
    pipeline, alerts, enforcer = build(tmp_path, enforce=True)
    pipeline.handle([open_event("/tmp/watched/key.secret")])
    pipeline.outputs.close()
    rules = [a["rule"] for a in alerts_of(alerts)]
    assert enforcer.asked == [4242]
    # the stand-in enforcer sends nothing (done: False): one refusal alert, and no block claimed
    assert rules.count(BLOCK_REFUSED_RULE) == 1 and BLOCK_RULE not in rules and "Open of a watched secret" in rules


def test_a_block_verdict_without_an_enforcer_says_it_was_not_enforced(tmp_path: Path) -> None:
    """A replay of a config with blocking on (or the moment before the tracer is up): the verdict is block,
    nothing can act, and the alert says so instead of leaving the SOC to guess."""
    from agent.pipeline import NOT_ENFORCED

    pipeline, alerts, _ = build(tmp_path, enforce=True)
    pipeline.enforcer = None
    pipeline.handle([open_event("/tmp/watched/key.secret")])
    pipeline.outputs.close()
    said: dict[object, Any] = {a["rule"]: a["output_fields"] for a in alerts_of(alerts)}
    assert BLOCK_RULE not in said and BLOCK_REFUSED_RULE not in said
    secret = said["Open of a watched secret"]
    assert secret["sysgram.verdict.action"] == "block" and secret["sysgram.action"] == NOT_ENFORCED
    assert "sysgram.action" not in said["Open of a watched file"]  # a plain alert claims nothing

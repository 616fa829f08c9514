"""The evaluator's fast paths (tests reordered inside an `and`, one merged function per event type) decide
exactly what the rules as written decide, over the stable rules and a varied event stream."""

from __future__ import annotations

import os

import pytest

import agent.falco._compiler as compiler
import agent.falco._engine as engine_mod
from agent.events import DetailEvent, ProcEvent
from agent.falco import Engine, load_rules
from agent.falco.bench import synthetic_events
from tests._falco_helpers import STABLE, ruleset_from


def _decisions(engine: Engine, events: list[DetailEvent]) -> list[tuple[int, str, str]]:
    out = []
    for i, ev in enumerate(events):
        for m in engine.evaluate(ev):
            out.append((i, m.rule, m.output.split(" ", 1)[1]))  # the time stamp aside
    return out


@pytest.mark.skipif(not os.path.exists(STABLE), reason="../shared/falco-rules not present")
def test_reordered_and_merged_rules_match_the_rules_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    procs, events = synthetic_events(6000, seed=11)
    fast_rules, _ = load_rules([STABLE])
    fast = Engine(fast_rules, procs.get, hostname="h", boot_to_wall_ns=0)
    assert fast._combined, "the stable rules have event types with several rules: they get merged"
    monkeypatch.setattr(compiler, "_cost_rank", lambda node: 0)  # the written order
    monkeypatch.setattr(engine_mod, "combine_predicates", lambda t, entries: None)  # one call per rule
    plain_rules, _ = load_rules([STABLE])
    plain = Engine(plain_rules, procs.get, hostname="h", boot_to_wall_ns=0)
    assert not plain._combined
    expected = _decisions(plain, events)
    assert len({rule for _, rule, _ in expected}) >= 4  # the stream exercises several rules
    assert _decisions(fast, events) == expected


def test_cheap_selective_tests_come_first_in_the_generated_code() -> None:
    rs = ruleset_from(
        "- rule: r\n  desc: d\n"
        "  condition: evt.type = openat and not proc.pname in (bash) and fd.num >= 0 and fd.name = /etc/x\n"
        "  output: o\n  priority: INFO\n"
    )
    source = getattr(rs.compiled[0].by_type["openat"], compiler.PREDICATE_SOURCE)[0]
    assert source.index("fd.name") < source.index("fd.num") < source.index("(not ")


def test_a_rule_that_raises_is_skipped_and_the_others_still_match() -> None:
    rs = ruleset_from(
        "- rule: a\n  desc: d\n  condition: evt.type = openat and fd.name = /x\n  output: o\n  priority: INFO\n"
        "- rule: b\n  desc: d\n  condition: evt.type = openat and fd.name startswith /\n  output: o\n"
        "  priority: INFO\n"
    )
    procs, _ = synthetic_events(1)
    engine = Engine(rs, procs.get, hostname="h")
    pid = next(iter(procs))
    assert "openat" in engine._combined
    ev = DetailEvent(1, pid, pid, "openat", 257, 3, {"dirfd": -100, "name": "/x", "flags": 0})
    assert [m.rule for m in engine.evaluate(ev)] == ["a", "b"]

    def broken(ctx: object) -> bool:
        raise ValueError("a faulty predicate")

    engine._combined["openat"] = broken  # type: ignore[assignment]
    engine._index["openat"] = ((broken, engine._index["openat"][0][1]), engine._index["openat"][1])
    assert [m.rule for m in engine.evaluate(ev)] == ["b"]
    assert engine.eval_errors == 1
    engine.on_proc_event(ProcEvent("exit", 2, pid, pid))

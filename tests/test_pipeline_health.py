"""How the live agent judges its own health for /healthz (agent.pipeline.stall_reason)."""

from __future__ import annotations

from agent.pipeline import STALL_AFTER_S, stall_reason


def test_healthy_while_every_stage_turned_recently() -> None:
    assert stall_reason(1000.0, {"pipeline": 999.9, "capture reader": 1000.0 - STALL_AFTER_S}) is None


def test_the_stalest_stage_past_the_limit_is_named_with_its_age() -> None:
    turns = {"pipeline": 1000.0 - STALL_AFTER_S - 5, "capture reader": 1000.0 - STALL_AFTER_S - 90}
    assert stall_reason(1000.0, turns) == f"stalled: the capture reader has not turned for {STALL_AFTER_S + 90:.0f} s"
    assert stall_reason(1000.0, {"pipeline": 900.0, "capture reader": 999.0}, limit=60.0) == (
        "stalled: the pipeline has not turned for 100 s"
    )

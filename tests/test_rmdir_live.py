"""rmdir on real kernel events: its path reaches the rules (it had no decoder: rules on it never matched)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import requires_bpf
from tests.test_pipeline_live import agent_with_rule

pytestmark = [requires_bpf, pytest.mark.bpf]


def test_rmdir_path_reaches_the_rules(tmp_path: Path) -> None:
    target = f"/tmp/sysgram-rmdir-{uuid.uuid4().hex}"
    agent = agent_with_rule(tmp_path, "Test rmdir", f"evt.type = rmdir and evt.arg.path = {target}",
                            "rmdir %evt.arg.path (%fd.name) by %proc.name")
    try:
        os.mkdir(target)
        os.rmdir(target)
        agent.wait_for(lambda: [r for r in agent.records() if r["rule"] == "Test rmdir"], 15)
    finally:
        assert agent.stop() == 0, agent.stderr
    hits = [r for r in agent.records() if r["rule"] == "Test rmdir"]
    assert len(hits) == 1 and hits[0]["output_fields"]["fd.name"] == target

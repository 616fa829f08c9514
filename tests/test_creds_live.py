"""The process table follows setuid-family calls on real kernel events: a root process that drops to nobody
without an exec is nobody to the rules from then on (it used to stay "root" until its next exec)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import requires_bpf
from tests.test_pipeline_live import agent_with_rule

pytestmark = [requires_bpf, pytest.mark.bpf]

DROP = """
import os, sys, time
time.sleep(0.3)
open(sys.argv[1] + ".before", "w").close()   # as root
os.setgid(65534)
os.setuid(65534)                               # no exec: only the set*id calls say so
time.sleep(0.05)
try:
    open(sys.argv[1] + ".after", "w").close()  # as nobody (the directory is world-writable)
except OSError:
    pass
"""


def test_a_root_process_that_drops_to_nobody_is_nobody_to_the_rules(tmp_path: Path) -> None:
    watched = f"/tmp/sysgram-creds-{uuid.uuid4().hex}"
    agent = agent_with_rule(tmp_path, "Test watched create",
                            f"evt.type in (open, openat) and fd.name startswith {watched}",
                            "create of %fd.name by uid %user.uid (%user.name)")
    try:
        subprocess.run([sys.executable, "-c", DROP, watched], check=True, timeout=30)
        agent.wait_for(lambda: len([r for r in agent.records() if r["rule"] == "Test watched create"]) >= 2, 15)
    finally:
        assert agent.stop() == 0, agent.stderr
        for suffix in (".before", ".after"):
            Path(watched + suffix).unlink(missing_ok=True)
    seen = {r["output_fields"]["fd.name"].rsplit(".", 1)[1]: r["output_fields"]["user.uid"]
            for r in agent.records() if r["rule"] == "Test watched create"}
    assert seen == {"before": 0, "after": 65534}

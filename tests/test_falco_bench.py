"""`sysgram bench rules` on a recording: the replay takes what `sysgram run` would see, through a process
table filled from the recording, and reports rules throughput, alerts and the event mix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.capture.recording import RecordingWriter
from agent.events import DetailEvent, ProcEvent
from agent.falco import load_rules
from agent.falco.bench import measure_recording, replay_events
from agent.proc.info import ProcessInfo
from tests._falco_helpers import STABLE

pytestmark = pytest.mark.skipif(not os.path.exists(STABLE), reason="../shared/falco-rules not present")


def _recording(path: Path) -> None:
    writer = RecordingWriter(str(path))
    writer.add_process(ProcessInfo(500, 1, "bash", "/usr/bin/bash", ("bash",), "/root", 0, 0, "root", "root",
                                   start_ns=1_000))
    ts = 2_000_000
    for i in range(40):
        writer.add_event(ProcEvent("fork", ts, 600 + i, 600 + i, ppid=500, comm="bash"))
        writer.add_event(ProcEvent("exec", ts + 10, 600 + i, 600 + i, comm="cat", filename="/usr/bin/cat"))
        writer.add_event(DetailEvent(ts + 20, 600 + i, 600 + i, "execve", 59, 0,
                                     {"filename": "/usr/bin/cat", "argv": ["cat", "/etc/shadow"]}))
        writer.add_event(DetailEvent(ts + 30, 600 + i, 600 + i, "openat", 257, 3,
                                     {"dirfd": -100, "name": "/etc/shadow", "flags": 0, "mode": 0}))
        writer.add_event(DetailEvent(ts + 35, 600 + i, 600 + i, "openat", 257, 4,
                                     {"dirfd": -100, "name": "/usr/lib/locale/C.utf8", "flags": 0, "mode": 0}))
        writer.add_event(DetailEvent(ts + 40, 600 + i, 600 + i, "close", 3, 0, {"fd": 3}))  # no rule asks
        writer.add_event(ProcEvent("exit", ts + 50, 600 + i, 600 + i, comm="cat"))
        ts += 1_000
    writer.close({})


def test_replay_keeps_what_sysgram_run_asks_for(tmp_path: Path) -> None:
    _recording(tmp_path / "r.parquet")
    ruleset, _ = load_rules([STABLE])
    procs, events, skipped = replay_events(str(tmp_path / "r.parquet"), ruleset)
    assert [p.pid for p in procs] == [500]
    assert skipped == 40  # the closes
    assert len(events) == 40 * 6
    assert not any(isinstance(e, DetailEvent) and e.syscall == "close" for e in events)


def test_measure_recording_counts_alerts_and_mix(tmp_path: Path) -> None:
    _recording(tmp_path / "r.parquet")
    figures, mix = measure_recording(str(tmp_path / "r.parquet"), [STABLE], rounds=1)
    # Every `cat /etc/shadow` (child of bash, from the table) is a "Read sensitive file untrusted".
    assert figures["alerts"] == 40
    assert figures["events"] == 240 and figures["rules_eps"] > 0 and figures["both_eps"] > 0
    assert mix == {"fork": 40, "exec": 40, "execve": 40, "openat": 80, "exit": 40}

"""The alert's Falco JSON shape, its time format, and the OCSF Detection Finding mapping."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from agent.respond import (
    PRIORITIES,
    Alert,
    format_time,
    internal_alert,
    parse_priority,
    parse_time,
    sysgram_fields,
)

FALCO_KEYS = {"uuid", "time", "rule", "priority", "output", "output_fields", "source", "tags", "hostname"}


def make_alert(priority: str = "Critical") -> Alert:
    fields = {
        "proc.pid": 4242, "proc.ppid": 1, "proc.name": "nc", "proc.exepath": "/usr/bin/nc",
        "proc.cmdline": "nc -l 4444", "user.name": "www-data", "user.uid": 33, "container.id": "host",
        **sysgram_fields(score=0.93, threshold=0.61, window=["socket", "bind", "listen"],
                         explanation="rare n-gram bind,listen", verdict="anomalous", action="alert"),
    }
    return Alert.new("Anomalous syscall sequence", priority, "nc (pid 4242) scored 0.93", fields,  # type: ignore[arg-type]
                     tags=("sysgram", "anomaly"), time_ns=1_795_701_902_123_456_789, hostname="node-1")


def test_falco_json_has_every_key_and_nine_fractional_digits() -> None:
    data = json.loads(make_alert().to_json())
    assert set(data) == FALCO_KEYS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", data["time"])
    assert data["time"].endswith(".123456789Z")
    assert data["priority"] == "Critical" and data["hostname"] == "node-1"
    assert data["tags"] == ["sysgram", "anomaly"]
    assert data["output_fields"]["sysgram.score"] == 0.93
    assert data["output_fields"]["sysgram.window"] == ["socket", "bind", "listen"]
    assert data["output_fields"]["sysgram.verdict"] == "anomalous"
    assert "\n" not in make_alert().to_json()


def test_time_round_trips_and_matches_the_wall_clock() -> None:
    ns = int(datetime(2026, 11, 26, 13, 45, 2, tzinfo=UTC).timestamp()) * 10**9 + 5
    assert format_time(ns) == "2026-11-26T13:45:02.000000005Z"
    assert parse_time(format_time(ns)) == ns
    assert parse_time("2026-11-26T14:45:02.5+01:00") == ns - 5 + 500_000_000
    assert parse_time("not a time") is None


def test_priorities_use_falco_spelling() -> None:
    assert PRIORITIES == (
        "Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug"
    )
    assert parse_priority("WARNING") == "Warning"
    assert parse_priority("info") == "Informational"
    assert parse_priority("loud") is None


@pytest.mark.parametrize(
    ("priority", "severity_id"),
    [("Emergency", 6), ("Alert", 5), ("Critical", 5), ("Error", 4), ("Warning", 3), ("Notice", 2),
     ("Informational", 1), ("Debug", 1)],
)
def test_ocsf_severity_follows_priority(priority: str, severity_id: int) -> None:
    assert make_alert(priority).to_ocsf()["severity_id"] == severity_id


def test_ocsf_detection_finding_fields() -> None:
    alert = make_alert()
    finding = json.loads(alert.to_json("ocsf"))
    assert finding["class_uid"] == 2004 and finding["category_uid"] == 2
    assert finding["type_uid"] == 200401 and finding["activity_id"] == 1
    assert finding["time"] == alert.time_ns // 1_000_000
    assert finding["metadata"]["product"]["name"] == "Sysgram"
    assert finding["metadata"]["version"]
    info = finding["finding_info"]
    assert info["uid"] == alert.uuid and info["title"] == alert.rule and info["desc"] == alert.output
    process = finding["evidences"][0]["process"]
    assert process["pid"] == 4242 and process["name"] == "nc" and process["cmd_line"] == "nc -l 4444"
    assert process["file"]["path"] == "/usr/bin/nc"
    assert process["parent_process"]["pid"] == 1
    assert process["user"] == {"name": "www-data", "uid": "33"}
    assert "container" not in process  # "host" is not a container
    assert finding["unmapped"]["output_fields"]["sysgram.score"] == 0.93
    assert finding["device"]["hostname"] == "node-1"


def test_ocsf_without_process_fields_has_no_evidence() -> None:
    finding = Alert.new("r", "Notice", "o").to_ocsf()
    assert "evidences" not in finding


def test_internal_alerts_are_tagged_and_namespaced() -> None:
    alert = internal_alert("Sysgram webhook endpoint disabled", "Error", "gone", url="http://x")
    assert alert.is_internal and alert.output_fields == {"sysgram.url": "http://x"}
    assert not make_alert().is_internal


def test_new_alerts_get_distinct_uuids() -> None:
    assert len({Alert.new("r", "Notice", "o").uuid for _ in range(100)}) == 100

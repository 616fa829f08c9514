"""Falco ingestion (http_output endpoint, file_output tail) and /metrics, over real sockets and files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import ConfigError
from agent.respond import FalcoAlert, FalcoFileTail, IngestServer, Metrics, parse_falco_alert

# The shape Falco's http_output and json_output write (Falco 0.4x).
FALCO_PAYLOAD: dict[str, Any] = {
    "hostname": "node-1",
    "output": "13:45:02.123456789: Warning Sensitive file opened for reading by non-trusted program "
    "(file=/etc/shadow gparent=systemd ggparent=<NA> evt_type=openat user=root user_uid=0 "
    "process=cat proc_exepath=/usr/bin/cat parent=bash command=cat /etc/shadow terminal=34816)",
    "output_fields": {
        "evt.time": 1795701902123456789,
        "fd.name": "/etc/shadow",
        "proc.cmdline": "cat /etc/shadow",
        "proc.exepath": "/usr/bin/cat",
        "proc.name": "cat",
        "proc.pid": 4242,
        "user.name": "root",
        "user.uid": 0,
    },
    "priority": "Warning",
    "rule": "Read sensitive file untrusted",
    "source": "syscall",
    "tags": ["T1555", "container", "filesystem", "host", "maturity_stable", "mitre_credential_access"],
    "time": "2026-11-26T13:45:02.123456789Z",
}


class Collected:
    def __init__(self) -> None:
        self.alerts: list[FalcoAlert] = []

    def __call__(self, alert: FalcoAlert) -> None:
        self.alerts.append(alert)


@pytest.fixture
def server() -> Iterator[tuple[IngestServer, Collected, Metrics]]:
    got, metrics = Collected(), Metrics()
    srv = IngestServer(got, metrics, address="127.0.0.1", port=0).start()
    yield srv, got, metrics
    srv.close()


def test_a_falco_http_output_post_reaches_the_callback_parsed(
    server: tuple[IngestServer, Collected, Metrics],
) -> None:
    srv, got, metrics = server
    response = httpx.post(srv.url + "/", json=FALCO_PAYLOAD)
    assert response.status_code == 200
    [alert] = got.alerts
    assert alert.rule == "Read sensitive file untrusted"
    assert alert.priority == "Warning"
    assert alert.time == "2026-11-26T13:45:02.123456789Z"
    assert alert.time_ns == int(datetime(2026, 11, 26, 13, 45, 2, tzinfo=UTC).timestamp()) * 10**9 + 123456789
    assert alert.output_fields["proc.pid"] == 4242
    assert alert.tags[0] == "T1555" and alert.hostname == "node-1" and alert.source == "syscall"
    assert metrics.value("sysgram_falco_alerts_ingested_total", via="http") == 1


def test_a_falcosidekick_style_post_with_uuid_and_lowercase_priority(
    server: tuple[IngestServer, Collected, Metrics],
) -> None:
    srv, got, _ = server
    payload = {**FALCO_PAYLOAD, "uuid": "2b3c1a43-2f3c-4d9e-9a55-2f1ba7b0c2d1", "priority": "critical",
               "time": "2026-11-26T13:45:02.1234Z"}
    assert httpx.post(srv.url + "/falco", json=payload).status_code == 200
    [alert] = got.alerts
    assert alert.priority == "Critical" and alert.uuid == payload["uuid"]
    assert alert.time == "2026-11-26T13:45:02.123400000Z"
    assert alert.to_alert().uuid == payload["uuid"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (json.dumps({**FALCO_PAYLOAD, "priority": "Loud"}).encode(), "unknown priority"),
        (json.dumps({k: v for k, v in FALCO_PAYLOAD.items() if k != "rule"}).encode(), "'rule'"),
        (json.dumps({**FALCO_PAYLOAD, "time": "yesterday"}).encode(), "'time'"),
        (b"[" * 100_000, "nested too deeply"),  # was a traceback and no answer at all
    ],
)
def test_malformed_payloads_get_400_with_a_one_line_reason(
    server: tuple[IngestServer, Collected, Metrics], body: bytes, reason: str
) -> None:
    srv, got, metrics = server
    response = httpx.post(srv.url + "/", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert reason in response.text and response.text.count("\n") == 1
    assert got.alerts == []
    assert metrics.value("sysgram_falco_ingest_errors_total", reason="malformed") == 1


def test_non_loopback_bind_without_a_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="token"):
        IngestServer(Collected(), Metrics(), address="0.0.0.0", port=0)


def test_with_a_token_every_request_but_the_liveness_ones_must_carry_it() -> None:
    got = Collected()
    srv = IngestServer(got, Metrics(), address="0.0.0.0", port=0, token="s3cret-token").start()
    try:
        url = f"http://127.0.0.1:{srv.address[1]}"
        assert httpx.post(url + "/", json=FALCO_PAYLOAD).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert httpx.post(url + "/", json=FALCO_PAYLOAD, headers=wrong).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/nothing-here").status_code == 401
        # a kubelet's probe sends no token; these say only whether the agent is up
        assert (httpx.get(url + "/healthz").status_code, httpx.get(url + "/ping").status_code) == (200, 200)
        assert got.alerts == []
        right = {"authorization": "Bearer s3cret-token"}
        assert httpx.post(url + "/", json=FALCO_PAYLOAD, headers=right).status_code == 200
        assert httpx.get(url + "/metrics", headers=right).status_code == 200
        assert len(got.alerts) == 1
    finally:
        srv.close()


def test_metrics_page_serves_prometheus_text(server: tuple[IngestServer, Collected, Metrics]) -> None:
    srv, _, metrics = server
    metrics.events.inc(5)
    metrics.drop("ringbuf", 2)
    metrics.alert("Read sensitive file untrusted", "Warning")
    metrics.block("kill")
    response = httpx.get(srv.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "sysgram_events_total 5.0",
        'sysgram_drops_total{stage="ringbuf"} 2.0',
        "sysgram_windows_scored_total",
        "sysgram_windows_known_total",
        "sysgram_score_cache_hits_total",
        "sysgram_rules_evaluated_total",
        'sysgram_blocks_total{action="kill"}',
        'sysgram_alerts_total{priority="Warning",rule="Read sensitive file untrusted"} 1.0',
        "sysgram_webhook_deliveries_total",
        "sysgram_webhook_failures_total",
        "sysgram_webhook_spool_depth",
        "sysgram_webhook_spool_overflow_total",
        "sysgram_falco_alerts_ingested_total",
    ):
        assert name in text, name
    assert "python_gc" not in text  # our own registry, not the process-global one


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def line(rule: str) -> str:
    return json.dumps({**FALCO_PAYLOAD, "rule": rule}) + "\n"


def test_file_tail_follows_appends_partial_lines_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text(line("old, before the tail started"))
    got, metrics = Collected(), Metrics()
    tail = FalcoFileTail(path, got, metrics)
    assert tail.poll() == 0
    append(path, line("one"))
    half = line("two")
    append(path, half[:40])
    assert tail.poll() == 1
    append(path, half[40:] + "not json at all\n")
    assert tail.poll() == 1
    assert metrics.value("sysgram_falco_ingest_errors_total", reason="malformed") == 1
    append(path, "[" * 100_000 + "\n" + line("after a line nested too deeply, in the same write"))
    assert tail.poll() == 1
    assert metrics.value("sysgram_falco_ingest_errors_total", reason="malformed") == 2
    # logrotate: the file is renamed, Falco writes its last line to the old one, then reopens a new one.
    os.rename(path, tmp_path / "events.json.1")
    append(tmp_path / "events.json.1", line("three, late into the rotated file"))
    assert tail.poll() == 1
    path.write_text(line("four") + line("five"))
    assert tail.poll() == 2
    append(path, line("six"))
    assert tail.poll() == 1
    tail.close()
    assert [a.rule for a in got.alerts] == [
        "one", "two", "after a line nested too deeply, in the same write", "three, late into the rotated file",
        "four", "five", "six"
    ]
    assert metrics.value("sysgram_falco_alerts_ingested_total", via="file") == 7


def test_file_tail_handles_truncation_and_a_file_that_appears_later(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    got = Collected()
    tail = FalcoFileTail(path, got, Metrics())
    assert tail.poll() == 0
    path.write_text(line("a") + line("b"))
    assert tail.poll() == 2
    path.write_text(line("c"))  # truncated and rewritten in place (copytruncate)
    assert tail.poll() == 1
    tail.close()
    assert [a.rule for a in got.alerts] == ["a", "b", "c"]


def test_file_tail_thread_picks_up_lines(tmp_path: Path) -> None:
    import time

    path = tmp_path / "events.json"
    path.write_text("")
    got = Collected()
    tail = FalcoFileTail(path, got, Metrics(), poll_interval=0.01).start()
    append(path, line("threaded"))
    end = time.monotonic() + 10
    while not got.alerts and time.monotonic() < end:
        time.sleep(0.01)
    tail.close()
    assert [a.rule for a in got.alerts] == ["threaded"]


def test_parse_accepts_null_fields_and_rejects_bad_tags() -> None:
    alert = parse_falco_alert({**FALCO_PAYLOAD, "output_fields": None, "tags": None, "hostname": None})
    assert alert.output_fields == {} and alert.tags == () and alert.hostname == ""
    with pytest.raises(ValueError, match="tags"):
        parse_falco_alert({**FALCO_PAYLOAD, "tags": "T1555"})


class Flaky(Collected):
    """Fails on the alerts named in ``failing`` until they are removed from it."""

    def __init__(self, failing: set[str]) -> None:
        super().__init__()
        self.failing = failing

    def __call__(self, alert: FalcoAlert) -> None:
        if alert.rule in self.failing:
            raise RuntimeError("the pipeline is busy")
        super().__call__(alert)


def test_file_tail_keeps_a_line_whose_callback_failed_and_retries_it_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.json"
    path.write_text("")
    got = Flaky({"two"})
    metrics = Metrics()
    tail = FalcoFileTail(path, got, metrics)
    append(path, line("one") + line("two") + line("three"))
    with caplog.at_level("ERROR", logger="sysgram.respond"):
        assert tail.poll() == 1
        assert tail.poll() == 0  # still failing: "three" waits behind "two"
    assert [a.rule for a in got.alerts] == ["one"]
    assert metrics.value("sysgram_falco_ingest_errors_total", reason="callback") == 2
    assert any(f"{path}:2:" in r.getMessage() for r in caplog.records)  # the line that failed, by number
    append(path, line("four"))
    got.failing.clear()
    assert tail.poll() == 3
    tail.close()
    assert [a.rule for a in got.alerts] == ["one", "two", "three", "four"]


def test_file_tail_counts_lines_from_1_again_after_truncation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.json"
    path.write_text("")
    tail = FalcoFileTail(path, Collected(), Metrics())
    append(path, line("a") + line("b") + line("c"))
    assert tail.poll() == 3
    path.write_text("garbage\n")  # copytruncate, then a broken first line
    with caplog.at_level("WARNING", logger="sysgram.respond"):
        assert tail.poll() == 0
    tail.close()
    assert [r.getMessage().split(" not a Falco")[0] for r in caplog.records] == [f"{path}:1:"]


def test_file_tail_does_not_leave_a_rotated_file_with_lines_unhanded(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text("")
    got = Flaky({"old-2"})
    tail = FalcoFileTail(path, got, Metrics())
    append(path, line("old-1") + line("old-2") + line("old-3"))
    os.rename(path, tmp_path / "events.json.1")
    path.write_text(line("new-1"))
    tail.poll()
    got.failing.clear()
    tail.poll()
    tail.poll()
    tail.close()
    assert [a.rule for a in got.alerts] == ["old-1", "old-2", "old-3", "new-1"]


def test_is_local_tells_this_hosts_alerts_from_others() -> None:
    import socket

    here = socket.gethostname()
    assert parse_falco_alert({**FALCO_PAYLOAD, "hostname": here}).is_local
    assert parse_falco_alert({**FALCO_PAYLOAD, "hostname": here.upper()}).is_local
    assert parse_falco_alert({**FALCO_PAYLOAD, "hostname": ""}).is_local  # nothing says otherwise
    assert not parse_falco_alert({**FALCO_PAYLOAD, "hostname": here + "-elsewhere"}).is_local


def test_a_stalled_client_is_dropped_after_the_socket_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from agent.respond import _ingest

    assert _ingest._Handler.timeout is not None and _ingest._Handler.timeout > 0
    monkeypatch.setattr(_ingest._Handler, "timeout", 0.3)  # the real one, shortened for the test
    srv = IngestServer(Collected(), Metrics(), address="127.0.0.1", port=0).start()
    try:
        with socket.create_connection(srv.address, timeout=30) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nhost: x\r\n")  # ... and then nothing more
            # The server gives up on us: it closes the connection (recv sees the end) well before ours ends.
            assert conn.recv(1024) == b""
    finally:
        srv.close()


def test_the_server_listens_on_ipv6_loopback() -> None:
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    got = Collected()
    try:
        srv = IngestServer(got, Metrics(), address="::1", port=0).start()
    except ConfigError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert srv.url.startswith("http://[::1]:")
        assert httpx.post(srv.url + "/", json=FALCO_PAYLOAD, timeout=10).status_code == 200
    finally:
        srv.close()
    assert [a.rule for a in got.alerts] == [FALCO_PAYLOAD["rule"]]


def test_a_port_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        IngestServer(Collected(), Metrics(), address="127.0.0.1", port=99999)


def test_healthz_answers_what_the_agent_says_of_its_health(
    server: tuple[IngestServer, Collected, Metrics],
) -> None:
    srv, _, metrics = server
    assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200  # nothing watched: the server alone
    state: dict[str, str | None] = {"problem": "stalled: the pipeline has not turned for 31 s"}
    metrics.health = lambda: state["problem"]
    sick = httpx.get(f"{srv.url}/healthz", timeout=5)
    assert (sick.status_code, sick.text) == (503, "stalled: the pipeline has not turned for 31 s\n")
    assert httpx.get(f"{srv.url}/ping", timeout=5).status_code == 200  # /ping: the server answers
    state["problem"] = None
    assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200

"""The webhook sink against real HTTP receivers on 127.0.0.1: signing, spool, outage, kill -9, 410..."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DeliveryError
from agent.respond import Alert, Fanout, JsonlSink, Metrics, RetryPolicy, Spool, WebhookSink

REPO = Path(__file__).resolve().parents[1]
SECRET = "whsec_" + base64.b64encode(b"sysgram-test-secret-0123456789ab").decode()
FAST = RetryPolicy(base=0.02, cap=0.2)


Answer = Callable[[int, dict[str, str]], tuple[int, bytes]]


class Receiver:
    """A webhook endpoint: records every request; ``answer(request_index, headers)`` picks the status."""

    def __init__(self, port: int = 0, answer: Answer | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answer = answer or (lambda n, h: (200, b"ok"))
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else the body waits for a delayed ACK: 40 ms a request

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    index = len(receiver.requests)
                    receiver.requests.append((headers, body))
                status, text = receiver.answer(index, headers)
                self.send_response(status)
                self.send_header("content-length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < end:
            time.sleep(0.01)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Whether ``condition`` came true before the deadline (a loaded machine gets the whole timeout)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec independently of the sender's code."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    signed = b".".join([headers["webhook-id"].encode(), headers["webhook-timestamp"].encode(), body])
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    if abs(time.time() - int(headers["webhook-timestamp"])) > 300:
        return False
    candidates = [part.split(",", 1) for part in headers["webhook-signature"].split(" ")]
    return any(v == "v1" and hmac.compare_digest(sig, expected) for v, sig in candidates)


def alert(i: int = 0, rule: str = "Test rule") -> Alert:
    return Alert.new(rule, "Warning", f"test alert {i}", {"test.seq": i, "proc.pid": 100 + i})


def test_signature_verifies_and_a_tampered_body_does_not(receiver: Receiver, tmp_path: Path) -> None:
    sink = WebhookSink(receiver.url, state_dir=tmp_path, secret=SECRET, retry=FAST)
    sink.emit(alert(1))
    assert sink.wait_idle(10)
    sink.close()
    headers, body = receiver.requests[0]
    assert verify_signature(SECRET, headers, body)
    assert not verify_signature(SECRET, headers, body.replace(b"test alert 1", b"test alert 2"))
    assert headers["webhook-id"] == json.loads(body)["uuid"]
    assert headers["content-type"] == "application/json"


def test_a_raw_secret_is_used_as_utf8_bytes(receiver: Receiver, tmp_path: Path) -> None:
    sink = WebhookSink(receiver.url, state_dir=tmp_path, secret="plain secret", retry=FAST)
    sink.emit(alert())
    assert sink.wait_idle(10)
    sink.close()
    headers, body = receiver.requests[0]
    assert verify_signature("plain secret", headers, body)
    assert not verify_signature(SECRET, headers, body)


SENDER = textwrap.dedent("""
    import sys, time
    from agent.respond import Alert, RetryPolicy, WebhookSink
    url, state_dir, secret, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sink = WebhookSink(url, state_dir=state_dir, secret=secret, retry=RetryPolicy(0.02, 0.2))
    for i in range(count):
        sink.emit(Alert.new("Outage rule", "Error", f"alert {i}", {"test.seq": i}))
    print("spooled", flush=True)
    if count == 0:
        print("idle" if sink.wait_idle(60) else "timeout", flush=True)
        sink.close()
    else:
        time.sleep(3600)
""")


def run_sender(url: str, state_dir: Path, count: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", SENDER, url, str(state_dir), SECRET, str(count)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )


def test_outage_then_kill_9_then_restart_delivers_all_in_order(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    first = run_sender(url, tmp_path, 100)  # nothing listens on the port: connection refused
    assert first.stdout is not None and first.stdout.readline().strip() == "spooled"
    time.sleep(0.3)  # let it fail a few deliveries while the endpoint is down
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert first.returncode == -signal.SIGKILL

    receiver = Receiver(port)
    try:
        second = run_sender(url, tmp_path, 0)
        out, _ = second.communicate(timeout=60)
        assert out.split() == ["spooled", "idle"]
    finally:
        receiver.close()
    seqs = [json.loads(body)["output_fields"]["test.seq"] for _, body in receiver.requests]
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert len(set(ids)) == 100
    first_seen = list(dict.fromkeys(seqs))  # at least once: a repeat may come, the order may not change
    assert first_seen == list(range(100))
    assert all(verify_signature(SECRET, h, b) for h, b in receiver.requests)


def test_delivery_resumes_after_the_endpoint_comes_back(tmp_path: Path) -> None:
    port = free_port()
    metrics = Metrics()
    sink = WebhookSink(f"http://127.0.0.1:{port}/", state_dir=tmp_path, retry=FAST, metrics=metrics)
    for i in range(5):
        sink.emit(alert(i))
    assert wait_until(lambda: metrics.value("sysgram_webhook_failures_total", reason="connect") >= 1)
    assert sink.spool.depth == 5  # a failed attempt delivered nothing, lost nothing
    receiver = Receiver(port)
    try:
        assert sink.wait_idle(20)
    finally:
        sink.close()
        receiver.close()
    assert [json.loads(b)["output_fields"]["test.seq"] for _, b in receiver.requests] == list(range(5))
    assert metrics.value("sysgram_webhook_deliveries_total") == 5
    assert metrics.value("sysgram_webhook_spool_depth") == 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_410_disables_the_endpoint_and_raises_an_internal_alert(tmp_path: Path) -> None:
    gone = Receiver(answer=lambda n, h: (410, b"gone"))
    metrics = Metrics()
    log_file = tmp_path / "alerts.jsonl"
    try:
        sink = WebhookSink(gone.url, state_dir=tmp_path / "state", retry=FAST, metrics=metrics)
        fanout = Fanout([sink, JsonlSink(log_file)], metrics)
        fanout.emit(alert(1))
        fanout.emit(alert(2))
        assert wait_until(lambda: sink.disabled)
        # the internal alert is the last thing the 410 causes; after close() no thread can send any more
        assert wait_until(lambda: log_file.exists() and len(read_jsonl(log_file)) == 3)
        fanout.close()
        assert len(gone.requests) == 1  # nothing more is sent to a gone endpoint
        rules = [a["rule"] for a in read_jsonl(log_file)]
        assert rules == ["Test rule", "Test rule", "Sysgram webhook endpoint disabled"]
        assert "sysgram alerts spool " in read_jsonl(log_file)[-1]["output"]  # the command that exists
        assert metrics.value("sysgram_webhook_disabled") == 1
        # Both alerts stay spooled, and a restart on the same URL stays disabled.
        again = WebhookSink(gone.url, state_dir=tmp_path / "state", retry=FAST)
        assert again.disabled and again.spool.depth == 2
        again.close()
    finally:
        gone.close()


def test_spool_overflow_is_counted_and_reported(tmp_path: Path) -> None:
    metrics = Metrics()
    log_file = tmp_path / "alerts.jsonl"
    sink = WebhookSink(
        f"http://127.0.0.1:{free_port()}/", state_dir=tmp_path / "state", spool_max=5, retry=FAST,
        metrics=metrics, close_timeout=0.2,
    )
    fanout = Fanout([sink, JsonlSink(log_file)], metrics)
    for i in range(8):
        fanout.emit(alert(i))
    assert sink.spool.depth == 5
    assert sink.spool.overflowed == 3
    assert metrics.value("sysgram_webhook_spool_overflow_total") == 3
    internal = [a for a in read_jsonl(log_file) if a["rule"] == "Sysgram webhook spool overflow"]
    assert len(internal) == 1  # once per overflow episode, not per alert
    assert internal[0]["priority"] == "Critical"
    # The file got every alert even though the webhook could not take them all.
    assert sum(1 for a in read_jsonl(log_file) if a["rule"] == "Test rule") == 8
    fanout.close()


def test_retries_back_off_and_keep_the_same_webhook_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flaky = Receiver(answer=lambda n, h: (503, b"busy") if n < 3 else (200, b"ok"))
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="sysgram.respond")
    try:
        sink = WebhookSink(flaky.url, state_dir=tmp_path, retry=FAST, metrics=metrics)
        sink.emit(alert(7))
        assert sink.wait_idle(10)
        sink.close()
    finally:
        flaky.close()
    assert len(flaky.requests) == 4
    assert len({h["webhook-id"] for h, _ in flaky.requests}) == 1
    assert metrics.value("sysgram_webhook_failures_total", reason="http_5xx") == 3
    assert metrics.value("sysgram_webhook_deliveries_total") == 1
    # one line for the outage (three 503s), one when delivery resumes: not one per retry
    lines = [r.getMessage() for r in caplog.records if flaky.url in r.getMessage()]
    assert len(lines) == 2 and "answered 503" in lines[0] and "busy" in lines[0] and "delivering again" in lines[1]


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(base=0.5, cap=8.0)
    rng = random.Random(1)
    for attempt in range(1, 10):
        ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
        delays = [policy.delay(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert policy.delay(20, rng) <= 8.0


def test_a_rejecting_endpoint_dead_letters_and_the_next_alert_goes_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    poisoned: list[str] = []

    def answer(n: int, headers: dict[str, str]) -> tuple[int, bytes]:
        if not poisoned:
            poisoned.append(headers["webhook-id"])
        return (400, b"<html>garbage\nmore</html>") if headers["webhook-id"] == poisoned[0] else (200, b"")

    picky = Receiver(answer=answer)
    metrics = Metrics()
    caplog.set_level(logging.WARNING, logger="sysgram.respond")
    try:
        sink = WebhookSink(picky.url, state_dir=tmp_path, retry=FAST, max_attempts=3, metrics=metrics)
        sink.emit(alert(1))
        sink.emit(alert(2))
        assert sink.wait_idle(10)
        dead = sink.spool.dead_letters()
        sink.close()
    finally:
        picky.close()
    ids = [h["webhook-id"] for h, _ in picky.requests]
    assert ids.count(poisoned[0]) == 3
    assert len(ids) == 4
    assert [d.webhook_id for d in dead] == [poisoned[0]]
    assert metrics.value("sysgram_webhook_dead_letters_total") == 1
    lines = [r.getMessage() for r in caplog.records if "answered 400" in r.getMessage()]
    assert lines and picky.url in lines[0] and "\n" not in lines[0]


def test_the_same_alert_is_spooled_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_rows=10)
    assert spool.put("id-1", b"{}") and spool.put("id-1", b"{}")
    assert spool.depth == 1
    spool.close()


def test_a_spool_in_use_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(DeliveryError, match="in use"):
        Spool(tmp_path)
    spool.close()

"""Alert outputs against misbehaving peers and hosts (session 12's review): an endpoint that floods or
trickles its answer, a spool whose disk fails, an alert id no header can carry, shutdown order, an alert
file deleted, moved or on a full disk, and a listener fed bad lengths or broken connections. Real servers on
127.0.0.1, real files, a real tmpfs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DeliveryError
from agent.respond import Fanout, JsonlSink, Metrics, OutputConfig, WebhookSink, build_outputs
from agent.respond._webhook import header_safe_id, without_credentials
from tests.test_respond_webhook import FAST, SECRET, Receiver, alert, verify_signature, wait_until
from tests.test_respond_webhook import receiver as receiver


@contextlib.contextmanager
def endpoint(answer: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """A webhook endpoint on 127.0.0.1 (yields its URL): each POST's body is read, then ``answer`` replies."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            answer(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


class EndlessAnswer:
    """An endpoint that answers ``status`` and then sends its body forever: ``chunk`` every ``every`` s."""

    def __init__(self, status: int, chunk: bytes, every: float) -> None:
        self.requests = 0
        self.status, self.chunk, self.every = status, chunk, every
        self._served = contextlib.ExitStack()
        self.url = self._served.enter_context(endpoint(self._answer))

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        handler.send_response(self.status)
        handler.send_header("content-length", str(1 << 40))
        handler.end_headers()
        with contextlib.suppress(OSError):  # the client hung up: what this test wants
            for _ in range(100_000):
                handler.wfile.write(self.chunk)
                handler.wfile.flush()
                time.sleep(self.every)

    def close(self) -> None:
        self._served.close()


@pytest.mark.parametrize(
    ("status", "chunk", "every"),
    [(500, b"x" * 65536, 0.0), (500, b"x", 0.1), (503, b"\x00\x1b[31m", 0.05)],
    ids=["flood", "trickle", "trickle-controls"],
)
def test_an_answer_that_never_ends_neither_holds_the_sender_nor_fills_memory(
    tmp_path: Path, status: int, chunk: bytes, every: float
) -> None:
    endpoint = EndlessAnswer(status, chunk, every)
    sink = WebhookSink(endpoint.url, state_dir=tmp_path, timeout=0.5, retry=FAST, close_timeout=1.0)
    try:
        sink.emit(alert(1))
        # each attempt gives up on the answer after at most twice the timeout: the sender tries again
        assert wait_until(lambda: endpoint.requests >= 3, 15), endpoint.requests
        assert sink.spool.depth == 1  # still spooled: a 5xx is a transient failure
    finally:
        started = time.monotonic()
        sink.close()
        endpoint.close()
    assert time.monotonic() - started < 5


def test_a_2xx_answer_is_delivered_once_however_long_its_body(tmp_path: Path) -> None:
    endpoint = EndlessAnswer(200, b"y", 0.1)
    sink = WebhookSink(endpoint.url, state_dir=tmp_path, timeout=0.5, retry=FAST)
    try:
        sink.emit(alert(1))
        assert sink.wait_idle(5)
        assert endpoint.requests == 1 and sink.spool.depth == 0
    finally:
        sink.close()
        endpoint.close()


def test_a_failing_spool_does_not_stop_delivery_for_good(receiver: Receiver, tmp_path: Path) -> None:
    """The spool's disk was full when an alert was delivered: the sender waits and goes on."""
    sink = WebhookSink(receiver.url, state_dir=tmp_path, retry=FAST)
    real_delete = sink.spool.delete
    failed: list[int] = []

    def delete_failing_once(seq: int) -> None:
        if not failed:
            failed.append(seq)
            raise sqlite3.OperationalError("database or disk is full")
        real_delete(seq)

    sink.spool.delete = delete_failing_once  # type: ignore[method-assign]
    try:
        sink.emit(alert(1))
        sink.emit(alert(2))
        assert wait_until(lambda: sink.spool.depth == 0, 10)
        assert failed and sink._thread.is_alive()
    finally:
        sink.close()
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    # the first alert went out twice (its delete failed; the id lets the SOC drop the copy), then the second
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("bad_id", ["a\nb", "é-ünïcode", "x" * 300, ""])
def test_an_alert_id_no_header_can_carry_is_sent_under_a_digest(
    receiver: Receiver, tmp_path: Path, bad_id: str
) -> None:
    """An ingested alert chooses its own uuid: one with a newline or non-ASCII would fail every attempt and
    hold up every alert behind it."""
    sink = WebhookSink(receiver.url, state_dir=tmp_path, secret=SECRET, retry=FAST)
    ordinary = alert(2)
    try:
        sink.emit(dataclasses.replace(alert(1), uuid=bad_id))
        sink.emit(ordinary)
        assert sink.wait_idle(10)
    finally:
        sink.close()
    (first, body), (second, _) = receiver.requests
    assert first["webhook-id"] == header_safe_id(bad_id) != bad_id
    assert first["webhook-id"].startswith("sha256-") and verify_signature(SECRET, first, body)
    assert second["webhook-id"] == ordinary.uuid  # the one behind it went out too
    assert header_safe_id("3f1c9a4e-uuid-like") == "3f1c9a4e-uuid-like"  # ordinary ids are kept


def test_what_the_webhook_reports_while_closing_still_reaches_the_file(tmp_path: Path) -> None:
    """Closing, the webhook drains its spool; an endpoint that answers 410 then makes it raise an internal
    alert, which must land in the alert file, so the file closes after the webhook."""
    def slow_gone(n: int, headers: dict[str, str]) -> tuple[int, bytes]:
        time.sleep(0.3)  # the answer comes after close() has begun
        return 410, b"gone"

    gone = Receiver(answer=slow_gone)
    jsonl = tmp_path / "alerts.jsonl"
    fanout = Fanout([JsonlSink(jsonl), WebhookSink(gone.url, state_dir=tmp_path, retry=FAST)])
    fanout.emit(alert(1))
    try:
        fanout.close()
    finally:
        gone.close()
    rules = [json.loads(line)["rule"] for line in jsonl.read_text().splitlines()]
    assert rules[0] == "Test rule" and any("webhook" in r.lower() for r in rules[1:]), rules


def test_a_falco_alert_being_handled_at_shutdown_is_written_before_the_file_closes(tmp_path: Path) -> None:
    jsonl = tmp_path / "alerts.jsonl"
    holder: dict[str, Any] = {}

    def slow_pipeline(falco_alert: Any) -> None:  # correlation takes a moment
        time.sleep(0.5)
        holder["outputs"].sink.emit(falco_alert.to_alert())

    config = OutputConfig.from_mapping({"console": False, "jsonl": str(jsonl), "fold_window": 0,
                                        "listen": {"port": 0}}, source="test")
    outputs = build_outputs(config, state_dir=tmp_path, on_falco_alert=slow_pipeline)
    holder["outputs"] = outputs
    body = json.dumps({"rule": "Falco rule", "priority": "Warning", "output": "o",
                       "time": "2026-01-01T00:00:00Z"}).encode()
    answer: dict[str, Any] = {}

    def post() -> None:
        assert outputs.server is not None
        with urllib.request.urlopen(urllib.request.Request(outputs.server.url + "/", body), timeout=10) as r:
            answer["status"] = r.status

    poster = threading.Thread(target=post)
    poster.start()
    time.sleep(0.2)  # the alert is inside the pipeline's callback
    outputs.close()  # SIGTERM
    poster.join(10)
    assert answer.get("status") == 200
    assert [json.loads(line)["rule"] for line in jsonl.read_text().splitlines()] == ["Falco rule"]


def test_the_alert_file_follows_its_path_when_deleted_or_moved(tmp_path: Path) -> None:
    """A log shipper follows the path: after a delete, or a rotation by rename from outside, alerts go to a
    new file there, not to an inode nobody reads."""
    path = tmp_path / "alerts.jsonl"
    sink = JsonlSink(path)
    try:
        sink.emit(alert(1))
        path.unlink()
        sink.emit(alert(2))
        assert [json.loads(x)["output_fields"]["test.seq"] for x in path.read_text().splitlines()] == [2]
        path.rename(tmp_path / "alerts.jsonl.old")
        sink.emit(alert(3))
        assert [json.loads(x)["output_fields"]["test.seq"] for x in path.read_text().splitlines()] == [3]
        old = (tmp_path / "alerts.jsonl.old").read_text().splitlines()
        assert [json.loads(x)["output_fields"]["test.seq"] for x in old] == [2]
    finally:
        sink.close()


@contextlib.contextmanager
def small_tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tiny", "size=16k") as mount:
        yield mount


def test_a_failed_reopen_costs_one_alert_not_the_file_for_good(tmp_path: Path) -> None:
    """The path was rotated away and no new file could be made (no inodes left): that alert fails, and the
    next one, once there is room, goes to a new file at the path."""
    with small_tmpfs(tmp_path / "inodes", "size=1m,nr_inodes=4") as mount:
        path = mount / "alerts.jsonl"
        sink = JsonlSink(path)
        try:
            sink.emit(alert(1))
            path.rename(mount / "alerts.jsonl.1")
            fillers = []
            with contextlib.suppress(OSError):
                for i in range(10):  # use up the inodes
                    (mount / f"filler{i}").touch()
                    fillers.append(mount / f"filler{i}")
            with pytest.raises(DeliveryError):
                sink.emit(alert(2))
            for f in fillers:
                f.unlink()
            sink.emit(alert(3))
        finally:
            sink.close()
        assert [json.loads(x)["output_fields"]["test.seq"] for x in path.read_text().splitlines()] == [3]
        with pytest.raises(DeliveryError):  # closed by close(): that one is final
            sink.emit(alert(4))


def test_on_a_full_disk_each_failed_alert_is_the_one_missing(tiny_tmpfs: Path) -> None:
    """Every emit that raised is absent from the file and every one that returned is in it, whole: no
    buffered alert written later, no half line."""
    sink = JsonlSink(tiny_tmpfs / "alerts.jsonl")
    kept: list[int] = []
    failed: list[int] = []
    for i in range(400):
        try:
            sink.emit(alert(i, rule="R" * (i % 7 * 40)))  # alerts of different sizes: some fit in the last gap
            kept.append(i)
        except Exception:
            failed.append(i)
    sink.close()
    lines = (tiny_tmpfs / "alerts.jsonl").read_text().splitlines()
    assert failed and kept
    assert [json.loads(x)["output_fields"]["test.seq"] for x in lines] == kept


def _raw_request(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        return s.recv(4096)


def test_the_listener_answers_bad_lengths_and_broken_connections_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = OutputConfig.from_mapping({"console": False, "listen": {"port": 0}}, source="test")
    outputs = build_outputs(config, state_dir=tmp_path, metrics=Metrics(), on_falco_alert=lambda a: None)
    assert outputs.server is not None
    url = outputs.server.url
    try:
        if True:
            # a superscript two is a digit to str.isdigit but not to int()
            answer = _raw_request(url, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 411")
            for _ in range(3):  # a client that resets its connection mid-request
                s = socket.create_connection(outputs.server.address, timeout=5)
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            time.sleep(0.5)
    finally:
        outputs.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err


def test_webhook_credentials_stay_out_of_logs_and_alerts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert without_credentials("https://soc:hunter2@siem.example:8443/hook?x=1") == "https://***@siem.example:8443/hook?x=1"
    assert without_credentials("http://siem.example/hook") == "http://siem.example/hook"
    gone = Receiver(answer=lambda n, h: (410, b"gone"))
    url = gone.url.replace("http://", "http://soc:hunter2@")
    jsonl = tmp_path / "alerts.jsonl"
    webhook = WebhookSink(url, state_dir=tmp_path, retry=FAST)
    fanout = Fanout([JsonlSink(jsonl), webhook])
    caplog.set_level("DEBUG", logger="sysgram")
    try:
        fanout.emit(alert(1))
        assert wait_until(lambda: webhook.disabled, 10)
    finally:
        fanout.close()
        gone.close()
    assert gone.requests  # it did reach the endpoint, credentials and all
    text = jsonl.read_text()
    assert "410" in text and "hunter2" not in text
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sysgram"))
    assert "410" in ours and "***@127.0.0.1" in ours and "hunter2" not in ours


def test_the_listener_serves_a_bounded_number_of_connections_at_once(tmp_path: Path) -> None:
    """Idle connections each hold a server thread: past the bound a new one is closed at once and counted,
    and once the idle ones go, the listener answers again."""
    from agent.respond._ingest import MAX_CONNECTIONS

    metrics = Metrics()
    config = OutputConfig.from_mapping({"console": False, "listen": {"port": 0}}, source="test")
    outputs = build_outputs(config, state_dir=tmp_path, metrics=metrics, on_falco_alert=lambda a: None)
    assert outputs.server is not None
    address = outputs.server.address
    idle = [socket.create_connection(address, timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # every idle one has its thread
        extra = socket.create_connection(address, timeout=5)
        extra.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert extra.recv(100) == b""  # closed unanswered
        extra.close()
        assert b'reason="too_many_connections"} 1.0' in metrics.render()
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    try:
        assert _raw_request(outputs.server.url, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        outputs.close()


def test_a_refused_request_leaves_nothing_on_its_connection(tmp_path: Path) -> None:
    """A 401 is answered before the body is read: the connection closes, so a body shaped like a request is
    never taken for the next one."""
    config = OutputConfig.from_mapping({"console": False, "listen": {"port": 0, "token": "right"}}, source="test")
    outputs = build_outputs(config, state_dir=tmp_path, metrics=Metrics(), on_falco_alert=lambda a: None)
    assert outputs.server is not None
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer right\r\n\r\n"
    try:
        with socket.create_connection(outputs.server.address, timeout=5) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
    finally:
        outputs.close()
    assert answer.startswith(b"HTTP/1.1 401") and answer.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize(("status", "body"), [(200, b"{}"), (200, b""), (204, b"")])
def test_deliveries_keep_one_connection_alive(tmp_path: Path, status: int, body: bytes) -> None:
    """Reading each answer to its end hands the connection back: ten alerts, one TCP connection (over TLS,
    a handshake per alert otherwise)."""
    ports: set[int] = set()

    def answer(handler: BaseHTTPRequestHandler) -> None:
        ports.add(handler.client_address[1])
        handler.send_response(status)
        if status != 204:
            handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with endpoint(answer) as url:
        sink = WebhookSink(url, state_dir=tmp_path, retry=FAST)
        try:
            for i in range(10):
                sink.emit(alert(i))
            assert sink.wait_idle(10) and sink.spool.depth == 0
        finally:
            sink.close()
    assert len(ports) == 1


def test_a_failure_inside_the_listener_is_one_error_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    """Not a routine reset: a health callback that raises is shown, in one line, and the client is cut off."""
    metrics = Metrics()
    config = OutputConfig.from_mapping({"console": False, "listen": {"port": 0}}, source="test")
    outputs = build_outputs(config, state_dir=tmp_path, metrics=metrics, on_falco_alert=lambda a: None)
    assert outputs.server is not None

    def broken() -> str:
        raise KeyError("stage")

    metrics.health = broken
    try:
        with caplog.at_level("INFO", logger="sysgram"):
            answer = _raw_request(outputs.server.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
    finally:
        outputs.close()
    assert answer == b""
    errors = [r for r in caplog.records if r.name.startswith("sysgram") and r.levelname == "ERROR"]
    assert len(errors) == 1 and "KeyError" in errors[0].getMessage()
    assert "Traceback" not in capfd.readouterr().err


def test_a_request_that_trickles_is_cut_at_its_deadline(tmp_path: Path) -> None:
    """The socket timeout restarts with every byte: without a deadline a client sending a byte now and then
    would hold a connection slot for ever (MAX_CONNECTIONS of them take the listener down)."""
    metrics = Metrics()
    config = OutputConfig.from_mapping({"console": False, "listen": {"port": 0}}, source="test")
    outputs = build_outputs(config, state_dir=tmp_path, metrics=metrics, on_falco_alert=lambda a: None)
    assert outputs.server is not None
    outputs.server.request_deadline = 1.0
    cut_after = None
    try:
        with socket.create_connection(outputs.server.address, timeout=5) as s:
            started = time.monotonic()
            for byte in b"POST / HTTP/1.1\r\nHost: x\r\n" * 10:  # one byte every 0.2 s: ~54 s in all
                try:
                    s.sendall(bytes([byte]))
                    closed = _readable(s) and s.recv(1) == b""
                except OSError:  # reset
                    closed = True
                if closed:
                    cut_after = time.monotonic() - started
                    break
                time.sleep(0.2)
    finally:
        outputs.close()
    assert cut_after is not None and cut_after < 4.0
    assert b'reason="request_deadline"} 1.0' in metrics.render()


def _readable(s: socket.socket) -> bool:
    import select

    return bool(select.select([s], [], [], 0)[0])


def test_a_spool_whose_tables_have_other_columns_is_one_error(tmp_path: Path) -> None:
    """CREATE TABLE IF NOT EXISTS kept a same-named table with other columns: the first alert crashed."""
    from agent.respond import Spool
    from agent.respond._spool import SPOOL_NAME

    with contextlib.closing(sqlite3.connect(tmp_path / SPOOL_NAME)) as db:
        db.execute("CREATE TABLE meta (k TEXT, v TEXT)")
        db.commit()
    with pytest.raises(DeliveryError) as info:
        Spool(tmp_path)
    assert "the webhook spool is unreadable: table meta lacks column(s) key, value" in str(info.value)


def test_a_status_line_with_control_characters_is_logged_escaped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(400, "Bad\x1b[31m")
        handler.send_header("content-length", "0")
        handler.end_headers()

    caplog.set_level("WARNING", logger="sysgram")
    with endpoint(answer) as url:
        sink = WebhookSink(url, state_dir=tmp_path, retry=FAST, max_attempts=1)
        try:
            sink.emit(alert(1))
            assert wait_until(lambda: any("answered 400" in r.getMessage() for r in caplog.records), 10)
        finally:
            sink.close()
    said = [r.getMessage() for r in caplog.records if "answered 400" in r.getMessage()]  # not a port 400xx
    assert said and all("\x1b" not in m and "Bad\\x1b[31m" in m for m in said)

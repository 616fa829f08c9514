"""Falco alerts coming in: an HTTP endpoint for Falco's http_output (and Falcosidekick-style posts),
a tail of Falco's file_output, and the /metrics page on the same server.

Falco's gRPC output (and so the PyPI ``falco`` client) is gone since Falco 0.44; JSON over HTTP or a file
is what Falco offers, so that is what is read here.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.errors import ConfigError, DeliveryError
from agent.respond._alert import Alert, Priority, format_time, parse_priority, parse_time
from agent.respond._config import ListenConfig, address_is_plausible, is_loopback
from agent.respond._metrics import METRICS_CONTENT_TYPE, Metrics

log = logging.getLogger("sysgram.respond")

MAX_BODY = 1024 * 1024
MAX_CONNECTIONS = 64  # connections served at once (a thread each); more are closed at once
REQUEST_DEADLINE = 30.0  # seconds a request may take, waiting for it included, however its bytes trickle
CLIENT_TIMEOUT = 10.0  # seconds a client may stall mid-request before its connection (and thread) is dropped


def _local_names() -> frozenset[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower() for n in names if n)


@dataclass(frozen=True, slots=True)
class FalcoAlert:
    """One alert Falco raised, as Falco's JSON output carries it. ``time`` keeps nine fractional digits."""

    rule: str
    priority: Priority
    time: str
    output: str
    output_fields: Mapping[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    hostname: str = ""
    source: str = "syscall"
    uuid: str = ""  # Falcosidekick adds one; Falco itself does not

    @property
    def is_local(self) -> bool:
        """Whether Falco ran on this host (an empty hostname cannot say otherwise). A pid in another host's
        alert names some unrelated process here: such alerts are never correlated or blocked by pid."""
        if not self.hostname:
            return True
        name = self.hostname.lower()
        local = _local_names()
        return name in local or name.split(".", 1)[0] in {n.split(".", 1)[0] for n in local}

    @property
    def time_ns(self) -> int:
        ns = parse_time(self.time)
        return 0 if ns is None else ns

    def to_alert(self) -> Alert:
        """The same alert in Sysgram's outgoing shape (a fresh uuid when Falco gave none)."""
        fresh = Alert.new(self.rule, self.priority, self.output, self.output_fields, source=self.source,
                          tags=self.tags, time_ns=self.time_ns, hostname=self.hostname or None)
        return fresh if not self.uuid else Alert(
            self.uuid, fresh.time, fresh.rule, fresh.priority, fresh.output, fresh.output_fields,
            fresh.source, fresh.tags, fresh.hostname,
        )


class FalcoPayloadError(ValueError):
    """A payload that is not a Falco alert; the message is one line saying why."""


FalcoAlertCallback = Callable[[FalcoAlert], None]


def parse_falco_alert(data: Any) -> FalcoAlert:
    """A :class:`FalcoAlert` from Falco's decoded JSON object; :class:`FalcoPayloadError` if it is not one."""
    if not isinstance(data, Mapping):
        raise FalcoPayloadError(f"expected a JSON object, got {type(data).__name__}")
    for key in ("rule", "priority", "output"):
        if not isinstance(data.get(key), str):
            raise FalcoPayloadError(f"'{key}' is missing or not a string")
    priority = parse_priority(data["priority"])
    if priority is None:
        raise FalcoPayloadError(f"unknown priority {data['priority']!r}")
    raw_time = data.get("time")
    if not isinstance(raw_time, str):
        raise FalcoPayloadError("'time' is missing or not a string")
    ns = parse_time(raw_time)
    if ns is None:
        raise FalcoPayloadError(f"'time' is not an ISO-8601 time: {raw_time[:40]!r}")
    fields = data.get("output_fields", {})
    if fields is None:
        fields = {}
    if not isinstance(fields, Mapping):
        raise FalcoPayloadError("'output_fields' is not an object")
    tags = data.get("tags", [])
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise FalcoPayloadError("'tags' is not a list of strings")
    texts = {}
    for key, default in (("hostname", ""), ("source", "syscall"), ("uuid", "")):
        value = data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise FalcoPayloadError(f"'{key}' is not a string")
        texts[key] = value or default
    return FalcoAlert(
        rule=data["rule"], priority=priority, time=format_time(ns), output=data["output"],
        output_fields=dict(fields), tags=tuple(tags), hostname=texts["hostname"], source=texts["source"],
        uuid=texts["uuid"],
    )


def parse_falco_json(text: str | bytes) -> FalcoAlert:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FalcoPayloadError(f"not JSON: {err}") from None
    except RecursionError:  # a hostile or broken sender: this payload only, never the next one
        raise FalcoPayloadError("JSON nested too deeply") from None
    return parse_falco_alert(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops a burst's SYNs: each costs the client a 1 s+ retransmit
    ingest: IngestServer

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, at most MAX_CONNECTIONS of them: past that a new connection is closed at
        once (Falco retries), so a flood of idle or stalling clients cannot take a thread each without end."""
        if not self._slots.acquire(blocking=False):
            self.ingest.metrics.falco_error("too_many_connections")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, not socketserver's traceback: a client that resets or breaks its connection is routine,
        and anyone who can reach the port (even /ping, which needs no token) could flood the log with them."""
        err = sys.exc_info()[1]
        client = client_address[0] if client_address else "?"
        text = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, (ConnectionError, TimeoutError)):
            log.info("ingest %s: connection ended: %s", client, text)  # routine: not shown by default
        else:  # a bug in handling a request: one line, shown
            log.error("ingest %s: handling a request failed: %s: %s", client, type(err).__name__, text)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "sysgram"
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT  # socket timeout: a stalled client cannot hold its thread forever
    disable_nagle_algorithm = True  # headers and body are separate writes

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ingest %s: " + format, self.client_address[0], *args)

    def handle_one_request(self) -> None:
        # The socket timeout restarts with every byte: a client trickling one byte at a time would hold its
        # thread (and one of the MAX_CONNECTIONS) for ever. The watchdog cuts a request past its deadline.
        self.server.ingest.watch(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.ingest.unwatch(self.connection)

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        if status == 401:
            self.send_header("www-authenticate", 'Bearer realm="sysgram"')
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        token = self.server.ingest.token
        if token is None:
            return True
        given = self.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
        if not ok:
            self.server.ingest.metrics.falco_error("unauthorized")
            self.close_connection = True  # its body is unread: left on the connection it would pass for a request
            self._reply(401, b"missing or wrong bearer token\n")
        return ok

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        # liveness answers need no token (a kubelet's probe sends none; they tell nothing but up or not)
        if path not in ("/healthz", "/ping") and not self._authorized():
            return
        if path == "/metrics":
            self._reply(200, self.server.ingest.metrics.render(), METRICS_CONTENT_TYPE)
        elif path == "/healthz":  # the agent's health: 503 while it starts or when a stage has stalled
            health = self.server.ingest.metrics.health
            problem = health() if health is not None else None
            if problem:
                self._reply(503, f"{problem}\n".encode())
            else:
                self._reply(200, b"ok\n")
        elif path == "/ping":  # the server alone answers
            self._reply(200, b"ok\n")
        else:
            self._reply(404, b"not found; POST Falco alerts to /, GET /metrics\n")

    def do_POST(self) -> None:
        ingest = self.server.ingest
        if not self._authorized():
            return
        length_header = self.headers.get("content-length")
        if length_header is None or not (length_header.isascii() and length_header.isdigit()):
            ingest.metrics.falco_error("no_length")
            self.close_connection = True
            self._reply(411, b"a Content-Length is required\n")
            return
        length = int(length_header)
        if length > MAX_BODY:
            ingest.metrics.falco_error("too_large")
            self.close_connection = True
            self._reply(413, f"a Falco alert is at most {MAX_BODY} bytes\n".encode())
            return
        body = self.rfile.read(length)
        try:
            alert = parse_falco_json(body)
        except FalcoPayloadError as err:
            ingest.metrics.falco_error("malformed")
            reason = " ".join(str(err).split())
            log.warning("ingest: refused a payload from %s: %s", self.client_address[0], reason)
            self._reply(400, f"{reason}\n".encode())
            return
        if not ingest.enter():  # the agent is stopping: its sinks may be closed; Falco keeps it and retries
            self.close_connection = True
            self._reply(503, b"the agent is stopping; retry\n")
            return
        try:
            ingest.callback(alert)
        except Exception as err:  # the pipeline's trouble: tell the sender to retry later
            ingest.metrics.falco_error("callback")
            log.error("ingest: handling Falco alert %r failed: %s", alert.rule, err)
            self._reply(500, b"the alert could not be handled\n")
        else:
            ingest.metrics.falco_ingested("http")
            self._reply(200, b"{}", "application/json")
        finally:
            ingest.leave()


class IngestServer:
    """An HTTP server for Falco alerts (POST any path) and Prometheus metrics (GET /metrics).

    Bound to loopback unless told otherwise; on any other address a bearer token is required (refused at
    construction without one) and checked on every request.
    """

    def __init__(
        self, callback: FalcoAlertCallback, metrics: Metrics, *, address: str = "127.0.0.1", port: int = 8765,
        token: str | None = None,
    ) -> None:
        if not address_is_plausible(address):  # checked first: a typo is not a reason to ask for a token
            raise ConfigError(f"listen: {address!r} is not an IP address or a host name")
        if token is None and not is_loopback(address):
            raise ConfigError(f"listen: a bearer token is required to listen on {address} (not loopback)")
        if token is not None and not token:
            raise ConfigError("listen: the bearer token must not be empty")
        if not 0 <= port <= 65535:  # 0: any free port
            raise ConfigError(f"listen: port {port} is out of range (1-65535)")
        self.callback = callback
        self.metrics = metrics
        self.token = token
        try:
            server_class = _Server6 if ":" in address else _Server  # an IPv6 literal such as ::1
            self._server = server_class((address, port), _Handler)
        except OSError as err:
            raise ConfigError(f"listen: cannot listen on {address}:{port}: {err.strerror}") from None
        self._server.ingest = self
        self._thread: threading.Thread | None = None
        self._gate = threading.Condition()  # alerts being handled, and whether new ones may start
        self._inflight = 0
        self._closing = False
        self._watched: dict[socket.socket, float] = {}  # connection -> its current request's deadline
        self._watch_lock = threading.Lock()
        self._stop_watch = threading.Event()
        self.request_deadline = REQUEST_DEADLINE

    def watch(self, connection: socket.socket) -> None:
        with self._watch_lock:
            self._watched[connection] = time.monotonic() + self.request_deadline

    def unwatch(self, connection: socket.socket) -> None:
        with self._watch_lock:
            self._watched.pop(connection, None)

    def _watchdog(self) -> None:
        while not self._stop_watch.wait(min(1.0, self.request_deadline / 4)):
            now = time.monotonic()
            with self._watch_lock:
                late = [c for c, deadline in self._watched.items() if deadline < now]
                for connection in late:  # cut once, counted once
                    del self._watched[connection]
            for connection in late:
                self.metrics.falco_error("request_deadline")
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # its handler's read fails: the thread ends

    def enter(self) -> bool:
        """A request starts handling an alert; False once closing (its sinks may be closed by then)."""
        with self._gate:
            if self._closing:
                return False
            self._inflight += 1
            return True

    def leave(self) -> None:
        with self._gate:
            self._inflight -= 1
            self._gate.notify_all()

    @classmethod
    def from_config(
        cls, config: ListenConfig, callback: FalcoAlertCallback, metrics: Metrics
    ) -> IngestServer:
        return cls(callback, metrics, address=config.address, port=config.port, token=config.token)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> IngestServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="sysgram-ingest",
            daemon=True,
        )
        self._thread.start()
        threading.Thread(target=self._watchdog, name="sysgram-ingest-watchdog", daemon=True).start()
        return self

    def close(self, wait: float = 5.0) -> None:
        """Stop taking alerts; wait (at most ``wait`` s) for those being handled, so none is answered 200
        after the sinks it went to were closed."""
        with self._gate:
            self._closing = True
        self._stop_watch.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        with self._gate:
            self._gate.wait_for(lambda: self._inflight == 0, timeout=wait)
        self._server.server_close()


class FalcoFileTail:
    """Follows Falco's file_output (JSON lines): appends, truncation and rotation; partial lines wait.

    Starts at the end of the file (old alerts were handled before) unless ``from_start``; a file that does
    not exist yet is waited for. Rotation is noticed by the inode changing: the rest of the old file is
    read first, then the new one from its start.
    """

    def __init__(
        self, path: str | os.PathLike[str], callback: FalcoAlertCallback, metrics: Metrics, *,
        from_start: bool = False, poll_interval: float = 0.2,
    ) -> None:
        self.path = os.fspath(path)
        self.callback = callback
        self.metrics = metrics
        self.poll_interval = poll_interval
        self._from_start = from_start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: Any = None
        self._inode: tuple[int, int] | None = None
        self._partial = b""
        self._line_no = 0
        # A line whose alert the callback failed on, with its line number: handed on again first next poll
        # (nothing accepted is lost), before any line after it (order kept).
        self._retry: tuple[bytes, int] | None = None
        self._open(at_end=not from_start)

    def _open(self, *, at_end: bool) -> None:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - kept open while following
        except FileNotFoundError:
            return
        except OSError as err:
            raise DeliveryError(f"cannot read Falco's file output: {err.strerror}", path=self.path) from None
        st = os.fstat(handle.fileno())
        if at_end:
            handle.seek(0, os.SEEK_END)
        self._file, self._inode, self._partial, self._line_no = handle, (st.st_dev, st.st_ino), b"", 0

    def start(self) -> FalcoFileTail:
        self._thread = threading.Thread(target=self._run, name="sysgram-falco-tail", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as err:
                log.error("tail %s: %s", self.path, err)
            self._stop.wait(self.poll_interval)

    def poll(self) -> int:
        """Read what was appended (and follow a rotation); how many alerts were handed on."""
        handed = 0
        if self._file is None:
            self._open(at_end=False)  # a file that appears after start is new: read it whole
            if self._file is None:
                return 0
        handed += self._drain()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return handed  # rotated away and not yet recreated: keep the old one open
        if (st.st_dev, st.st_ino) != self._inode:
            handed += self._drain(final=True)
            if self._retry is not None:
                return handed  # the old file is read to its end only once its lines are handed on
            self._file.close()
            self._open(at_end=False)
            handed += self._drain()
        elif st.st_size < self._file.tell():  # truncated in place (copytruncate)
            self._file.seek(0)
            # Whole lines still waiting behind a failed one were read already: they are kept.
            waiting, newline, _ = self._partial.rpartition(b"\n")
            self._partial, self._line_no = waiting + newline, 0
            handed += self._drain()
        return handed

    def _drain(self, *, final: bool = False) -> int:
        handed = 0
        if self._retry is not None:
            line, line_no = self._retry
            self._retry = None
            handed += self._line(line, line_no)
            if self._retry is not None:
                return handed  # still failing: keep the rest waiting behind it
        while chunk := self._file.read(65536):
            self._partial += chunk
            *lines, self._partial = self._partial.split(b"\n")
            for i, line in enumerate(lines):
                self._line_no += 1
                handed += self._line(line, self._line_no)
                if self._retry is not None:
                    # The callback failed: the unread lines go back in front of the partial one, in order.
                    rest = lines[i + 1:]
                    self._partial = b"\n".join([*rest, self._partial]) if rest else self._partial
                    return handed
        if final and self._partial.strip():
            self._line_no += 1
            handed += self._line(self._partial, self._line_no)  # the old file will not grow any more
            self._partial = b""
        return handed

    def _line(self, line: bytes, line_no: int) -> int:
        if not line.strip():
            return 0
        try:
            alert = parse_falco_json(line)
        except FalcoPayloadError as err:
            self.metrics.falco_error("malformed")
            log.warning("%s:%d: not a Falco alert: %s", self.path, line_no, err)
            return 0
        try:
            self.callback(alert)
        except Exception as err:
            self.metrics.falco_error("callback")
            log.error("%s:%d: handling Falco alert %r failed (will retry): %s", self.path, line_no, alert.rule,
                      err)
            self._retry = (line, line_no)
            return 0
        self.metrics.falco_ingested("file")
        return 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._file is not None:
            self._file.close()
            self._file = None

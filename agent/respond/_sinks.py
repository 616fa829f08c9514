"""Alert sinks: the protocol, console, JSON lines, fan-out to several, and folding of repeats."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import IO, Any, Protocol, runtime_checkable

from rich.console import Console
from rich.text import Text

from agent._text import escape_controls
from agent.errors import DeliveryError
from agent.respond._alert import Alert, AlertFormat, Priority
from agent.respond._config import ConsoleFormat, Stream
from agent.respond._metrics import Metrics

log = logging.getLogger("sysgram.respond")

InternalAlertCallback = Callable[[Alert], None]


class AlertSink(Protocol):
    """Where alerts go. ``emit`` must not block for long; ``close`` waits a bounded time."""

    def emit(self, alert: Alert) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class RaisesInternalAlerts(Protocol):
    """A sink that reports its own trouble (a disabled endpoint, an overflow) as alerts to the others."""

    def bind_internal(self, callback: InternalAlertCallback) -> None: ...


_PRIORITY_STYLE: dict[Priority, str] = {
    "Emergency": "bold white on red",
    "Alert": "bold white on red",
    "Critical": "bold red",
    "Error": "red",
    "Warning": "yellow",
    "Notice": "cyan",
    "Informational": "green",
    "Debug": "dim",
}


_CONSOLE_FIELDS = ("sysgram.score", "sysgram.threshold", "sysgram.verdict", "sysgram.action", "sysgram.count")


class ConsoleSink:
    """Human-readable alerts, coloured by priority (plain text when the stream is not a terminal)."""

    def __init__(
        self, stream: Stream | IO[str] = "stderr", fmt: ConsoleFormat = "text", *, color: bool | None = None
    ) -> None:
        file: IO[str] = sys.stderr if stream == "stderr" else sys.stdout if stream == "stdout" else stream
        self._console = Console(
            file=file, highlight=False, soft_wrap=True, force_terminal=color, no_color=color is False
        )
        self._format = fmt
        self._lock = threading.Lock()

    def emit(self, alert: Alert) -> None:
        with self._lock:
            if self._format != "text":
                self._console.out(alert.to_json(self._format), highlight=False)
                return
            line = Text()
            line.append(alert.time[:23] + "Z ", style="dim")
            line.append(f"{alert.priority:<13}", style=_PRIORITY_STYLE[alert.priority])
            # escaped here too: an ingested Falco alert's text is whatever that Falco sent
            line.append(f" {escape_controls(alert.rule)}", style="bold")
            line.append(f": {escape_controls(alert.output)}")
            extras = [
                escape_controls(f"{key.removeprefix('sysgram.')}={value}")
                for key, value in alert.output_fields.items()
                if key in _CONSOLE_FIELDS
            ]
            if extras:
                line.append(f" ({' '.join(extras)})", style="dim")
            self._console.print(line)

    def flush(self) -> None:
        self._console.file.flush()

    def close(self) -> None:
        self.flush()


def _ends_with_newline(path: str, size: int) -> bool:
    """Whether the file's last byte is a newline; True when it cannot be read (a file we may append to but
    not read: better a glued line than no alerts at all)."""
    try:
        with open(path, "rb") as existing:
            existing.seek(size - 1)
            return existing.read(1) == b"\n"
    except OSError:
        return True


class JsonlSink:
    """One JSON object a line, appended and flushed per alert; rotated by size with N backups.

    Rotation is ``path`` -> ``path.1`` -> ... -> ``path.N`` (the oldest dropped), like logrotate.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = 100 * 1024 * 1024, backups: int = 5,
        fmt: AlertFormat = "falco", fsync: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._format = fmt
        self._fsync = fsync
        self._lock = threading.Lock()
        self._shut = False  # closed by close(): no more alerts (a file closed by a failed reopen is retried)
        self._file = self._open()

    def _open(self) -> IO[bytes]:
        try:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            # a file left ending mid-line (a crash, another writer) must not glue our first alert onto it
            size = os.fstat(fd).st_size
            if size and not _ends_with_newline(self.path, size):
                os.write(fd, b"\n")
        except OSError as err:
            raise DeliveryError(f"cannot open the alert file: {err.strerror}", path=self.path) from None
        return os.fdopen(fd, "ab", buffering=0)  # unbuffered: a failed write fails now, not at a later flush

    def _rotate(self) -> None:
        self._file.close()
        try:
            if self.backups == 0:
                os.truncate(self.path, 0)
            else:
                for n in range(self.backups - 1, 0, -1):
                    older = f"{self.path}.{n}"
                    if os.path.exists(older):
                        os.replace(older, f"{self.path}.{n + 1}")
                os.replace(self.path, f"{self.path}.1")
        finally:
            self._file = self._open()

    def _at_path(self) -> os.stat_result:
        """The open file's stat, reopening ``path`` first when it no longer names that file (deleted, or
        renamed by an outside rotation): a log shipper follows the path, so write where it looks."""
        if not self._file.closed:
            mine = os.fstat(self._file.fileno())
            with contextlib.suppress(OSError):
                on_disk = os.stat(self.path)
                if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                    return mine
        self._reopen()
        return os.fstat(self._file.fileno())

    def _reopen(self) -> None:
        """The file at ``path`` again. The old one stays open until the new one is: a failed open (no space,
        no inodes) costs this alert only, and the next one tries again."""
        new = self._open()
        if not self._file.closed:
            self._file.close()
        self._file = new

    def emit(self, alert: Alert) -> None:
        data = (alert.to_json(self._format) + "\n").encode()
        with self._lock:
            if self._shut:
                raise DeliveryError("the alert file is closed", path=self.path)
            try:
                size = self._at_path().st_size  # appends land at the end, wherever tell() is
                if size > 0 and size + len(data) > self.max_bytes:
                    self._rotate()
                    size = 0
                written = self._file.write(data) or 0
                if written != len(data):
                    self._cut_back(size, written)
                    raise OSError(28, f"short write ({written} of {len(data)} bytes)")
                if self._fsync:
                    os.fsync(self._file.fileno())
            except OSError as err:
                raise DeliveryError(f"cannot write an alert: {err.strerror or err}", path=self.path) from None

    def _cut_back(self, size: int, written: int) -> None:
        """Remove the start of a line a short write left at the end (no alert glued onto it), unless someone
        else has appended since: their lines are worth more than a clean end."""
        with contextlib.suppress(OSError):
            if os.fstat(self._file.fileno()).st_size == size + written:
                os.ftruncate(self._file.fileno(), size)

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._shut = True
            if not self._file.closed:
                self._file.close()


class Fanout:
    """Sends each alert to every sink; one failing sink neither stops the others nor the caller.

    Internal alerts a sink raises (see :class:`RaisesInternalAlerts`) go to every *other* sink, so a
    webhook that has stopped still gets reported on the console and in the file.
    """

    def __init__(self, sinks: Iterable[AlertSink], metrics: Metrics | None = None) -> None:
        self.sinks: tuple[AlertSink, ...] = tuple(sinks)
        self._metrics = metrics
        for sink in self.sinks:
            if isinstance(sink, RaisesInternalAlerts):
                sink.bind_internal(self._internal_from(sink))

    def _internal_from(self, origin: AlertSink) -> InternalAlertCallback:
        def forward(alert: Alert) -> None:
            self._send(alert, [s for s in self.sinks if s is not origin])

        return forward

    def _send(self, alert: Alert, sinks: Iterable[AlertSink]) -> None:
        if self._metrics is not None:
            self._metrics.alert(alert.rule, alert.priority)
        for sink in sinks:
            try:
                sink.emit(alert)
            except Exception as err:  # a sink's trouble must not lose the alert for the others
                log.error("alert sink %s failed: %s", type(sink).__name__, err)
                if self._metrics is not None:
                    self._metrics.sink_errors.labels(sink=type(sink).__name__).inc()

    def emit(self, alert: Alert) -> None:
        self._send(alert, self.sinks)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        # A sink that raises internal alerts (the webhook: dead letters, a 410 while it drains) closes first,
        # so what it reports meanwhile still reaches the file and the console.
        for sink in sorted(self.sinks, key=lambda s: not isinstance(s, RaisesInternalAlerts)):
            try:
                sink.close()
            except Exception as err:
                log.error("closing alert sink %s failed: %s", type(sink).__name__, err)


FOLD_KEYS = ("proc.pid", "proc.exepath", "proc.name")


def fold_key(alert: Alert) -> tuple[Any, ...]:
    """Alerts with equal keys are the same thing repeated: same rule, same process, same output."""
    fields: Mapping[str, Any] = alert.output_fields
    return (alert.rule, alert.priority, alert.source, alert.output, *(str(fields.get(k)) for k in FOLD_KEYS))


@dataclass
class _Fold:
    first_ns: int
    first_time: str
    repeats: int = 0
    last: Alert | None = None


class FoldingSink:
    """Folds identical repeats within ``window`` seconds into one alert carrying ``sysgram.count``.

    The first alert of a kind passes at once; repeats within the window are held and counted; when the
    window ends one alert (the last repeat, with ``sysgram.count`` = number of repeats folded into it and
    ``sysgram.first_time``) passes. Distinct alerts never fold. Internal alerts pass untouched.
    """

    def __init__(
        self, inner: AlertSink, window: float, metrics: Metrics | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.inner = inner
        self.window_ns = int(window * 1e9)
        self._metrics = metrics
        self._clock = clock
        self._open: dict[tuple[Any, ...], _Fold] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.window_ns > 0:
            self._thread = threading.Thread(target=self._run, name="sysgram-fold", daemon=True)
            self._thread.start()

    def emit(self, alert: Alert) -> None:
        if self.window_ns <= 0 or alert.is_internal:
            self.inner.emit(alert)
            return
        key = fold_key(alert)
        now = self._clock()
        with self._lock:
            fold = self._open.get(key)
            if fold is not None and now - fold.first_ns < self.window_ns:
                if fold.repeats == 0:
                    fold.first_time = alert.time
                fold.repeats += 1
                fold.last = alert
                if self._metrics is not None:
                    self._metrics.alerts_folded.inc()
                return
            ready = self._expire_locked(now, also=key)
            self._open[key] = _Fold(first_ns=now, first_time=alert.time)
        for folded in ready:
            self.inner.emit(folded)
        self.inner.emit(alert)

    def _expire_locked(self, now: int | None, also: tuple[Any, ...] | None = None) -> list[Alert]:
        ready: list[Alert] = []
        for key in list(self._open):
            fold = self._open[key]
            if now is None or key == also or now - fold.first_ns >= self.window_ns:
                del self._open[key]
                if fold.repeats and fold.last is not None:
                    fields = dict(fold.last.output_fields)
                    fields["sysgram.count"] = fold.repeats
                    fields["sysgram.first_time"] = fold.first_time
                    ready.append(replace(fold.last, output_fields=fields))
        return ready

    def poll(self) -> None:
        """Let out the folded alerts whose window has ended."""
        with self._lock:
            ready = self._expire_locked(self._clock())
        for alert in ready:
            self.inner.emit(alert)

    def _run(self) -> None:
        interval = max(self.window_ns / 4e9, 0.01)
        while not self._stop.wait(interval):
            try:
                self.poll()
            except Exception as err:
                log.error("folding alerts failed: %s", err)

    def flush(self) -> None:
        """Let out every held repeat now, then flush the inner sink."""
        with self._lock:
            ready = self._expire_locked(None)
        for alert in ready:
            self.inner.emit(alert)
        self.inner.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.flush()
        self.inner.close()

"""container.name / image / privileged from the container runtime (Docker Engine API, Podman's compat API).

The process table knows a container only by the id in its cgroup; the runtime knows the rest. A
:class:`RuntimeContainerLookup` is a ``ContainerLookup`` for the Falco engine: it answers from a bounded
cache and leaves the socket to a background thread, so the pipeline thread never waits on the runtime
longer than ``first_wait`` (once per new container), and not at all while the runtime is known dead.
See docs/process-table.md ("Container metadata from the runtime").
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.proc.info import HOST_CONTAINER_ID

if TYPE_CHECKING:
    from agent.falco._state import ContainerInfo


@dataclass(frozen=True, slots=True)
class RuntimeSocket:
    """One runtime API socket and the container.type its containers get."""

    path: str
    type: str = "docker"


DEFAULT_SOCKETS = (
    RuntimeSocket("/var/run/docker.sock", "docker"),
    RuntimeSocket("/run/podman/podman.sock", "podman"),
)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image reference cut as Falco cuts it: ``[host[:port]/]name[:tag][@digest]``."""

    repository: str
    tag: str | None
    digest: str | None


def split_image(image: str) -> ImageRef:
    """Falco's split (``sinsp_utils::split_container_image`` without splitting the repo): the repository
    keeps the registry host (``docker.io/library/nginx``); the tag is what follows the first ``:`` after
    the first ``/``; a missing tag or digest is None."""
    host, slash, rest = image.partition("/")
    prefix = host + "/" if slash else ""
    if not slash:
        rest = image
    rest, at, digest = rest.partition("@")
    name, colon, tag = rest.partition(":")
    return ImageRef(prefix + name, tag if colon and tag else None, digest if at and digest else None)


_ISO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_started_at(text: str) -> int | None:
    """Docker's ``State.StartedAt`` (RFC 3339, nanoseconds) as ns since the epoch; None for the zero time
    of a container never started, or anything unparsable."""
    match = _ISO.match(text)
    if match is None:
        return None
    whole, frac, zone = match.groups()
    try:
        stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return None
    if stamp.year <= 1:
        return None
    seconds = int(stamp.astimezone(UTC).timestamp())
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def short_id(container_id: str) -> str:
    """Falco's container.id: the first 12 hex digits."""
    return container_id[:12]


def _container_info(container_id: str, **facts: Any) -> ContainerInfo:
    # Imported here: agent.falco imports agent.proc, so agent.proc may not import it at load time.
    from agent.falco._state import ContainerInfo

    return ContainerInfo(short_id(container_id), **facts)


def parse_inspect(container_id: str, body: bytes, runtime_type: str) -> ContainerInfo | None:
    """A ``GET /containers/{id}/json`` answer as ContainerInfo; None when it is not the expected shape."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    config = doc.get("Config")
    host_config = doc.get("HostConfig")
    state = doc.get("State")
    name = _str(doc.get("Name"))
    image = _str(config.get("Image")) if isinstance(config, dict) else None
    image_id = _str(doc.get("Image"))
    privileged = host_config.get("Privileged") if isinstance(host_config, dict) else None
    started = _str(state.get("StartedAt")) if isinstance(state, dict) else None
    repository = tag = None
    if image and not _is_bare_id(image, image_id):
        ref = split_image(image)
        repository, tag = ref.repository, ref.tag
    return _container_info(
        container_id,
        name=name[1:] if name and name.startswith("/") else name,  # the API prefixes names with "/"
        image=image,
        repository=repository,
        tag=tag,
        image_id=image_id.partition(":")[2] or image_id if image_id else None,  # Falco drops "sha256:"
        privileged=privileged if isinstance(privileged, bool) else None,
        start_ts=parse_started_at(started) if started else None,
        type=runtime_type,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_bare_id(image: str, image_id: str | None) -> bool:
    # A container started from an image id has no repository or tag to show (Falco skips the split too).
    if image.startswith("sha256:"):
        return True
    bare = (image_id or "").partition(":")[2]
    return bool(bare) and len(image) >= 12 and bare.startswith(image)


_HEX_ID = re.compile(r"[0-9a-f]{12,64}")
_WARM: Any = object()  # the worker's cue to list the running containers


@dataclass(slots=True)
class _Entry:
    info: ContainerInfo
    expires: float  # monotonic time after which the runtime is asked again (inf: for good)
    done: threading.Event


class RuntimeContainerLookup:
    """A cached, non-blocking ContainerLookup over the runtimes' unix sockets.

    * a known container: answered from the cache (the runtime's facts never change for an id);
    * a new container id: queued for the background thread, and the caller waits up to ``first_wait``
      for it (a rule on the container's first exec then sees its facts); after that it gets
      ``ContainerInfo(id)`` with the other fields None until the answer lands;
    * not found on any runtime (404, malformed answer): id-only, asked again after ``negative_ttl``;
    * a socket that fails (refused, slower than ``timeout``) is not tried for ``retry_after`` seconds and
      new ids meanwhile do not wait; one warning line about it goes to ``warn``, once. An absent socket
      is treated alike, silently (no runtime on this host is normal).
    """

    def __init__(
        self,
        sockets: Sequence[RuntimeSocket] = DEFAULT_SOCKETS,
        *,
        timeout: float = 0.2,
        first_wait: float = 0.2,
        retry_after: float = 30.0,
        negative_ttl: float = 30.0,
        max_entries: int = 1024,
        warn: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sockets = tuple(sockets)
        self.timeout = timeout
        self.first_wait = first_wait
        self.retry_after = retry_after
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._warn = warn if warn is not None else _warn_stderr
        self._warned: set[str] = set()
        self._cache: dict[str, _Entry] = {}
        self._known: dict[
            str, ContainerInfo
        ] = {}  # the runtime's answers, kept for good (bounded with _cache)
        self._lock = threading.Lock()
        self._dead_until: dict[str, float] = {}  # socket path -> when to try it again
        self._clients: dict[str, Any] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # ids, _WARM, None (stop)
        self._thread: threading.Thread | None = None
        self.requests = 0  # HTTP requests made (for tests and stats)
        self.failures = 0  # socket failures (connect, timeout, protocol)

    # ------------------------------------------------------------------ the pipeline side
    def __call__(self, container_id: str) -> ContainerInfo | None:
        known = self._known.get(container_id)
        if known is not None:
            return known  # the hot path: one dict look-up
        if not container_id or container_id == HOST_CONTAINER_ID:
            return None
        entry = self._cache.get(container_id)
        if entry is not None and entry.expires > self.clock():
            return entry.info
        with self._lock:
            entry = self._cache.get(container_id)
            if entry is not None and (entry.expires > self.clock() or not entry.done.is_set()):
                return entry.info  # fresh, or already being asked
            entry = _Entry(_container_info(container_id), float("inf"), threading.Event())
            self._store(container_id, entry)
            self._start()
        alive = self._any_alive()
        self._queue.put(container_id)
        if alive and self.first_wait > 0:
            entry.done.wait(self.first_wait)
        current = self._cache.get(container_id)
        return current.info if current is not None else entry.info

    def resolve(self, container_id: str) -> ContainerInfo:
        """Ask the runtimes now (in the caller's thread) and cache the answer."""
        info, ttl = self._ask(container_id)
        with self._lock:
            old = self._cache.get(container_id)
            entry = _Entry(info, self.clock() + ttl, threading.Event())
            entry.done.set()
            self._store(container_id, entry)
            if ttl == float("inf"):
                self._known[container_id] = info
        if old is not None:
            old.done.set()
        return info

    def warm(self) -> None:
        """Ask the runtimes, in the background, about every container running now: at the agent's start
        the processes already in containers then find their facts cached instead of waiting."""
        with self._lock:
            self._start()
        self._queue.put(_WARM)

    def close(self) -> None:
        """Stop the background thread and close the connections."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=2.0)
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    @property
    def cached(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------ the worker side
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="sysgram-container-runtime", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            container_id = self._queue.get()
            if container_id is None:
                return
            if container_id is _WARM:
                try:
                    self._warm_now()
                except Exception as err:  # a warm-up is a nicety: its failure only costs waits later
                    self._warn_once("warm", f"container runtime listing failed: {err!r}")
                continue
            entry = self._cache.get(container_id)
            if entry is not None and entry.done.is_set() and entry.expires > self.clock():
                continue  # answered meanwhile (a duplicate in the queue)
            try:
                self.resolve(container_id)
            except Exception as err:  # the worker must outlive any surprise from a runtime
                self._warn_once("worker", f"container runtime lookup failed: {err!r}")
                self._remember_failure(container_id)

    def _remember_failure(self, container_id: str) -> None:
        # id-only until the negative cache expires, and waiters released: never "pending" for good.
        done = threading.Event()
        done.set()
        with self._lock:
            old = self._cache.get(container_id)
            self._store(
                container_id, _Entry(_container_info(container_id), self.clock() + self.negative_ttl, done)
            )
        if old is not None:
            old.done.set()

    def _warm_now(self) -> None:
        for sock in self.sockets:
            if self._dead_until.get(sock.path, 0.0) > self.clock():
                continue
            status, body = self._get(sock, "/containers/json")
            if status is None:
                self._dead_until[sock.path] = self.clock() + self.retry_after
                continue
            if status != 200:
                continue
            try:
                listed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                continue
            for item in listed if isinstance(listed, list) else ():
                cid = item.get("Id") if isinstance(item, dict) else None
                if isinstance(cid, str) and _HEX_ID.fullmatch(cid) and cid not in self._known:
                    self.resolve(cid)

    def _ask(self, container_id: str) -> tuple[ContainerInfo, float]:
        """The runtime's answer and how long to keep it."""
        id_only = _container_info(container_id)
        if not _HEX_ID.fullmatch(container_id):
            return id_only, float("inf")  # not a runtime id (a recording's oddity): never put in a URL
        retry = self.negative_ttl
        for sock in self.sockets:
            now = self.clock()
            if self._dead_until.get(sock.path, 0.0) > now:
                retry = min(retry, self._dead_until[sock.path] - now)
                continue
            status, body = self._get(sock, f"/containers/{container_id}/json")
            if status is None:
                self._dead_until[sock.path] = now + self.retry_after
                retry = min(retry, self.retry_after)
                continue
            if status == 200:
                info = parse_inspect(container_id, body, sock.type)
                if info is not None:
                    return info, float("inf")
            # 404 (another runtime's container), or an answer we cannot read: try the next runtime
        return id_only, max(retry, 0.0)

    def _get(self, sock: RuntimeSocket, path: str) -> tuple[int | None, bytes]:
        import httpx  # only when a runtime is really asked: keeps the import off the agent's start

        if not os.path.exists(sock.path):
            return None, b""  # no such runtime on this host: normal, not worth a warning
        client = self._clients.get(sock.path)
        if client is None:
            client = self._clients[sock.path] = httpx.Client(
                transport=httpx.HTTPTransport(uds=sock.path),
                base_url="http://localhost",
                timeout=httpx.Timeout(self.timeout),
            )
        self.requests += 1
        try:
            response = client.get(path)
            return response.status_code, response.content
        except httpx.HTTPError as err:
            self.failures += 1
            self._warn_once(
                sock.path,
                f"container runtime {sock.path}: {type(err).__name__} {err}: "
                f"not asked again for {self.retry_after:g} s",
            )
            return None, b""

    # ------------------------------------------------------------------ helpers
    def _store(self, container_id: str, entry: _Entry) -> None:
        cache = self._cache
        if container_id not in cache and len(cache) >= self.max_entries:
            # Containers are few; an overflow drops the oldest answers (they are asked again if seen).
            for old in list(cache)[: max(1, self.max_entries // 8)]:
                cache.pop(old).done.set()
                self._known.pop(old, None)
        cache[container_id] = entry

    def _any_alive(self) -> bool:
        now = self.clock()
        return any(self._dead_until.get(s.path, 0.0) <= now for s in self.sockets)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._warn(message)


def _warn_stderr(message: str) -> None:
    print(f"sysgram: warning: {message}", file=sys.stderr, flush=True)


def runtime_sockets_present(sockets: Sequence[RuntimeSocket] = DEFAULT_SOCKETS) -> tuple[RuntimeSocket, ...]:
    """The sockets that exist on this host (the agent wires a lookup only when there is one)."""
    return tuple(s for s in sockets if os.path.exists(s.path))

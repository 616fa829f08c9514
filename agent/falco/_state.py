"""Per-event evaluation state: the fd table entries, the event context, anomaly and container facts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from agent.events import DetailEvent
from agent.proc.info import ProcessInfo


@dataclass(frozen=True, slots=True)
class AnomalyFields:
    """The model's view of one process, for the sysgram.anomaly.* fields."""

    score: float
    threshold: float
    window: str = ""
    is_anomalous: bool = False
    new_syscalls: str = ""  # space separated: syscalls its program made in no window the model knows


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What is known about a container, for container.* fields (anything unknown stays None -> missing)."""

    id: str
    name: str | None = None
    image: str | None = None
    repository: str | None = None
    tag: str | None = None
    image_id: str | None = None
    privileged: bool | None = None
    start_ts: int | None = None
    type: str | None = None


AnomalyLookup = Callable[[int], AnomalyFields | None]
ContainerLookup = Callable[[str], ContainerInfo | None]

# fd.type -> fd.typechar, as libscap prints them.
TYPECHARS = {
    "file": "f", "directory": "d", "ipv4": "4", "ipv6": "6", "unix": "u", "pipe": "p", "event": "e",
    "signalfd": "s", "eventpoll": "l", "inotify": "i", "timerfd": "t", "netlink": "n", "bpf": "b",
    "userfaultfd": "u", "memfd": "m", "pidfd": "P", "io_uring": "r",
}


class FdInfo(NamedTuple):
    """One open file descriptor as the fd.* fields see it. Immutable (a change makes a new one with
    ``_replace``), so a table copied at fork never sees the other process's changes."""

    num: int
    type: str  # fd.type: file, directory, ipv4, ipv6, unix, memfd, ...
    name: str = ""
    nameraw: str = ""
    l4proto: str = ""  # tcp, udp, raw, icmp ("" when not an IP socket)
    lip: str | None = None
    lport: int | None = None
    rip: str | None = None
    rport: int | None = None
    is_server: bool = False
    connected: bool = False
    name_changed: bool = False
    cloexec: bool = False
    sock_type: int = 0
    flags: int = -1  # the open flags, for files opened while we watched
    typechar: str = "o"
    directory: str | None = None  # precomputed for files and directories (read by many rules)
    filename: str | None = None

    @property
    def is_ip(self) -> bool:
        return self.type in ("ipv4", "ipv6")

    @property
    def sip(self) -> str | None:
        return self.lip if self.is_server else self.rip

    @property
    def sport(self) -> int | None:
        return self.lport if self.is_server else self.rport

    @property
    def cip(self) -> str | None:
        return self.rip if self.is_server else self.lip

    @property
    def cport(self) -> int | None:
        return self.rport if self.is_server else self.lport


def file_fd(num: int, kind: str, name: str, raw: str, cloexec: bool = False, flags: int = -1) -> FdInfo:
    """A file or directory fd, with fd.directory / fd.filename worked out once."""
    head, sep, tail = name.rpartition("/")
    if kind == "directory":
        directory: str | None = name.rstrip("/") or "/"
    else:
        directory = (head or "/") if sep else None
    return FdInfo(num, kind, name, raw, "", None, None, None, None, False, False, False, cloexec, 0, flags,
                  TYPECHARS.get(kind, "o"), directory, tail if name else None)


def socket_fd(num: int, kind: str, l4proto: str = "", sock_type: int = 0, cloexec: bool = False) -> FdInfo:
    return FdInfo(num, kind, l4proto=l4proto, sock_type=sock_type, cloexec=cloexec,
                  typechar=TYPECHARS.get(kind, "o"))


def socket_name(fd: FdInfo) -> str:
    """fd.name of an IP socket: ``lip:lport->rip:rport`` (unknown parts print as 0.0.0.0 / 0)."""
    local = f"{fd.lip or '0.0.0.0'}:{fd.lport or 0}"
    if fd.rip is None:
        return local
    return f"{local}->{fd.rip}:{fd.rport or 0}"


class Ctx:
    """The one mutable object rules look at: reset for each event, never handed out."""

    __slots__ = ("_anc", "_anom", "_cont", "_parent", "_spawner", "engine", "ev", "fd", "num", "proc")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.ev: DetailEvent = DetailEvent(0, 0, 0, "", 0, 0)
        self.proc: ProcessInfo | None = None
        self.fd: FdInfo | None = None
        self.num = 0
        self._anc: list[ProcessInfo] | None = None
        self._parent: Any = _UNSET
        self._anom: Any = _UNSET
        self._spawner: Any = _UNSET
        self._cont: Any = _UNSET

    def reset(self, ev: DetailEvent, proc: ProcessInfo | None, fd: FdInfo | None, num: int) -> None:
        self.ev = ev
        self.proc = proc
        self.fd = fd
        self.num = num
        self._anc = None
        self._parent = _UNSET
        self._anom = _UNSET
        self._spawner = _UNSET
        self._cont = _UNSET

    def parent(self) -> ProcessInfo | None:
        p = self._parent
        if p is _UNSET:
            proc = self.proc
            p = self.engine.lookup(proc.ppid) if proc is not None and proc.ppid > 0 else None
            self._parent = p
        return p

    def ancestors(self) -> list[ProcessInfo]:
        """Parent, grandparent, ... up to init (cycle-safe)."""
        anc = self._anc
        if anc is None:
            anc = []
            proc = self.proc
            seen = set()
            lookup = self.engine.lookup
            while proc is not None and proc.ppid > 0 and proc.ppid not in seen and len(anc) < 64:
                seen.add(proc.pid)
                proc = lookup(proc.ppid)
                if proc is not None:
                    anc.append(proc)
            self._anc = anc
        return anc

    def ancestor(self, n: int) -> ProcessInfo | None:
        if n == 0:
            return self.proc
        if n == 1:
            return self.parent()
        anc = self.ancestors()
        return anc[n - 1] if 0 < n <= len(anc) else None

    def anomaly(self) -> AnomalyFields | None:
        a = self._anom
        if a is _UNSET:
            fn = self.engine.anomaly_lookup
            a = fn(self.ev.tgid) if fn is not None else None
            self._anom = a
        return a

    def spawner(self) -> AnomalyFields | None:
        """The model's view of what started this program: the process as it was before its latest exec
        (a program exec'ing in place), else its parent (a fork, then exec). A shell just exec'd has no
        state of its own worth reading; whether an anomalous program started it is the question."""
        a = self._spawner
        if a is _UNSET:
            a = None
            origin = self.engine.exec_origin_lookup
            if origin is not None:
                a = origin(self.ev.tgid)
            if a is None and self.engine.anomaly_lookup is not None and (parent := self.parent()) is not None:
                a = self.engine.anomaly_lookup(parent.pid)
            self._spawner = a
        return a

    def container(self) -> ContainerInfo | None:
        c = self._cont
        if c is _UNSET:
            fn = self.engine.container_lookup
            proc = self.proc
            c = fn(proc.container_id) if fn is not None and proc is not None else None
            self._cont = c
        return c


_UNSET: Any = object()

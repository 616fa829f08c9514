"""Recordings: a versioned, columnar file of everything the tracer saw (format ``sysgram-recording`` v1).

A recording is one Apache Parquet file (open it with pandas or DuckDB). One row per event, in capture order:

========  =====================================================================================
column    meaning
========  =====================================================================================
kind      uint8: 0 syscall (compact stream), 1 detail (a decoded syscall), 2 fork, 3 exec, 4 exit,
          5 process (a snapshot of a process alive when recording started), 6 summary (the last row)
ts        uint64: CLOCK_MONOTONIC ns (add ``boot_to_wall_ns`` from the metadata for wall time)
tgid/tid  uint32: process and thread id
nr        uint16: syscall number (i386 number when ``flags & 1``, a 32-bit process)
flags     uint16: bit 0 compat
res       int64, null unless detail: the return value
name      string, null for syscall rows: detail = syscall name, fork/exec/process = comm
args      string (JSON), null for syscall rows: detail = decoded arguments (and
          ``raw_args``, the six register values); fork = {ppid, is_thread};
          exec = {filename}; exit = {exit_code}; process = a ProcessInfo; summary = {drops, events, duration_ns}
========  =====================================================================================

The file's key-value metadata ``sysgram`` holds JSON ``{format, version, host, kernel, arch, started_wall_ns,
boot_to_wall_ns, filters, compat_from_kernel}`` (the last: each row's 32-bit flag came from the kernel;
absent in older recordings, whose flags came from each process's executable). Syscall rows are zstd-compressed with dictionary/delta-friendly columns: ten
million events take well under 100 MB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agent._files import check_regular
from agent.capture.names import MAX_NR, name_table
from agent.errors import RecordingError
from agent.events import FLAG_COMPAT, SYSCALL_DTYPE, DetailEvent, ProcEvent
from agent.proc.info import ProcessInfo

FORMAT = "sysgram-recording"
VERSION = 1
KIND_SYSCALL, KIND_DETAIL, KIND_FORK, KIND_EXEC, KIND_EXIT, KIND_PROCESS, KIND_SUMMARY = range(7)

SCHEMA = pa.schema(
    [
        ("kind", pa.uint8()),
        ("ts", pa.uint64()),
        ("tgid", pa.uint32()),
        ("tid", pa.uint32()),
        ("nr", pa.uint16()),
        ("flags", pa.uint16()),
        ("res", pa.int64()),
        ("name", pa.string()),
        ("args", pa.string()),
    ]
)
_ROW_GROUP = 1 << 20


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class RecordingWriter:
    """Appends events to a recording; :meth:`close` writes the summary row. Not thread-safe."""

    path: str
    filters: dict[str, Any] = field(default_factory=dict)
    boot_to_wall_ns: int = 0
    compat_from_kernel: bool = False  # each row's 32-bit flag is the kernel's, not its executable's class

    def __post_init__(self) -> None:
        if not self.boot_to_wall_ns:
            self.boot_to_wall_ns = time.time_ns() - time.monotonic_ns()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "host": socket.gethostname(),
            "kernel": platform.release(),
            "arch": platform.machine(),
            "started_wall_ns": time.time_ns(),
            "boot_to_wall_ns": self.boot_to_wall_ns,
            "filters": self.filters,
            "compat_from_kernel": self.compat_from_kernel,
        }
        schema = SCHEMA.with_metadata({"sysgram": json.dumps(meta)})
        self._tmp = f"{self.path}.partial"
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise RecordingError(f"cannot write the recording: {folder} is not a writable directory", path=self.path)
        try:
            self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd", use_dictionary=["name"])
        except OSError as err:
            raise RecordingError(f"cannot write the recording: {err}", path=self.path) from None
        self._syscall_parts: list[np.ndarray] = []
        self._syscall_rows = 0
        self._rows: list[tuple[Any, ...]] = []
        self.events = 0
        self.first_ts = 0
        self.last_ts = 0

    def add_syscalls(self, batch: np.ndarray) -> None:
        if not len(batch):
            return
        self._flush_rows()
        self._syscall_parts.append(batch)
        self._syscall_rows += len(batch)
        self.events += len(batch)
        self._note_ts(int(batch["ts"][0]), int(batch["ts"][-1]))
        if self._syscall_rows >= _ROW_GROUP:
            self._flush_syscalls()

    def add_event(self, event: DetailEvent | ProcEvent) -> None:
        self._flush_syscalls()
        row: tuple[Any, ...]
        if isinstance(event, DetailEvent):
            row = (
                KIND_DETAIL,
                event.ts,
                event.tgid,
                event.tid,
                event.nr,
                FLAG_COMPAT if event.compat else 0,
                event.res,
                event.syscall,
                json.dumps(_jsonable({**event.args, "raw_args": list(event.raw_args)})),
            )
        elif event.kind == "fork":
            row = (
                KIND_FORK,
                event.ts,
                event.pid,
                event.tid,
                0,
                0,
                None,
                event.comm,
                json.dumps({"ppid": event.ppid, "is_thread": event.is_thread}),
            )
        elif event.kind == "exec":
            row = (
                KIND_EXEC,
                event.ts,
                event.pid,
                event.tid,
                0,
                0,
                None,
                event.comm,
                json.dumps({"filename": event.filename}
                           | ({} if event.image_compat is None else {"image_compat": event.image_compat})),
            )
        else:
            row = (
                KIND_EXIT,
                event.ts,
                event.pid,
                event.tid,
                0,
                0,
                None,
                event.comm,
                json.dumps({"exit_code": event.exit_code}),
            )
        self._rows.append(row)
        self.events += 1
        self._note_ts(event.ts, event.ts)
        if len(self._rows) >= 65536:
            self._flush_rows()

    def add_process(self, info: ProcessInfo) -> None:
        self._flush_syscalls()
        self._rows.append(
            (
                KIND_PROCESS,
                info.start_ns,
                info.pid,
                info.pid,
                0,
                FLAG_COMPAT if info.compat else 0,
                None,
                info.comm,
                json.dumps(dataclasses.asdict(info)),
            )
        )

    def close(self, drops: dict[str, int]) -> None:
        self._flush_syscalls()
        summary = {"drops": drops, "events": self.events, "duration_ns": max(0, self.last_ts - self.first_ts)}
        self._rows.append((KIND_SUMMARY, self.last_ts, 0, 0, 0, 0, None, None, json.dumps(summary)))
        self._flush_rows()
        self._writer.close()
        os.replace(self._tmp, self.path)

    def _note_ts(self, first: int, last: int) -> None:
        if not self.first_ts:
            self.first_ts = first
        self.last_ts = max(self.last_ts, last)

    def _flush_syscalls(self) -> None:
        if not self._syscall_parts:
            return
        batch = np.concatenate(self._syscall_parts)
        self._syscall_parts, self._syscall_rows = [], 0
        n = len(batch)
        table = pa.table(
            {
                "kind": pa.array(np.zeros(n, np.uint8)),
                "ts": pa.array(batch["ts"]),
                "tgid": pa.array(batch["tgid"]),
                "tid": pa.array(batch["tid"]),
                "nr": pa.array(batch["nr"]),
                "flags": pa.array(batch["flags"]),
                "res": pa.nulls(n, pa.int64()),
                "name": pa.nulls(n, pa.string()),
                "args": pa.nulls(n, pa.string()),
            },
            schema=SCHEMA,
        )
        self._writer.write_table(table, row_group_size=_ROW_GROUP)

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        columns = list(zip(*self._rows, strict=True))
        self._rows = []
        table = pa.table(
            [pa.array(col, type=f.type) for col, f in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
        )
        self._writer.write_table(table)


@dataclass(frozen=True)
class Recording:
    """A recording read back: the compact stream as one array, the detail stream as objects, in order."""

    path: str
    meta: dict[str, Any]
    syscalls: np.ndarray  # SYSCALL_DTYPE
    events: list[DetailEvent | ProcEvent]
    processes: list[ProcessInfo]  # alive when recording started
    drops: dict[str, int]
    duration_ns: int
    # For replay in capture order: for each event in ``events``, how many syscall rows precede it.
    event_positions: np.ndarray

    @property
    def total_events(self) -> int:
        return len(self.syscalls) + len(self.events)

    def chunks(self) -> Iterator[np.ndarray | DetailEvent | ProcEvent]:
        """Syscall batches and detail/process events interleaved as they were captured."""
        start = 0
        for event, pos in zip(self.events, self.event_positions, strict=True):
            if pos > start:
                yield self.syscalls[start:pos]
                start = int(pos)
            yield event
        if start < len(self.syscalls):
            yield self.syscalls[start:]


_PROC_KINDS: dict[int, Literal["fork", "exec", "exit"]] = {KIND_FORK: "fork", KIND_EXEC: "exec", KIND_EXIT: "exit"}


def _proc_fields(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """The ProcEvent fields that only one kind of process event has, from a row's args."""
    if kind == "fork":
        return {"ppid": args["ppid"], "is_thread": args["is_thread"]}
    if kind == "exec":
        compat = args.get("image_compat")
        return {"filename": args["filename"], "image_compat": compat if isinstance(compat, bool) else None}
    return {"exit_code": args.get("exit_code", 0)}


def read_recording(path: str) -> Recording:
    """Read a whole recording; any problem is one :class:`RecordingError` naming the file."""
    try:
        check_regular(path)  # a FIFO would block the reader for good
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise RecordingError("no such recording", path=path) from None
    except (pa.ArrowException, OSError) as err:
        raise RecordingError(
            f"not a sysgram recording (truncated or foreign file: {' '.join(str(err).split())})", path=path
        ) from None
    raw_meta = (pf.schema_arrow.metadata or {}).get(b"sysgram")
    if raw_meta is None:
        raise RecordingError("not a sysgram recording (no 'sysgram' metadata)", path=path)
    try:
        meta = json.loads(raw_meta)
    except (ValueError, RecursionError):
        raise RecordingError("corrupt recording metadata", path=path) from None
    if not isinstance(meta, dict):
        raise RecordingError(f"corrupt recording metadata (a JSON {type(meta).__name__}, not an object)", path=path)
    if meta.get("format") != FORMAT:
        raise RecordingError(f"not a sysgram recording (format {meta.get('format')!r})", path=path)
    if meta.get("version") != VERSION:
        raise RecordingError(
            f"unknown recording format version {meta.get('version')!r} (this sysgram reads version {VERSION})",
            path=path,
        )
    if not pf.schema_arrow.remove_metadata().equals(SCHEMA):
        raise RecordingError("recording columns do not match format version 1", path=path)
    try:
        table = pf.read()
    except (pa.ArrowException, OSError) as err:
        raise RecordingError(f"truncated or corrupt recording: {' '.join(str(err).split())}", path=path) from None
    return _decode(path, meta, table)


def _decode(path: str, meta: dict[str, Any], table: pa.Table) -> Recording:
    kind = table.column("kind").to_numpy()
    if not len(kind) or kind[-1] != KIND_SUMMARY:
        raise RecordingError("truncated recording (no summary row: was the recorder killed?)", path=path)
    is_syscall = kind == KIND_SYSCALL
    syscalls = np.zeros(int(is_syscall.sum()), dtype=SYSCALL_DTYPE)
    cols = {name: table.column(name) for name in ("ts", "tgid", "tid", "nr", "flags")}
    syscall_idx = np.flatnonzero(is_syscall)
    for name, col in cols.items():
        syscalls[name] = col.take(pa.array(syscall_idx)).to_numpy()
    bad = np.flatnonzero(syscalls["nr"] >= MAX_NR)
    if len(bad):
        row = int(syscall_idx[bad[0]])
        raise RecordingError(f"row {row}: syscall number {int(syscalls['nr'][bad[0]])} out of range", path=path)
    other_idx = np.flatnonzero(~is_syscall)
    positions = np.cumsum(is_syscall)  # syscall rows at or before each row
    sub = table.take(pa.array(other_idx)).to_pylist()
    events: list[DetailEvent | ProcEvent] = []
    event_positions: list[int] = []
    processes: list[ProcessInfo] = []
    summary: dict[str, Any] = {}
    for idx, row in zip(other_idx, sub, strict=True):
        try:
            args = json.loads(row["args"]) if row["args"] else {}
            if not isinstance(args, dict):
                raise TypeError(f"args (a JSON {type(args).__name__}, not an object)")
            k = row["kind"]
            if k == KIND_DETAIL:
                raw_args = tuple(int(a) for a in args.pop("raw_args", ()))
                event: DetailEvent | ProcEvent = DetailEvent(
                    ts=row["ts"],
                    tgid=row["tgid"],
                    tid=row["tid"],
                    syscall=row["name"],
                    nr=row["nr"],
                    res=row["res"],
                    args=args,
                    compat=bool(row["flags"] & FLAG_COMPAT),
                    raw_args=raw_args,
                )
            elif k in _PROC_KINDS:
                kind = _PROC_KINDS[k]
                extra = _proc_fields(kind, args)
                event = ProcEvent(kind, row["ts"], row["tgid"], row["tid"], comm=row["name"] or "", **extra)
            elif k == KIND_PROCESS:
                args["args"] = tuple(args.get("args", ()))
                processes.append(ProcessInfo(**args))
                continue
            elif k == KIND_SUMMARY:
                summary = args
                continue
            else:
                raise RecordingError(f"row {idx}: unknown event kind {k}", path=path)
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
            raise RecordingError(f"row {idx}: malformed {err or type(err).__name__}", path=path) from None
        events.append(event)
        event_positions.append(int(positions[idx]))
    try:
        drops = {str(k): int(v) for k, v in summary.get("drops", {}).items()}
        duration_ns = int(summary.get("duration_ns", 0))
    except (AttributeError, TypeError, ValueError):
        raise RecordingError("malformed summary row (drops, duration_ns)", path=path) from None
    return Recording(
        path=path,
        meta=meta,
        syscalls=syscalls,
        events=events,
        processes=processes,
        drops=drops,
        duration_ns=duration_ns,
        event_positions=np.asarray(event_positions, dtype=np.int64),
    )


@dataclass(frozen=True, slots=True)
class ThreadTrace:
    """The syscalls one thread made while running one program (split at exec)."""

    exe: str
    comm: str
    pid: int
    tid: int
    syscalls: tuple[str, ...]
    # the thread was seen starting (its fork, or the exec that began this program); False: it was already
    # running when the recording began (or its fork was not recorded), so its first syscalls are mid-life
    from_start: bool = True


def iter_thread_traces(rec: Recording, exes: Sequence[str] = ()) -> Iterator[ThreadTrace]:
    """Per thread and program, the syscall names in order; only ``exes`` when given."""
    program: dict[int, list[tuple[int, str, str]]] = {}  # tgid -> [(since_ts, exe, comm)]
    # A snapshot tells what ran from the start only for processes older than the recording; the others
    # were snapshotted after an exec, and their fork and exec events say what ran when.
    born = {e.pid for e in rec.events if isinstance(e, ProcEvent) and e.kind == "fork" and not e.is_thread}
    threads_born = {e.tid for e in rec.events if isinstance(e, ProcEvent) and e.kind == "fork" and e.is_thread}
    for info in rec.processes:
        if info.pid not in born and info.pid not in program:
            program[info.pid] = [(0, info.exe, info.comm)]
    mid_life = set(program)  # their first span began before the recording
    for event in rec.events:
        if isinstance(event, ProcEvent):
            if event.kind == "exec":
                program.setdefault(event.pid, []).append((event.ts, event.filename, event.comm))
            elif event.kind == "fork" and not event.is_thread:
                parent = program.get(event.ppid)
                if event.pid not in program:  # seen born, even of a parent the recording does not know
                    exe, comm = (parent[-1][1], event.comm or parent[-1][2]) if parent else ("", event.comm)
                    program[event.pid] = [(event.ts, exe, comm)]
        elif event.syscall in ("execve", "execveat") and event.res == 0:
            exe = str(event.args.get("filename", ""))
            spans = program.setdefault(event.tgid, [])
            if (
                exe
                and spans
                and spans[-1][0] <= event.ts
                and spans[-1][1] != exe
                and not spans[-1][1].startswith("/")
            ):
                spans[-1] = (spans[-1][0], exe, spans[-1][2])
    sc = rec.syscalls
    if not len(sc):
        return
    order = np.argsort(sc["tid"], kind="stable")
    tids = sc["tid"][order]
    bounds = np.flatnonzero(np.diff(tids)) + 1
    native, compat = name_table(False), name_table(True)
    wanted = set(exes)
    for idx in np.split(order, bounds):
        rows = sc[idx]
        tgid, tid = int(rows["tgid"][0]), int(rows["tid"][0])
        spans = program.get(tgid, [(0, "", "")])
        starts = np.array([s[0] for s in spans], dtype=np.uint64)
        which = np.searchsorted(starts, rows["ts"], side="right") - 1
        which[which < 0] = 0
        names = np.where(rows["flags"] & FLAG_COMPAT, compat[rows["nr"]], native[rows["nr"]])
        for span in np.unique(which):
            since, exe, comm = spans[int(span)]
            if wanted and exe not in wanted:
                continue
            mine = which == span
            if tid != tgid:  # a thread other than the leader: was its own birth recorded?
                from_start = tid in threads_born
            else:  # the leader: did this program's span begin (fork or exec) inside the recording?
                began = span > 0 or (tgid in program and tgid not in mid_life)
                from_start = began and int(rows["ts"][mine][0]) >= since
            yield ThreadTrace(exe=exe, comm=comm, pid=tgid, tid=tid, syscalls=tuple(names[mine]),
                              from_start=from_start)

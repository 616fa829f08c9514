"""``sysgram record`` and ``sysgram inspect``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from agent._argtypes import check_absolute_exes
from agent.capture.names import name_table
from agent.errors import ConfigError
from agent.events import FLAG_COMPAT, DetailEvent, ProcEvent

if TYPE_CHECKING:  # pyarrow is imported only by the commands that read recordings
    from agent.capture.recording import Recording


def register(subparsers: Any) -> None:
    rec = subparsers.add_parser("record", help="record this host's syscalls to a file (Parquet)")
    rec.add_argument("-o", "--output", required=True, help="the recording to write")
    rec.add_argument(
        "--seconds", type=float, default=0.0, help="stop after N seconds (default: until SIGINT)"
    )
    rec.add_argument(
        "--pid", type=int, action="append", default=[], help="only this process and its descendants"
    )
    rec.add_argument("--comm", action="append", default=[], help="only processes with this comm")
    rec.add_argument("--exe", action="append", default=[], help="only processes running this executable")
    rec.add_argument("--state-dir", default="/var/lib/sysgram", help=argparse.SUPPRESS)
    rec.set_defaults(handler=_record)

    ins = subparsers.add_parser("inspect", help="summarise a recording, or what a model (.onnx) knows")
    ins.add_argument("file")
    ins.add_argument("--program", metavar="PATH", help="a model's program: its thresholds and syscalls by name")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--pid", type=int, help="only this process")
    ins.add_argument(
        "--events", action="store_true", help="print the process's events (one JSON object a line)"
    )
    ins.set_defaults(handler=_inspect)


def _record(args: argparse.Namespace) -> int:
    from agent.pipeline import Filters, build_recorder_pipeline, run_live

    if not args.seconds >= 0:  # NaN too
        raise ConfigError(f"--seconds {args.seconds:g}: expected a positive duration (or 0: until SIGINT)")
    if os.path.isdir(args.output):  # (a missing or read-only directory: the recorder says so, before it starts)
        raise ConfigError("the recording must be a file path, not a directory", path=args.output)
    check_absolute_exes(args.exe)
    missing = [pid for pid in args.pid if not os.path.exists(f"/proc/{pid}")]
    if missing:
        raise ConfigError(f"--pid {missing[0]}: no such process")
    filters = Filters(pids=frozenset(args.pid), comms=frozenset(args.comm), exes=frozenset(args.exe))
    pipeline = build_recorder_pipeline(args.output, filters)
    return run_live(pipeline, seconds=args.seconds)


def _names(rec: Recording, rows: np.ndarray) -> np.ndarray:
    return np.where(rows["flags"] & FLAG_COMPAT, name_table(True)[rows["nr"]], name_table(False)[rows["nr"]])


def summarise(rec: Recording) -> dict[str, Any]:
    procs: dict[int, dict[str, Any]] = {}
    for info in rec.processes:
        procs[info.pid] = {"pid": info.pid, "ppid": info.ppid, "exe": info.exe, "comm": info.comm}
    for event in rec.events:
        if isinstance(event, ProcEvent):
            entry = procs.setdefault(event.pid, {"pid": event.pid, "ppid": 0, "exe": "", "comm": event.comm})
            if event.kind == "fork" and not event.is_thread:
                entry["ppid"] = event.ppid
                parent = procs.get(event.ppid)
                if parent and not entry["exe"]:
                    entry["exe"], entry["comm"] = parent["exe"], parent["comm"]
            elif event.kind == "exec":
                entry["exe"], entry["comm"] = event.filename, event.comm
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    sc = rec.syscalls
    if len(sc):
        names = _names(rec, sc)
        order = np.lexsort((names.astype(str), sc["tgid"]))
        tg = sc["tgid"][order]
        nm = names[order]
        change = np.flatnonzero((tg[1:] != tg[:-1]) | (nm[1:] != nm[:-1])) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(tg)]])
        for s, e in zip(starts, ends, strict=True):
            counts[int(tg[s])][str(nm[s])] += int(e - s)
    for pid in counts:
        procs.setdefault(pid, {"pid": pid, "ppid": 0, "exe": "", "comm": ""})
    processes = []
    for pid in sorted(procs):
        entry = dict(procs[pid])
        entry["syscalls"] = dict(sorted(counts.get(pid, Counter()).items(), key=lambda kv: (-kv[1], kv[0])))
        processes.append(entry)
    return {
        "events": rec.total_events,
        "drops": sum(rec.drops.values()),
        "drops_by_stage": rec.drops,
        "duration": rec.duration_ns / 1e9,
        "processes": processes,
    }


def process_events(rec: Recording, pid: int) -> list[dict[str, Any]]:
    """A process's events in time order: every syscall, with decoded arguments where the detail stream has them."""
    out: list[tuple[int, int, dict[str, Any]]] = []
    sc = rec.syscalls[rec.syscalls["tgid"] == pid]
    names = _names(rec, sc) if len(sc) else np.zeros(0, dtype=object)
    for i, (row, name) in enumerate(zip(sc, names, strict=True)):
        out.append(
            (
                int(row["ts"]),
                1,
                {"ts": int(row["ts"]), "tid": int(row["tid"]), "syscall": str(name), "seq": i},
            )
        )
    for event in rec.events:
        if isinstance(event, DetailEvent) and event.tgid == pid:
            out.append(
                (
                    event.ts,
                    0,
                    {
                        "ts": event.ts,
                        "tid": event.tid,
                        "syscall": event.syscall,
                        "res": event.res,
                        "detail": True,
                        **event.args,
                    },
                )
            )
        elif isinstance(event, ProcEvent) and (
            event.pid == pid or (event.kind == "fork" and event.ppid == pid)
        ):
            out.append(
                (
                    event.ts,
                    0,
                    {
                        "ts": event.ts,
                        "tid": event.tid,
                        "syscall": f"sched_process_{event.kind}",
                        "event": event.kind,
                        "pid": event.pid,
                        "ppid": event.ppid,
                        "comm": event.comm,
                        "filename": event.filename,
                    },
                )
            )
    out.sort(key=lambda t: (t[0], t[1]))
    return [o for _, _, o in out]


def _inspect(args: argparse.Namespace) -> int:
    from agent.capture.recording import read_recording
    from agent.errors import ConfigError

    if args.file.endswith(".onnx"):
        from agent.model.commands import model_summary, print_model_summary

        if args.pid is not None or args.events:
            raise ConfigError("--pid and --events are for a recording; a model's programs are chosen with --program")

        summary = model_summary(args.file, args.program)
        if args.json:
            json.dump(summary, sys.stdout)
            print()
        else:
            print_model_summary(summary)
        return 0
    if args.program is not None:
        raise ConfigError("--program is for a model (.onnx); a recording's processes are chosen with --pid")
    if args.events and args.pid is None:
        raise ConfigError("--events needs --pid P")
    rec = read_recording(args.file)
    if args.pid is not None and not any(
            info.pid == args.pid for info in rec.processes) and not np.any(rec.syscalls["tgid"] == args.pid):
        raise ConfigError(f"--pid {args.pid}: no such process in the recording", path=args.file)
    if args.events:
        for obj in process_events(rec, args.pid):
            print(json.dumps(obj))
        return 0
    summary = summarise(rec)
    if args.pid is not None:
        summary["processes"] = [p for p in summary["processes"] if p["pid"] == args.pid]
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return 0
    print(f"{args.file}: {summary['events']:,} events, {summary['drops']} drops, {summary['duration']:.2f} s")
    for p in summary["processes"]:
        top = ", ".join(f"{k} {v}" for k, v in list(p["syscalls"].items())[:6])
        print(f"  pid {p['pid']:>7} ppid {p['ppid']:>7} {p['comm'] or '?':<16} {p['exe'] or '?'}  {top}")
    return 0

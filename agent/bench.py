"""``sysgram bench [PART...] [--json]``: every figure measured in one run beside its reference.

Each part lives with its room (``agent/<room>/bench.py``) and exposes
``run(quick: bool) -> list[Figure]``. A part that has not landed is reported as such.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

PARTS = {
    "capture": "agent.capture.bench",
    "score": "agent.model.bench",
    "rules": "agent.falco.bench",
    "alerts": "agent.respond.bench",
    "e2e": "agent.pipeline_bench",
    "proc": "agent.proc.bench",
    "seccomp": "agent.seccomp.bench",
}


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured number, with its unit and (where there is one) its target, as text."""

    part: str
    name: str
    value: float | int | str
    unit: str = ""
    target: str = ""


def added_ratio(ours_added: float, reference_added: float, digits: int = 2) -> float | str:
    """Our added cost over the reference's; a note instead of a number when the host's noise hid the
    reference's cost (it measured no slower than bare), so a meaningless ratio is never printed."""
    if reference_added <= 0:
        return "n/a: reference not slower than bare (noisy host, rerun)"
    return round(ours_added / reference_added, digits)


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


@contextmanager
def bpf_stats() -> Iterator[bool]:
    """The kernel's BPF run-time statistics switched on for the block (whether they could be); the previous
    setting is restored. They add two clock reads to every program run, so loop times measured for a
    ratio are taken with them off."""
    try:
        previous = BPF_STATS.read_text().strip()
        BPF_STATS.write_text("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        BPF_STATS.write_text(previous)


def read_fdinfo(path: str) -> dict[str, str]:
    """A /proc/PID/fdinfo/FD file as key -> value (values stripped)."""
    with open(path, encoding="ascii", errors="replace") as fh:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in fh) if _}


def bpf_run_time_ns(pid: int) -> int:
    """Total kernel run time (ns, while stats were on) of every BPF program process ``pid`` holds open,
    each program counted once however many descriptors refer to it."""
    seen: dict[str, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = read_fdinfo(f"/proc/{pid}/fdinfo/{fd.name}")
        except OSError:  # closed while we looked
            continue
        prog = info.get("prog_id", info.get("prog_tag", fd.name)).strip()
        seen[prog] = int(info.get("run_time_ns", "0"))
    return sum(seen.values())


def loop_times(exe: str, n: int) -> tuple[float, float]:
    """(CPU ns, wall ns) per call of ``exe N`` (a loop of N syscalls); CPU from the child's user+system time.

    CPU time is the fair measure on a shared host: the loop also waits for a CPU, and that wait is noise,
    while the cost of tracing its syscalls is charged to the loop's system time. Wall time matters where
    a tracer can block the loop (auditd when its backlog is full)."""
    t0 = time.perf_counter_ns()
    proc = subprocess.Popen([exe, str(n)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall_ns = time.perf_counter_ns() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, [exe, str(n)])
    return (usage.ru_utime + usage.ru_stime) / n * 1e9, wall_ns / n


def loop_cpu_ns(exe: str, n: int) -> float:
    """CPU ns per call of ``exe N`` (see :func:`loop_times`)."""
    return loop_times(exe, n)[0]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="measure capture, scoring, rules, alerts, end to end")
    parser.add_argument(
        "parts", nargs="*", metavar="PART", help=f"one or more of: {', '.join(PARTS)} (default: all)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller runs (for smoke tests)")
    parser.add_argument("--model", metavar="MODEL.onnx", help="score: this model instead of the shipped one")
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    figures: list[Figure] = []
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown benchmark part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    if args.model and args.parts and "score" not in args.parts:
        raise ConfigError("--model is for the score part (sysgram bench score --model MODEL.onnx)")
    for part in args.parts or list(PARTS):
        try:
            module = importlib.import_module(PARTS[part])
        except ModuleNotFoundError as err:
            if err.name != PARTS[part]:
                raise
            figures.append(Figure(part, "status", "not yet available"))
            continue
        if part == "score" and args.model:
            figures.extend(module.run(quick=args.quick, model_path=args.model))
        else:
            figures.extend(module.run(quick=args.quick))
    if args.json:
        json.dump([asdict(f) for f in figures], sys.stdout, indent=2)
        print()
    else:
        _print_table(figures)
    return 0


def _print_table(figures: list[Figure]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("part", "figure", "value", "unit", "target")
    for f in figures:
        value = f"{f.value:,.3f}".rstrip("0").rstrip(".") if isinstance(f.value, float) else str(f.value)
        table.add_row(f.part, f.name, value, f.unit, f.target)
    Console().print(table)

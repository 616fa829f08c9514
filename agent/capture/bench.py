"""``sysgram bench capture``: what capturing every syscall costs, measured beside its reference.

A getppid loop (bpf/getppid_loop.c, compiled here) runs bare, under the floor (a count-only
raw_syscalls program, bpf/floor.bpf.c) and under Sysgram's capture with its consumer draining the
ring buffers. Each setting is measured several times, interleaved, and the medians are compared.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from agent.bench import Figure
from agent.capture._headers import ensure_kernel_headers, ensure_tracefs
from agent.capture._loader import BPF_DIR, _import_bcc
from agent.capture.source import LiveSource

PART = "capture"


def _build_loop(workdir: Path) -> Path:
    exe = workdir / "getppid_loop"
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([cc, "-O2", "-o", str(exe), str(BPF_DIR / "getppid_loop.c")], check=True)
    return exe


def _loop_ns(exe: Path, n: int) -> float:
    out = subprocess.run([str(exe), str(n)], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def run(quick: bool = False) -> list[Figure]:
    ensure_tracefs()
    ensure_kernel_headers()
    n = 1_000_000 if quick else 5_000_000
    rounds = 3 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        exe = _build_loop(Path(tmp))
        bare: list[float] = []
        floor: list[float] = []
        ours: list[float] = []
        bcc = _import_bcc()
        for _ in range(rounds):
            bare.append(_loop_ns(exe, n))
            floor_bpf = bcc.BPF(src_file=str(BPF_DIR / "floor.bpf.c"))
            floor.append(_loop_ns(exe, n))
            floor_bpf.cleanup()
        source = LiveSource(detail_syscalls=set())
        source.start()
        consumed = [0]
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                group = source.get(0.05)
                if group:
                    consumed[0] += sum(len(c) for c in group if isinstance(c, np.ndarray))

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        seen0 = consumed[0]
        for _ in range(rounds):
            ours.append(_loop_ns(exe, n))
        time.sleep(0.2)
        source.flush_all()
        time.sleep(0.3)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        drops = source.drops()
        stop.set()
        drainer.join()
        source.close()
        events = max(1, consumed[0] - seen0)
    bare_ns, floor_ns, ours_ns = (statistics.median(x) for x in (bare, floor, ours))
    floor_added = max(floor_ns - bare_ns, 1e-9)
    ours_added = ours_ns - bare_ns
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return [
        Figure(PART, "getppid bare", round(bare_ns, 1), "ns/syscall"),
        Figure(PART, "getppid + floor (count-only BPF)", round(floor_ns, 1), "ns/syscall"),
        Figure(PART, "getppid + sysgram capture", round(ours_ns, 1), "ns/syscall"),
        Figure(PART, "floor added", round(floor_added, 1), "ns/syscall"),
        Figure(PART, "sysgram added", round(ours_added, 1), "ns/syscall"),
        Figure(
            PART, "sysgram added / floor added", round(ours_added / floor_added, 2), "x", "<= 1.5 (goal 1.3)"
        ),
        Figure(PART, "syscall rate under capture", round(1e3 / ours_ns, 2), "M/s"),
        Figure(PART, "events consumed", events, "events"),
        Figure(PART, "drops (all stages)", sum(drops.values()), "events", "0"),
        Figure(PART, "userspace CPU per million events", round(cpu_s / events * 1e6, 3), "CPU s"),
        Figure(PART, "pid", os.getpid(), ""),
    ][:-1]

"""``sysgram bench proc``: how fast the process table seeds and absorbs exec storms.

The reference is the host's own exec rate (a shell running ``/bin/true`` in a loop): the table must
absorb exec events faster than this host can produce them.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace

import numpy as np

from agent.bench import Figure
from agent.events import DetailEvent, ProcEvent
from agent.proc._table import ProcessTable

PART = "proc"


def _host_exec_rate(count: int) -> float:
    script = f"i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done"
    start = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", script], check=True)
    return count / (time.perf_counter() - start)


def _spawn_sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", "60"]) for _ in range(count)]


def run(quick: bool) -> list[Figure]:
    figures: list[Figure] = []
    rounds = 3 if quick else 20
    sleepers = _spawn_sleepers(8 if quick else 32)
    try:
        time.sleep(0.05)  # let them exec
        table = ProcessTable()
        start = time.perf_counter()
        seeded = table.seed()
        seed_s = time.perf_counter() - start
        figures.append(Figure(PART, "seed: processes read", seeded, "processes"))
        figures.append(Figure(PART, "seed: time per process", seed_s / max(seeded, 1) * 1e6, "µs"))

        # An exec of a live process re-reads /proc/PID (status, stat, cmdline, cwd, exe, exe stat).
        pids = [p.pid for p in sleepers]
        events = [ProcEvent("exec", 0, pid, pid, comm="sleep", filename="/usr/bin/sleep") for pid in pids]
        details = [
            DetailEvent(0, pid, pid, "execve", 59, 0, {"filename": "/usr/bin/sleep", "argv": ["sleep", "60"]})
            for pid in pids
        ]
        start = time.perf_counter()
        for _ in range(rounds):
            for event, detail in zip(events, details, strict=True):
                table.apply(event)
                table.apply_exec_detail(detail)
        live_rate = rounds * len(events) / (time.perf_counter() - start)
        figures.append(
            Figure(PART, "exec events absorbed (live process, /proc re-read)", live_rate, "exec/s")
        )
    finally:
        for p in sleepers:
            p.kill()
        for p in sleepers:
            p.wait()

    # Short-lived processes: fork, exec (gone from /proc by now: filled from the event), exit.
    lifetimes = 20_000 if quick else 200_000
    table = ProcessTable(proc_root="/nonexistent-proc", max_processes=65536)
    parent = ProcEvent("fork", 1, 4_000_000, 4_000_000, ppid=0, comm="storm")
    table.apply(parent)
    start = time.perf_counter()
    for i in range(lifetimes):
        pid = 4_100_000 + (i % 30_000)
        ts = 10 + i * 1000
        table.apply(ProcEvent("fork", ts, pid, pid, ppid=4_000_000, comm="storm"))
        table.apply(ProcEvent("exec", ts + 1, pid, pid, comm="true", filename="/bin/true"))
        table.apply(ProcEvent("exit", ts + 2, pid, pid))
        if i % 1000 == 0:
            table.reap(ts)
    storm_rate = lifetimes / (time.perf_counter() - start)
    figures.append(
        Figure(PART, "fork+exec+exit lifetimes absorbed (gone from /proc)", storm_rate, "lifetimes/s")
    )
    size = len(table) + table.stats["exited"]
    figures.append(Figure(PART, "table size after storm (live + exited)", size, "entries"))

    # Per-batch lookups the pipeline makes: exe_and_program_of over its distinct tgids, compat_mask per row.
    # A batch is runs of one thread's syscalls: 1,024 runs of 64 rows over 200 processes.
    run_tgids = np.random.default_rng(0).choice(np.arange(4_100_000, 4_100_200), 1024)
    tgids = np.repeat(run_tgids, 64).astype(np.uint32)
    table.apply(ProcEvent("fork", 1, 4_100_000, 4_100_000, ppid=4_000_000))
    table.apply(ProcEvent("exec", 2, 4_100_000, 4_100_000, comm="i386", filename="/bin/i386"))
    table._live[4_100_000].info = replace(table._live[4_100_000].info, compat=True)  # one 32-bit process
    table._track(table._live[4_100_000].info)
    table.exe_and_program_of(np.unique(run_tgids).tolist())  # warm: the unknown pids are looked up once
    table.compat_mask(tgids)
    start = time.perf_counter()
    for _ in range(rounds):
        table.exe_and_program_of(np.unique(run_tgids).tolist())
        table.compat_mask(tgids)
    batch_us = (time.perf_counter() - start) / rounds * 1e6
    figures.append(Figure(PART, "exe_and_program_of + compat_mask per 65,536-row batch", batch_us, "µs"))

    host_rate = _host_exec_rate(300 if quick else 2000)
    figures.append(
        Figure(PART, "host exec rate (reference: sh loop of /bin/true)", host_rate, "exec/s",
               target=f"table ≥ {host_rate:,.0f} exec/s")
    )
    return figures

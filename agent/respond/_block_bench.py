"""Blocking latency on the real kernel, for ``sysgram bench alerts``.

The live agent runs with ``--enforce`` and a rule tagged ``sysgram.block``; a fresh victim process opens the
named file, N times. Measured per victim: from the open's kernel timestamp (the alert's ``time``) to the
process's death (its pidfd turning readable) and to the block alert appearing in the JSONL output. The
agent's own event-to-decision time (userspace only) is the reference: what is left is the kernel's part
(signal at the next syscall) and the reaping.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench import Figure
from agent.respond._alert import parse_time

PART = "alerts"
BLOCK_RULE = "Sysgram blocked a process"

_VICTIM_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    usleep(100000); /* the agent sees the exec first */
    int fd = open(argv[1], O_RDONLY | O_CREAT, 0600);
    if (fd >= 0)
        close(fd);
    for (int i = 0; i < 5000; i++) { /* keeps making syscalls: the BPF side signals at the next one */
        syscall(SYS_getppid);
        usleep(1000);
    }
    return 0;
}
"""


def _unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root (BPF)"
    if shutil.which("cc") is None:
        return "needs a C compiler for the victim"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs python3-bpfcc"
    return ""


class _Tail(threading.Thread):
    """Notes the monotonic time each JSONL alert line is first seen (1 ms polling)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="bench-tail", daemon=True)
        self.path = path
        self.seen: list[tuple[int, dict[str, Any]]] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        offset, partial = 0, b""
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                now = time.monotonic_ns()
                offset += len(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                with self._lock:
                    self.seen.extend((now, json.loads(line)) for line in lines if line.strip())
            time.sleep(0.001)

    def find(self, rule: str, pid: int) -> tuple[int, dict[str, Any]] | None:
        with self._lock:
            for seen_at, record in self.seen:
                if record.get("rule") == rule and record.get("output_fields", {}).get("proc.pid") == pid:
                    return seen_at, record
        return None


def _wait_ready(agent: subprocess.Popen[str]) -> None:
    assert agent.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = agent.stderr.readline()
        if "sysgram: ready" in line:
            return
        if not line and agent.poll() is not None:
            break
    raise RuntimeError("the agent did not start")


def blocking_figures(quick: bool) -> list[Figure]:
    why_not = _unavailable()
    if why_not:
        return [Figure(PART, "verdict-to-kill latency", f"skipped: {why_not}")]
    runs = 10 if quick else 50
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="sysgram-block-bench-") as tmp_name:
        tmp = Path(tmp_name)
        victim = tmp / "sysgram-victim"
        (tmp / "victim.c").write_text(_VICTIM_C)
        subprocess.run(["cc", "-O1", "-o", str(victim), str(tmp / "victim.c")], check=True)
        target = f"/tmp/sysgram-bench-block-{uuid.uuid4().hex}"
        rules = tmp / "block.yaml"
        rules.write_text(
            "- rule: Bench open of a forbidden file\n  desc: benchmark\n"
            f"  condition: evt.type in (open, openat) and fd.name = {target}\n"
            "  output: forbidden open by %proc.name (pid %proc.pid)\n  priority: CRITICAL\n"
            "  tags: [sysgram.block]\n"
        )
        (tmp / "config.yaml").write_text("enforce:\n  enabled: true\n")
        alerts = tmp / "alerts.jsonl"
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--no-model", "--no-default-rules", "--rules", str(rules),
             "--config", str(tmp / "config.yaml"), "--state-dir", str(tmp / "state"),
             "--alerts-jsonl", str(alerts), "--quiet"],
            cwd=root, stderr=subprocess.PIPE, text=True,
        )
        tail = _Tail(alerts)
        to_death: list[float] = []
        to_alert: list[float] = []
        killed = 0
        err = ""
        try:
            _wait_ready(agent)
            tail.start()
            for _ in range(runs):
                proc = subprocess.Popen([str(victim), target])
                pidfd = os.pidfd_open(proc.pid)
                try:
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    poller.poll(10_000)
                    died = time.monotonic_ns()
                finally:
                    os.close(pidfd)
                code = proc.wait(timeout=30)
                killed += code == -signal.SIGKILL
                found = None
                deadline = time.monotonic() + 3
                while found is None and time.monotonic() < deadline:
                    found = tail.find(BLOCK_RULE, proc.pid)
                    time.sleep(0.002)
                if found is None:
                    continue
                seen_at, record = found
                wall = parse_time(record["time"])
                if wall is None:
                    continue
                opened = wall - (time.time_ns() - time.monotonic_ns())  # the alert's time is the open's
                to_death.append((died - opened) / 1e6)
                to_alert.append((seen_at - opened) / 1e6)
        finally:
            tail.stop.set()
            agent.send_signal(signal.SIGINT)
            try:
                _, err = agent.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                _, err = agent.communicate()
            Path(target).unlink(missing_ok=True)
    stats: dict[str, Any] = {}
    for line in err.splitlines():
        if line.startswith("sysgram: stats "):
            stats = json.loads(line.removeprefix("sysgram: stats "))
    figures = [Figure(PART, f"victims killed (SIGKILL) of {runs}", killed, "", f"{runs}")]
    if to_death:
        death, alert = np.array(to_death), np.array(to_alert)
        figures += [
            Figure(PART, "open -> process dead p50", float(np.percentile(death, 50)), "ms", "<= 100"),
            Figure(PART, "open -> process dead p99", float(np.percentile(death, 99)), "ms", "<= 100"),
            Figure(PART, "open -> block alert written p50", float(np.percentile(alert, 50)), "ms"),
            Figure(PART, "open -> block alert written p99", float(np.percentile(alert, 99)), "ms"),
        ]
    # signals the BPF program sent at the victim's next syscall; the rest came from the agent's pidfd fallback
    figures.append(Figure(PART, "of which signalled in-kernel", int(stats.get("kernel_signals", 0)), "", f"{runs}"))
    decided = stats.get("event_to_block_ms")
    if isinstance(decided, dict):
        figures += [
            Figure(PART, "reference: agent event -> block decision p50", decided["p50"], "ms"),
            Figure(PART, "reference: agent event -> block decision p99", decided["p99"], "ms"),
        ]
    return figures

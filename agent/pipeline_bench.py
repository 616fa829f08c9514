"""``sysgram bench e2e``: the whole agent (``sysgram run`` as a subprocess) under load, beside references.

Every figure comes from one run of this module, next to its reference measured in the same run:
- capture overhead: a getppid loop bare, under a count-only BPF program (the floor) and under the full
  agent; the agent's added ns/syscall divided by the floor's;
- sustained rate: paced getppid loops stepped up until the agent reports drops, unscored windows or
  unevaluated events; the agent's CPU and RSS at the highest clean step;
- latency from a syscall that matches a rule to its alert written (JSON lines) and POSTed (webhook to a
  receiver on 127.0.0.1), p50 and p99;
- memory: the agent's RSS with many live processes, and before/after many process lifetimes (churn);
- a real workload (a generated C project built with ``make -j2``) without and with the agent.
The load generators are small C programs compiled here (gcc), so Python never paces the load.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bench import Figure, added_ratio, bpf_run_time_ns, bpf_stats, loop_cpu_ns
from agent.capture.bench import FloorRound, Floors, floor_round, loaded_floors
from agent.errors import CaptureError, NotYetAvailable
from agent.pipeline import TRIM_INTERVAL_S

PART = "e2e"
ROOT = Path(__file__).resolve().parents[1]
BPF_DIR = ROOT / "bpf"
READY_TIMEOUT_S = 180.0  # the first start compiles the BPF programs; a busy host makes that slow

# getppid at a paced rate: RATE syscalls/s (0: as fast as possible) for SECONDS; prints "done seconds".
_PACED_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    double rate = atof(argv[1]), secs = atof(argv[2]), t0 = now(), el = 0;
    long done = 0, chunk = 500;
    struct timespec nap = {0, 200000};
    for (;;) {
        el = now() - t0;
        if (el >= secs) break;
        long k = chunk;
        if (rate > 0) {
            long due = (long)(rate * el) + chunk;
            if (done >= due) { nanosleep(&nap, NULL); continue; }
            if (due - done < k) k = due - done;
        }
        for (long i = 0; i < k; i++) syscall(SYS_getppid);
        done += k;
    }
    printf("%ld %.6f\n", done, el);
    return 0;
}
"""

# N live processes: forks N children that sleep until this program's stdin closes (or it dies), then
# kills them. Prints "ready" once all are forked. Children die with their parent (PR_SET_PDEATHSIG).
_LIVE_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    pid_t *kids = calloc(n, sizeof(pid_t));
    for (long i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) { prctl(PR_SET_PDEATHSIG, SIGKILL); if (getppid() == 1) _exit(0); for (;;) pause(); }
        if (p < 0) { n = i; break; }
        kids[i] = p;
    }
    printf("ready %ld\n", n); fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) > 0) {}
    for (long i = 0; i < n; i++) kill(kids[i], SIGKILL);
    for (long i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    return 0;
}
"""

# N process lifetimes: fork, the child exits at once, the parent reaps it; K at a time.
_CHURN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]), done = 0;
    while (done < n) {
        pid_t p = fork();
        if (p == 0) _exit(0);
        if (p < 0) { usleep(1000); continue; }
        waitpid(p, NULL, 0);
        done++;
    }
    printf("%ld\n", done);
    return 0;
}
"""

_BENCH_RULES = """\
- rule: Sysgram bench trigger
  desc: the latency benchmark's trigger file was opened
  condition: evt.type in (open, openat, openat2) and fd.name startswith "{prefix}"
  output: bench trigger opened (file=%fd.name pid=%proc.pid)
  priority: CRITICAL
  tags: [sysgram_bench]
"""


@dataclass(frozen=True, slots=True)
class Scale:
    """How big each measurement is (quick mode for smoke tests, full mode bounded to minutes)."""

    loop_syscalls: int
    overhead_rounds: int
    cycles: int  # short loops of each kind per overhead round
    cycle_syscalls: int
    rates: tuple[float, ...]  # offered syscalls/s, all loads together
    step_seconds: float
    loaders: int
    triggers: int
    trigger_gap_s: float
    latency_load: float  # syscalls/s in the background while the second latency series runs
    live: int
    churn: int
    build_files: int
    build_rounds: int


QUICK = Scale(
    loop_syscalls=300_000,
    overhead_rounds=3,
    cycles=3,
    cycle_syscalls=100_000,
    rates=(100_000.0, 400_000.0),
    step_seconds=2.0,
    loaders=2,
    triggers=20,
    trigger_gap_s=0.02,
    latency_load=100_000.0,
    live=1_000,
    churn=5_000,
    build_files=8,
    build_rounds=1,
)
FULL = Scale(
    loop_syscalls=1_000_000,
    overhead_rounds=7,
    cycles=10,
    cycle_syscalls=200_000,
    rates=(250_000.0, 500_000.0, 1e6, 1.5e6, 2e6, 3e6, 4e6),
    step_seconds=6.0,
    loaders=2,
    triggers=300,
    trigger_gap_s=0.01,
    latency_load=200_000.0,
    live=10_000,
    churn=100_000,
    build_files=40,
    build_rounds=3,
)


@dataclass
class Tools:
    workdir: Path
    loop: Path
    paced: Path
    live: Path
    churn: Path


def _compile(workdir: Path, name: str, source: str | Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NotYetAvailable("the e2e benchmark compiles its load generators: install gcc")
    src = source if isinstance(source, Path) else workdir / f"{name}.c"
    if not isinstance(source, Path):
        src.write_text(source)
    exe = workdir / name
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)
    return exe


def build_tools(workdir: Path) -> Tools:
    return Tools(
        workdir,
        _compile(workdir, "getppid_loop", BPF_DIR / "getppid_loop.c"),
        _compile(workdir, "paced", _PACED_C),
        _compile(workdir, "live", _LIVE_C),
        _compile(workdir, "churn", _CHURN_C),
    )


# -- the agent as a subprocess -----------------------------------------------------------------------


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def thread_schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of one thread, from its schedstat."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
        on_cpu, waiting, _ = fh.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def proc_nice(pid: int) -> int:
    """The nice value of a process's main thread (field 19 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rpartition(")")[2].split()[16])


def _proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Agent:
    """``sysgram run`` in a subprocess: started until ready, measured from /proc, stopped with SIGINT."""

    args: list[str]
    pid: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _popen: subprocess.Popen[str] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Agent:
        cmd = [sys.executable, "-m", "agent", "run", "--quiet", *self.args]
        self._popen = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(READY_TIMEOUT_S) or not self.pid:
            self.kill()
            tail = " | ".join(self.lines[-3:])
            raise CaptureError(f"sysgram run did not get ready: {tail or 'no output'}")
        return self

    def _read(self) -> None:
        assert self._popen is not None and self._popen.stderr is not None
        for line in self._popen.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            if m := re.match(r"sysgram: ready \(pid (\d+)", line):
                self.pid = int(m.group(1))
                self._ready.set()
            elif line.startswith("sysgram: stats "):
                self.stats = json.loads(line.removeprefix("sysgram: stats "))
        self._ready.set()  # it exited: stop waiting

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.pid)

    def rss_mb(self) -> float:
        return _proc_status_kb(self.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return _proc_status_kb(self.pid, "VmHWM") / 1024

    def stop(self, timeout: float = 300.0) -> dict[str, Any]:
        """SIGINT, wait for the drain and the stats line."""
        assert self._popen is not None
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGINT)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CaptureError(f"sysgram run did not stop within {timeout:.0f} s of SIGINT") from None
        for _ in range(100):  # the reader thread may still be on the last line
            if self.stats:
                break
            time.sleep(0.01)
        if not self.stats:
            raise CaptureError(f"sysgram run printed no stats: {' | '.join(self.lines[-3:])}")
        return self.stats

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait()


@contextmanager
def running(args: list[str]) -> Iterator[Agent]:
    agent = Agent(args).start()
    try:
        yield agent
    finally:
        agent.kill()  # only if stop() did not already end it


def _unclean(stats: dict[str, Any]) -> dict[str, int]:
    """Drops, unscored windows and unevaluated detail events in one agent run's stats."""
    model = stats.get("model") or {}
    scored = int(model.get("windows_scored", 0)) + int(model.get("cache_hits", 0))
    unscored = int(model.get("windows", 0)) - scored if model else 0
    details = int(stats.get("details", 0)) - int(stats.get("kernel_signals", 0))
    return {
        "drops": int(stats.get("drops", 0)),
        "unscored_windows": max(unscored, 0),
        "unevaluated_events": max(details - int(stats.get("rules_evaluated", details)), 0),
    }


# -- load ------------------------------------------------------------------------------------------


def _loop_ns(exe: Path, n: int) -> float:
    return loop_cpu_ns(str(exe), n)


def _paced(tools: Tools, rate: float, seconds: float, loaders: int) -> float:
    """Run ``loaders`` paced getppid processes together; the syscalls/s they achieved in total."""
    procs = [
        subprocess.Popen(
            [str(tools.paced), str(rate / loaders), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(loaders)
    ]
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        done, took = out.split()
        total += int(done) / max(float(took), 1e-9)
    return total


def _bpf_ns_per_syscall(pid: int, loop: Path, n: int) -> float | None:
    """Kernel run time of every BPF program ``pid`` holds, per syscall of one loop of ``n`` (stats on for
    that loop only); None where the kernel keeps no BPF statistics."""
    with bpf_stats() as on:
        if not on:
            return None
        before = bpf_run_time_ns(pid)
        _loop_ns(loop, n)
        after = bpf_run_time_ns(pid)
    return (after - before) / n if after > before else None


def _floor_round(tools: Tools, floors: Floors, cycles: int, n: int) -> FloorRound:
    return floor_round(tools.loop, floors[0], floors[1], cycles, n, hooks=floors[2])  # no entry hook: the agent has none


# -- latency ---------------------------------------------------------------------------------------


class _Receiver(http.server.ThreadingHTTPServer):
    """Webhook receiver on 127.0.0.1: when each POST arrived and its body."""

    daemon_threads = True

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        arrived = time.time_ns()
        assert isinstance(self.server, _Receiver)
        self.server.received.append((arrived, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def _tail_jsonl(path: Path, stop: threading.Event, seen: list[tuple[int, str]]) -> None:
    """Poll the alerts file every millisecond; stamp each new line when it appears."""
    offset, partial = 0, ""
    while not stop.is_set():
        try:
            with open(path, encoding="utf-8") as fh:
                fh.seek(offset)
                data = fh.read()
                offset = fh.tell()
        except FileNotFoundError:
            data = ""
        if data:
            stamp = time.time_ns()
            lines = (partial + data).split("\n")
            partial = lines.pop()
            seen.extend((stamp, line) for line in lines if line)
        time.sleep(0.001)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _latencies(
    opened: dict[str, int], arrivals: list[tuple[int, str]] | list[tuple[int, bytes]]
) -> list[float]:
    """ms from each trigger's open() to the first arrival naming its file."""
    out: list[float] = []
    pending = dict(opened)
    for stamp, text in arrivals:
        body = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        for name in re.findall(r"trigger-\d+", body):
            if name in pending:
                out.append((stamp - pending.pop(name)) / 1e6)
    return out


# -- memory ----------------------------------------------------------------------------------------


def _cpu_rate(agent: Agent, seconds: float = 0.5) -> float:
    cpu0 = agent.cpu_s()
    time.sleep(seconds)
    return (agent.cpu_s() - cpu0) / seconds


def _settle_rss(agent: Agent, seconds: float = 20.0) -> float:
    """The agent's RSS once it stops changing by more than 1 MB per half second (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    last = agent.rss_mb()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = agent.rss_mb()
        if abs(now - last) < 1.0:
            return now
        last = now
    return last


@contextmanager
def live_processes(tools: Tools, n: int) -> Iterator[int]:
    """``n`` sleeping processes for the duration of the block; always cleaned up."""
    proc = subprocess.Popen(
        [str(tools.live), str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        yield int(line[1]) if len(line) == 2 else 0
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the parent kills and reaps its children
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()  # the children die with it (PR_SET_PDEATHSIG)
            proc.wait()


def _after_housekeeping(agent: Agent) -> float:
    """The agent's RSS once its housekeeping has run since the load stopped: the reap of exited processes
    (every second) and the return of freed memory to the OS (every TRIM_INTERVAL_S). Read right after a
    burst, RSS still holds the burst's freed memory; ``agent peak RSS`` figures show that."""
    time.sleep(TRIM_INTERVAL_S + 1.0)
    return _settle_rss(agent)


def _reset_peak_rss(agent: Agent) -> None:
    """Start the agent's VmHWM again from its current RSS (``clear_refs`` 5, Linux 4.0+)."""
    try:
        with open(f"/proc/{agent.pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # then the peak is the process's whole life's
        pass


def _churn(tools: Tools, n: int) -> None:
    subprocess.run([str(tools.churn), str(n)], check=True, capture_output=True)


# -- real workload ---------------------------------------------------------------------------------


def make_project(workdir: Path, files: int) -> Path:
    """A small C project: ``files`` translation units and a Makefile."""
    project = workdir / "project"
    project.mkdir(exist_ok=True)
    for i in range(files):
        body = "\n".join(
            f"static double f{i}_{j}(double x) {{ return x * {j + 1}.5 + (x > {j} ? f{i}_{j - 1}(x - 1) : 0); }}"
            if j
            else f"static double f{i}_0(double x) {{ return x + 1; }}"
            for j in range(40)
        )
        (project / f"u{i}.c").write_text(
            f"#include <stdio.h>\n#include <string.h>\n{body}\ndouble u{i}(double x) {{ return f{i}_39(x); }}\n"
        )
    decls = "".join(f"double u{i}(double);\n" for i in range(files))
    calls = " + ".join(f"u{i}(1.0)" for i in range(files))
    (project / "main.c").write_text(
        f'#include <stdio.h>\n{decls}int main(void) {{ printf("%f\\n", {calls}); }}\n'
    )
    objs = " ".join(f"u{i}.o" for i in range(files))
    (project / "Makefile").write_text(
        f"prog: main.o {objs}\n\tcc -o $@ $^\n%.o: %.c\n\tcc -O2 -c -o $@ $<\nclean:\n\trm -f *.o prog\n"
    )
    return project


def _build_s(project: Path) -> float:
    subprocess.run(["make", "-s", "clean"], cwd=project, check=True, capture_output=True)
    t0 = time.monotonic()
    subprocess.run(["make", "-s", "-j2"], cwd=project, check=True, capture_output=True)
    return time.monotonic() - t0


# -- the benchmark ---------------------------------------------------------------------------------


def _agent_args(workdir: Path, extra: list[str] | None = None) -> list[str]:
    config = workdir / "config.yaml"
    config.write_text("outputs:\n  fold_window: 0\n")  # every trigger is its own alert
    return ["--config", str(config), "--state-dir", str(workdir / "state"), *(extra or [])]


def run(quick: bool = False) -> list[Figure]:
    if os.geteuid() != 0:
        raise NotYetAvailable("sysgram bench e2e needs root (it runs the agent and loads BPF programs)")
    if shutil.which("make") is None:
        raise NotYetAvailable("sysgram bench e2e builds a C project as its real workload: install make")
    scale = QUICK if quick else FULL
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="sysgram-bench-") as tmp:
        workdir = Path(tmp)
        tools = build_tools(workdir)
        figures += _overhead(tools, scale)
        figures += _latency(tools, scale)
        figures += _sustained(tools, scale)
        figures += _memory(tools, scale)
        figures += _real_workload(tools, scale)
    return figures


def _trigger(prefix: str, start: int, count: int, gap_s: float) -> dict[str, int]:
    """Open ``prefix<i>`` for i in [start, start+count); when each open began (wall ns)."""
    opened: dict[str, int] = {}
    for i in range(start, start + count):
        opened[f"trigger-{i}"] = time.time_ns()
        with open(prefix + str(i), "w"):
            pass
        time.sleep(gap_s)
    return opened


def _latency_figures(
    label: str, opened: dict[str, int], written: list[tuple[int, str]], received: list[tuple[int, bytes]]
) -> list[Figure]:
    write_ms = _latencies(opened, written)
    post_ms = _latencies(opened, received)
    target = "<= 100 (goal 20)"
    return [
        Figure(PART, f"alerts written / triggers{label}", f"{len(write_ms)}/{len(opened)}", "", "all"),
        Figure(PART, f"syscall -> alert written p50{label}", round(_percentile(write_ms, 50), 2), "ms"),
        Figure(
            PART, f"syscall -> alert written p99{label}", round(_percentile(write_ms, 99), 2), "ms", target
        ),
        Figure(PART, f"webhook POSTs received / triggers{label}", f"{len(post_ms)}/{len(opened)}", "", "all"),
        Figure(PART, f"syscall -> webhook received p50{label}", round(_percentile(post_ms, 50), 2), "ms"),
        Figure(
            PART, f"syscall -> webhook received p99{label}", round(_percentile(post_ms, 99), 2), "ms", target
        ),
    ]


def _overhead(tools: Tools, scale: Scale) -> list[Figure]:
    """The loop bare, under the floor and under the full agent, round by round, a fresh agent per round.

    This host's noise comes and goes over seconds: the bare loop alone drifts between ~155 and ~205 ns for
    seconds at a time, more than the agent's cost differs from the floor's. So the figures are built to
    cancel it:
    - within a round, bare and both floors alternate in short loops (attaching a loaded floor takes
      milliseconds), and each added cost is the median of the paired differences;
    - the direct ratio is taken per round (the agent's short loops against that round's bare and floor),
      and the median over rounds is reported beside the best-of-all-rounds figure;
    - the kernel-accounted ratio reads the agent's extra cost from the kernel's own BPF statistics
      (see _kernel_accounted), which the drift does not touch."""
    rounds: list[FloorRound] = []
    ours: list[list[float]] = []
    ours_bpf: list[float | None] = []
    drops, drain_s = 0, 0.0
    idle_rss = idle_cores = 0.0
    nice = 0
    with loaded_floors() as floors:
        for r in range(scale.overhead_rounds):
            rounds.append(_floor_round(tools, floors, scale.cycles, scale.cycle_syscalls))
            with running(_agent_args(tools.workdir)) as agent:
                if r == 0:
                    idle_rss = _settle_rss(agent, 5.0)
                    idle_cores = _cpu_rate(agent, 1.0)
                    nice = proc_nice(agent.pid)
                else:
                    _settle_rss(agent, 1.0)
                ours.append([_loop_ns(tools.loop, scale.cycle_syscalls) for _ in range(scale.cycles)])
                ours_bpf.append(_bpf_ns_per_syscall(agent.pid, tools.loop, scale.loop_syscalls))
                t0 = time.monotonic()
                drops += _unclean(agent.stop())["drops"]  # it handles everything queued before it prints its stats
                drain_s = max(drain_s, time.monotonic() - t0)
    # best of all loops: the host's noise only ever adds time
    bare_ns = min(min(x.bare_ns) for x in rounds)
    floor_ns = min(min(x.tp_ns) for x in rounds)
    ours_ns = min(min(x) for x in ours)
    per_round = [
        added_ratio(statistics.median(o) - statistics.median(x.bare_ns), x.tp_added) for x, o in zip(rounds, ours, strict=True)
    ]
    numeric = [x for x in per_round if not isinstance(x, str)]
    paired: float | str = round(statistics.median(numeric), 2) if numeric else "n/a: no round measured the floor"
    return [
        Figure(PART, "getppid bare", round(bare_ns, 1), "CPU ns/syscall"),
        Figure(PART, "getppid + floor (count-only BPF)", round(floor_ns, 1), "CPU ns/syscall"),
        Figure(PART, "getppid + full agent (sysgram run)", round(ours_ns, 1), "CPU ns/syscall"),
        Figure(
            PART,
            "full agent added / floor added, best loops",
            added_ratio(ours_ns - bare_ns, floor_ns - bare_ns),
            "x",
            "<= 1.5 (goal 1.3)",
        ),
        Figure(PART, "the same ratio per round (medians of the round's loops)",
               " ".join(str(x) if isinstance(x, str) else f"{x:g}" for x in per_round)),
        Figure(PART, "median of the per-round ratios", paired, "x", "<= 1.5 (goal 1.3)"),
        *_kernel_accounted(rounds, ours_bpf),
        Figure(PART, "drops during the overhead loops", drops, "events", "0"),
        Figure(PART, "agent's longest drain after a round's loops", round(drain_s, 1), "s"),
        Figure(PART, "agent RSS idle", round(idle_rss, 1), "MB"),
        Figure(PART, "agent CPU idle (the host's own syscalls)", round(idle_cores, 2), "cores"),
        # the agent runs ahead of the workloads (run_live's nice): every figure here is with that priority
        Figure(PART, "agent's scheduling priority (nice)", nice, ""),
    ]


def _kernel_accounted(rounds: list[FloorRound], ours_bpf: list[float | None]) -> list[Figure]:
    """The overhead ratio with the agent's extra cost read from the kernel.

    The agent hooks the raw sys_enter tracepoint, so its cost on a syscall is the raw-tracepoint floor's
    (dispatch + a count), plus the dispatcher its per-syscall detail tracepoints add to every syscall's
    entry and exit (measured as the raw floor with bpf/detail_hooks.bpf.c attached), plus the extra time
    its BPF programs take over the floor's program. That extra comes from the kernel's statistics (all
    the agent's programs, per loop syscall; the clock reads the statistics add are in both terms and
    cancel). The floors' added costs come from the loop, each the median of paired differences. Not
    counted: what the agent's user-space work on the other core does to the loop (caches, memory
    bandwidth); the direct ratios above include it."""
    extra = [
        o - x.raw_bpf_ns for x, o in zip(rounds, ours_bpf, strict=True) if o is not None and x.raw_bpf_ns is not None
    ]
    if not extra:
        return [Figure(PART, "full agent added / floor added, kernel-accounted",
                       "not measured: kernel BPF statistics unavailable")]
    tp_added = statistics.median(x.tp_added for x in rounds)
    plain_raw_added = statistics.median(x.raw_added for x in rounds)
    raw_added = statistics.median(x.hooked_added for x in rounds)  # + the detail exit hooks' dispatch
    extra_ns = statistics.median(extra)
    figures = [
        Figure(PART, "floor added (raw_syscalls tracepoint), median of paired loops", round(tp_added, 1),
               "CPU ns/syscall"),
        Figure(PART, "floor added (raw tracepoint, the agent's hook), median of paired loops",
               round(plain_raw_added, 1), "CPU ns/syscall"),
        Figure(PART, "the same + an idle detail exit hook (its per-syscall dispatch), median of paired loops",
               round(raw_added, 1), "CPU ns/syscall"),
        Figure(PART, "agent's BPF time per syscall over the raw floor's (kernel stats)", round(extra_ns, 1), "ns"),
    ]
    if tp_added <= 0:
        return [*figures, Figure(PART, "full agent added / floor added, kernel-accounted",
                                 "n/a: reference not slower than bare (noisy host, rerun)")]
    return [
        *figures,
        Figure(PART, "full agent added / floor added, kernel-accounted", round((raw_added + extra_ns) / tp_added, 2),
               "x", "<= 1.5 (goal 1.3)"),
        # the stricter reference: the cheapest tracer there is, on the agent's own hook
        Figure(PART, "same, against the raw-tracepoint floor",
               added_ratio(raw_added + extra_ns, plain_raw_added), "x"),
    ]


def _latency(tools: Tools, scale: Scale) -> list[Figure]:
    """A fresh agent (no backlog): triggers idle, then again under a steady background load."""
    workdir = tools.workdir
    prefix = str(workdir / "trigger-")
    rules = workdir / "bench_rules.yaml"
    rules.write_text(_BENCH_RULES.format(prefix=prefix))
    jsonl = workdir / "alerts.jsonl"
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/alerts"
    stop_tail = threading.Event()
    written: list[tuple[int, str]] = []
    tail = threading.Thread(target=_tail_jsonl, args=(jsonl, stop_tail, written), daemon=True)
    n = scale.triggers
    try:
        args = _agent_args(workdir, ["--rules", str(rules), "--alerts-jsonl", str(jsonl), "--webhook", url])
        with running(args) as agent:
            tail.start()
            idle = _trigger(prefix, 0, n, scale.trigger_gap_s)
            load_s = n * scale.trigger_gap_s * 1.5 + 1.0
            loader = threading.Thread(target=_paced, args=(tools, scale.latency_load, load_s, scale.loaders))
            loader.start()
            time.sleep(0.5)
            loaded = _trigger(prefix, n, n, scale.trigger_gap_s)
            loader.join()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and len(receiver.received) < 2 * n:
                time.sleep(0.05)
            stats = agent.stop()
    finally:
        stop_tail.set()
        receiver.shutdown()
        receiver.server_close()
    load_label = f" (under {scale.latency_load / 1e6:g} M/s load)"
    return [
        *_latency_figures("", idle, written, receiver.received),
        *_latency_figures(load_label, loaded, written, receiver.received),
        Figure(PART, "drops during the latency runs", _unclean(stats)["drops"], "events", "0"),
    ]


def _sustained(tools: Tools, scale: Scale) -> list[Figure]:
    """Step the offered rate up, one fresh agent per step, until the agent's stats are not clean."""
    # achieved rate, agent CPU (cores), peak RSS MB, pipeline thread CPU ns/syscall and run-queue wait (cores)
    best: tuple[float, float, float, float, float] | None = None
    first_bad: tuple[float, dict[str, int]] | None = None
    offered_max = 0.0
    ended = "every step was clean"
    for rate in scale.rates:
        with running(_agent_args(tools.workdir)) as agent:
            _reset_peak_rss(agent)  # the peak under load, not the BPF compile's at start
            cpu0, t0 = agent.cpu_s(), time.monotonic()
            main0 = thread_schedstat(agent.pid, agent.pid)  # the pipeline thread is the main thread
            achieved = _paced(tools, rate, scale.step_seconds, scale.loaders)
            main1 = thread_schedstat(agent.pid, agent.pid)
            wall = time.monotonic() - t0
            cpu = (agent.cpu_s() - cpu0) / wall
            peak = agent.peak_rss_mb()
            unclean = _unclean(agent.stop())
        offered_max = max(offered_max, achieved)
        if any(unclean.values()):
            first_bad = (achieved, unclean)
            ended = "the agent's stats were not clean"
            break
        pipeline_ns = (main1[0] - main0[0]) * 1e9 / max(achieved * wall, 1.0)
        if best is None or achieved > best[0]:  # a later step the host could not feed may offer less
            best = (achieved, cpu, peak, pipeline_ns, (main1[1] - main0[1]) / wall)
        if achieved < 0.9 * rate:  # the host cannot offer more: the agent was not the limit
            ended = f"the host could not offer more (asked {rate / 1e6:g} M/s, got {achieved / 1e6:.3f})"
            break
    figures = [
        Figure(
            PART,
            "highest clean rate (0 drops/unscored/unevaluated)",
            round(best[0] / 1e6, 3) if best else 0.0,
            "M syscalls/s",
            ">= 3",
        ),
        Figure(PART, "agent CPU at that rate", round(best[1], 2) if best else 0.0, "cores"),
        Figure(PART, "agent peak RSS at that rate", round(best[2], 1) if best else 0.0, "MB"),
        Figure(PART, "pipeline thread CPU per offered syscall", round(best[3], 1) if best else 0.0, "ns"),
        # time the pipeline thread was runnable but had no CPU: the scheduler's share, not the agent's cost
        Figure(PART, "pipeline thread waiting for a CPU at that rate", round(best[4], 2) if best else 0.0,
               "of wall time"),
        Figure(PART, "highest rate offered", round(offered_max / 1e6, 3), "M syscalls/s"),
        Figure(PART, "stepping ended because", ended),
    ]
    if first_bad is not None:
        achieved, unclean = first_bad
        figures.append(Figure(PART, "first unclean step", round(achieved / 1e6, 3), "M syscalls/s"))
        figures += [Figure(PART, f"{k} at that step", v, "events") for k, v in unclean.items()]
    figures.append(Figure(PART, "Falco's reference (userspace, 2 CPUs)", 0.32, "M syscalls/s"))
    return figures


def _memory(tools: Tools, scale: Scale) -> list[Figure]:
    with running(_agent_args(tools.workdir)) as agent:
        before = _settle_rss(agent, 5.0)
        _reset_peak_rss(agent)  # not the compile's peak at start
        with live_processes(tools, scale.live) as alive:
            live_rss = _settle_rss(agent)
            live_peak = agent.peak_rss_mb()
        _churn(tools, scale.churn // 10)  # warm-up: the tables reach their steady size
        churn_before = _after_housekeeping(agent)
        _reset_peak_rss(agent)
        _churn(tools, scale.churn)
        churn_after = _after_housekeeping(agent)
        churn_peak = agent.peak_rss_mb()  # the churn's, and the handling of any backlog it left
        # The same churn again: what grows only over the first is something filling to its bound (or the
        # allocator's high-water mark); what grows over both is a slope, a leak.
        _churn(tools, scale.churn)
        churn_again = _after_housekeeping(agent)
        stats = agent.stop()
    return [
        Figure(PART, "live processes spawned", alive, "", str(scale.live)),
        Figure(PART, "agent RSS before them", round(before, 1), "MB"),
        Figure(
            PART,
            f"agent RSS with {alive:,} live processes",
            round(live_rss, 1),
            "MB",
            "<= 300 (goal 150)" if scale.live >= 10_000 else "",
        ),
        Figure(PART, "agent peak RSS with them", round(live_peak, 1), "MB"),
        Figure(PART, f"agent RSS before {scale.churn:,} process lifetimes", round(churn_before, 1), "MB"),
        Figure(PART, f"agent peak RSS during the {scale.churn:,} lifetimes", round(churn_peak, 1), "MB"),
        Figure(PART, f"agent RSS after {scale.churn:,} process lifetimes", round(churn_after, 1), "MB"),
        Figure(PART, "RSS growth over the churn", round(churn_after - churn_before, 1), "MB", "~0"),
        Figure(PART, f"agent RSS after {scale.churn:,} more lifetimes", round(churn_again, 1), "MB"),
        Figure(PART, "RSS growth over a second churn (the slope)", round(churn_again - churn_after, 1), "MB", "~0"),
        Figure(PART, "process events seen", int(stats.get("proc_events", 0)), "events"),
        Figure(PART, "drops during the memory runs", int(stats.get("drops", 0)), "events", "0"),
    ]


def _real_workload(tools: Tools, scale: Scale) -> list[Figure]:
    project = make_project(tools.workdir, scale.build_files)
    _build_s(project)  # warm the page cache
    without: list[float] = []
    with_agent: list[float] = []
    drops = 0
    for _ in range(scale.build_rounds):
        without.append(_build_s(project))
        with running(_agent_args(tools.workdir)) as agent:
            with_agent.append(_build_s(project))
            drops += int(agent.stop().get("drops", 0))
    bare_s, ours_s = statistics.median(without), statistics.median(with_agent)
    return [
        Figure(PART, f"make -j2 of {scale.build_files + 1} C files, no agent", round(bare_s, 3), "s"),
        Figure(PART, "same build with the agent", round(ours_s, 3), "s"),
        Figure(PART, "build slowdown with the agent", round(ours_s / bare_s, 3), "x"),
        Figure(PART, "drops during the builds", drops, "events", "0"),
    ]

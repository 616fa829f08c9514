"""`sysgram bench rules`: events/s through the upstream stable Falco rules on one core, on real traffic.

The traffic is recorded on this host inside the bench (`sysgram record --pid` of a workload of shell loops,
coreutils, python start-ups, file churn, a loopback connect/accept, a sensitive read), or read from the
recording named by SYSGRAM_BENCH_RECORDING. Its detail and process events are then replayed in order, as
`sysgram run` would see them with these rules (the detail syscalls the rules ask for, plus exec and chdir),
through a ProcessTable filled from the recording and a fresh Engine. Two loops over the same events are
timed in one run: the process table alone, then table + rules; the rules' figure is the difference.
Without BPF (not root) the synthetic traffic of the previous bench is measured instead, and said so.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.bench import Figure
from agent.events import DetailEvent, ProcEvent
from agent.falco import Engine, RuleSet, load_rules
from agent.proc import ProcessTable
from agent.proc.info import ProcessInfo

ROOT = Path(__file__).resolve().parents[2]
STABLE_RULES = ROOT.parent / "shared" / "falco-rules" / "falco_rules.yaml"
TARGET_EPS = 200_000
RECORDING_ENV = "SYSGRAM_BENCH_RECORDING"
_ALWAYS_DETAILED = frozenset({"execve", "execveat", "chdir", "fchdir", "setuid", "setresuid", "setgid", "setresgid"})  # what `sysgram run` always asks for

# The workload the bench records: what a small busy host does, in one process tree. It waits for the
# recorder to be ready (the "go" file), then loops for the given seconds.
_WORKLOAD = r"""
work="$1"; seconds="$2"
while [ ! -e "$work/go" ]; do sleep 0.02; done
end=$((SECONDS + seconds))
while [ "$SECONDS" -lt "$end" ]; do
  cat /etc/hostname /etc/os-release /etc/passwd > /dev/null
  ls -la /usr/bin /etc > /dev/null
  find /usr/lib/python3 -maxdepth 2 -name '*.py' > /dev/null 2>&1
  grep -r root /etc/passwd /etc/group > /dev/null
  sh -c 'echo hello | wc -c; date; id' > /dev/null
  head -c 4096 /dev/urandom | sha256sum > /dev/null
  cp /etc/hosts "$work/h"; mv "$work/h" "$work/h2"; chmod 600 "$work/h2"; rm -f "$work/h2"
  mkdir -p "$work/d/e"; (cd "$work/d/e" && touch a b && ls > /dev/null); rm -rf "$work/d"
  ln -sf /etc/hosts "$work/l"; rm -f "$work/l"
  cat /etc/shadow > /dev/null
  "$3" "$work/py.py" > /dev/null
done
"""
_PY_WORKLOAD = r"""
import glob, json, os, socket, subprocess, sys, tempfile
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
c.sendall(b"ping" * 64); s.recv(4096)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b"x", ("127.0.0.1", 9)); u.close()
for fd in (c, s, srv): fd.close()
for path in glob.glob("/etc/*.conf")[:30]:
    try:
        with open(path, "rb") as fh: fh.read(256)
    except OSError: pass
with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(__file__)) as tmp:
    json.dump({"k": list(range(100))}, tmp); tmp.flush(); os.dup2(tmp.fileno(), 9); os.close(9)
subprocess.run(["true"])
"""


def _procs_of(recording_processes: Sequence[ProcessInfo]) -> list[ProcessInfo]:
    """The first row of each pid: the process as it was when the recording started (or was first seen)."""
    first: dict[int, ProcessInfo] = {}
    for info in recording_processes:
        first.setdefault(info.pid, info)
    return list(first.values())


def record_workload(out: Path, seconds: float) -> str:
    """Record the bench workload with `sysgram record --pid`; returns '' or why it could not."""
    work = Path(tempfile.mkdtemp(prefix="sysgram-bench-rules-"))
    try:
        (work / "py.py").write_text(_PY_WORKLOAD)
        bash = shutil.which("bash") or "/bin/bash"
        workload = subprocess.Popen([bash, "-c", _WORKLOAD, "workload", str(work), str(int(seconds)),
                                     sys.executable], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        recorder = subprocess.Popen(
            [sys.executable, "-m", "agent", "record", "-o", str(out), "--seconds", str(seconds + 1.5),
             "--pid", str(workload.pid), "--state-dir", str(work / "state")],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )
        assert recorder.stderr is not None
        ready = False
        for line in recorder.stderr:
            if "sysgram: ready" in line:
                ready = True
                break
        (work / "go").touch()
        if not ready:
            workload.kill()
            workload.wait()
            recorder.wait(timeout=60)
            return f"sysgram record did not start (exit {recorder.returncode})"
        workload.wait(timeout=seconds + 120)
        recorder.communicate(timeout=120)
        return "" if recorder.returncode == 0 and out.exists() else f"sysgram record failed ({recorder.returncode})"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replay_events(path: str, ruleset: RuleSet) -> tuple[list[ProcessInfo], list[DetailEvent | ProcEvent], int]:
    """The recording's processes and its events as `sysgram run` with ``ruleset`` would get them, and how many
    recorded detail events it would not have asked for."""
    from agent.capture.recording import read_recording

    rec = read_recording(path)
    wanted = set(ruleset.interesting_syscalls()) | _ALWAYS_DETAILED
    events: list[DetailEvent | ProcEvent] = []
    skipped = 0
    for ev in rec.events:
        if isinstance(ev, DetailEvent) and ev.syscall not in wanted:
            skipped += 1
            continue
        events.append(ev)
    return _procs_of(rec.processes), events, skipped


def _replay(procs: Sequence[ProcessInfo], events: Sequence[DetailEvent | ProcEvent], ruleset: RuleSet | None,
            empty_root: str) -> tuple[float, int]:
    """(CPU seconds, alerts) of one replay: the table always; the engine too when a rule set is given."""
    table = ProcessTable(proc_root=empty_root)  # a replay: /proc of today says nothing about the recording
    for info in procs:
        table.add(info)
    apply, exec_detail = table.apply, table.apply_exec_detail
    alerts = 0
    if ruleset is None:
        t0 = time.process_time()
        for ev in events:
            if isinstance(ev, ProcEvent):
                apply(ev)
            elif ev.syscall in _ALWAYS_DETAILED:
                exec_detail(ev)
        return time.process_time() - t0, 0
    engine = Engine(ruleset, table.get, hostname="bench")
    evaluate, on_proc = engine.evaluate, engine.on_proc_event
    t0 = time.process_time()  # CPU time of this process: "one core" even when the machine is busy
    for ev in events:
        if isinstance(ev, ProcEvent):
            apply(ev)
            on_proc(ev)
        else:
            if ev.syscall in _ALWAYS_DETAILED:
                exec_detail(ev)
            alerts += len(evaluate(ev))
    return time.process_time() - t0, alerts


def measure_recording(path: str, rules: list[str], rounds: int = 3) -> tuple[dict[str, float], Counter[str]]:
    """Best-of-``rounds`` figures of replaying a recording through the table and the rules, and the event mix."""
    t0 = time.perf_counter()
    ruleset, _ = load_rules(rules)
    load_s = time.perf_counter() - t0
    procs, events, skipped = replay_events(path, ruleset)
    mix: Counter[str] = Counter(ev.syscall if isinstance(ev, DetailEvent) else ev.kind for ev in events)
    empty = tempfile.mkdtemp(prefix="sysgram-bench-noproc-")
    try:
        table_s = min(_replay(procs, events, None, empty)[0] for _ in range(rounds))
        both = [_replay(procs, events, ruleset, empty) for _ in range(rounds)]
    finally:
        os.rmdir(empty)
    both_s = min(s for s, _ in both)
    rules_s = max(both_s - table_s, 1e-9)
    return {
        "load_s": load_s,
        "events": len(events),
        "skipped": skipped,
        "rules_eps": len(events) / rules_s,
        "both_eps": len(events) / max(both_s, 1e-9),
        "alerts": both[0][1],
    }, mix


# -------------------------------------------------------------------- synthetic traffic (no BPF here)
_COMMS = [("nginx", "/usr/sbin/nginx"), ("python3", "/usr/bin/python3.11"), ("java", "/usr/bin/java"),
          ("postgres", "/usr/lib/postgresql/15/bin/postgres"), ("sshd", "/usr/sbin/sshd"),
          ("bash", "/usr/bin/bash"), ("node", "/usr/bin/node"), ("cron", "/usr/sbin/cron"),
          ("containerd", "/usr/bin/containerd"), ("redis-server", "/usr/bin/redis-server"),
          ("grep", "/usr/bin/grep"), ("cat", "/usr/bin/cat"), ("curl", "/usr/bin/curl"), ("sh", "/usr/bin/dash")]
_PATHS = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/etc/ld.so.cache", "/proc/self/status", "/proc/meminfo",
          "/etc/nsswitch.conf", "/etc/passwd", "/etc/hosts", "/etc/resolv.conf", "/var/log/nginx/access.log",
          "/var/lib/postgresql/15/main/base/16384/2619", "/usr/share/zoneinfo/UTC", "/tmp/tmpk2h3x9/data.json",
          "/home/alice/project/src/main.py", "/sys/fs/cgroup/cpu.max", "/dev/null", "/dev/urandom",
          "/etc/ssl/certs/ca-certificates.crt", "/usr/lib/python3.11/json/__init__.py", "../conf/app.yaml",
          "static/index.html"]
# Rare on a real host, but present so that rules fire and outputs get rendered in the measurement.
_RARE_PATHS = ["/etc/shadow", "/etc/pam.d/common-auth", "/var/log/syslog", "/var/www/../../etc/passwd"]
_SYSCALL_NR = {"openat": 257, "open": 2, "execve": 59, "connect": 42, "socket": 41, "close": 3, "dup2": 33,
               "accept4": 288, "sendto": 44, "unlink": 87, "setuid": 105, "bind": 49}


def _process_table(rng: random.Random, n: int) -> dict[int, ProcessInfo]:
    procs = {1: ProcessInfo(1, 0, "systemd", "/usr/lib/systemd/systemd", ("/sbin/init",), "/", 0, 0, "root", "root")}
    for pid in range(100, 100 + n):
        comm, exe = rng.choice(_COMMS)
        ppid = rng.choice([1, *range(100, pid)]) if pid > 100 else 1
        uid = rng.choice([0, 33, 1000, 999])
        procs[pid] = ProcessInfo(pid, ppid, comm, exe, (exe, "--serve", f"worker-{pid}"), rng.choice(["/", "/srv/app"]),
                                 uid, uid, {0: "root", 33: "www-data", 1000: "alice"}.get(uid, "svc"), "grp",
                                 start_ns=1_000_000)
    return procs


def synthetic_events(n: int, seed: int = 7) -> tuple[dict[int, ProcessInfo], list[DetailEvent]]:
    rng = random.Random(seed)
    procs = _process_table(rng, 300)
    pids = list(procs)
    events: list[DetailEvent] = []
    ts = 10_000_000_000
    mix = (["openat"] * 55 + ["open"] * 5 + ["close"] * 12 + ["execve"] * 4 + ["socket"] * 5 + ["connect"] * 5
           + ["sendto"] * 4 + ["accept4"] * 3 + ["dup2"] * 2 + ["unlink"] * 2 + ["setuid"] * 1 + ["bind"] * 2)
    for _ in range(n):
        ts += rng.randint(200, 4000)
        pid = rng.choice(pids)
        sc = rng.choice(mix)
        res = rng.randint(3, 60)
        args: dict[str, object]
        if sc in ("openat", "open"):
            flags = rng.choice([os.O_RDONLY | os.O_CLOEXEC, os.O_RDONLY, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                os.O_RDWR, os.O_WRONLY | os.O_CREAT | os.O_TRUNC])
            path = rng.choice(_RARE_PATHS) if rng.random() < 0.005 else rng.choice(_PATHS)
            args = {"name": path, "flags": flags, "mode": 0o644}
            if sc == "openat":
                args["dirfd"] = -100
            if rng.random() < 0.1:
                res = -2
        elif sc == "execve":
            comm, exe = rng.choice(_COMMS)
            args = {"filename": exe, "argv": [comm, "-c", "echo hi"]}
            res = 0
        elif sc == "socket":
            args = {"domain": rng.choice([2, 10, 1]), "type": rng.choice([1, 2]), "proto": 0}
        elif sc in ("connect", "sendto"):
            args = {"fd": res, "family": 2, "addr": rng.choice(["10.0.0.5", "93.184.216.34", "127.0.0.1"]),
                    "port": rng.choice([443, 80, 5432, 22])}
            if sc == "sendto":
                args["size"] = 512
            res = 0 if sc == "connect" else 512
        elif sc == "bind":
            args = {"fd": res, "family": 2, "addr": "0.0.0.0", "port": 8080}
            res = 0
        elif sc == "accept4":
            args = {"fd": rng.randint(3, 10), "family": 2, "addr": "10.1.2.3", "port": rng.randint(30000, 60000),
                    "flags": 0}
        elif sc == "dup2":
            args = {"oldfd": res, "newfd": rng.choice([0, 1, 2, 10])}
            res = args["newfd"]  # type: ignore[assignment]
        elif sc == "unlink":
            args = {"path": rng.choice(_PATHS)}
            res = 0
        elif sc == "setuid":
            args = {"uid": 0}
            res = 0
        else:
            args = {"fd": res}
            res = 0
        events.append(DetailEvent(ts, pid, pid, sc, _SYSCALL_NR[sc], res, args))
    return procs, events


def measure(n: int, rules: list[str], rounds: int = 3) -> tuple[float, int, float]:
    """Synthetic traffic: (events/s, matches, load seconds), the best of ``rounds`` replays."""
    t0 = time.perf_counter()
    ruleset, _ = load_rules(rules)
    load_s = time.perf_counter() - t0
    procs, events = synthetic_events(n)
    best = 0.0
    matches = 0
    for _ in range(rounds):
        engine = Engine(ruleset, procs.get, hostname="bench")
        evaluate: Callable[[DetailEvent], list[object]] = engine.evaluate  # type: ignore[assignment]
        matches = 0
        t0 = time.process_time()
        for ev in events:
            matches += len(evaluate(ev))
        best = max(best, n / max(time.process_time() - t0, 1e-9))
    return best, matches, load_s


def _mix_figures(mix: Counter[str], top: int = 8) -> list[Figure]:
    total = sum(mix.values()) or 1
    return [Figure("rules", f"mix: {name}", round(100 * count / total, 1), "%") for name, count in mix.most_common(top)]


def run(quick: bool) -> list[Figure]:
    if not STABLE_RULES.exists():
        return [Figure("rules", "status", f"skipped: {STABLE_RULES} not found")]
    rules = [str(STABLE_RULES)]
    given = os.environ.get(RECORDING_ENV, "")
    tmp = Path(tempfile.mkdtemp(prefix="sysgram-bench-rec-"))
    try:
        source, why = given, ""
        if not source:
            source = str(tmp / "traffic.parquet")
            why = "BPF needs root" if os.geteuid() != 0 else record_workload(Path(source), 3 if quick else 6)
        if why:
            n = 30_000 if quick else 200_000
            eps, matches, load_s = measure(n, rules)
            return [
                Figure("rules", "status", f"synthetic traffic: could not record real traffic ({why})"),
                Figure("rules", "stable rules load+compile", round(load_s * 1000, 1), "ms"),
                Figure("rules", "events through stable rules (1 core, synthetic)", round(eps), "events/s",
                       f">= {TARGET_EPS:,}"),
                Figure("rules", "alerts on synthetic traffic", matches, "alerts", ""),
            ]
        figures, mix = measure_recording(source, rules)
        # The reference: the synthetic traffic the earlier figures (126k-191k events/s) were measured on.
        synthetic_eps, _, _ = measure(30_000 if quick else 100_000, rules)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        Figure("rules", "traffic", f"real: {given or 'recorded workload'}"),
        Figure("rules", "stable rules load+compile", round(figures["load_s"] * 1000, 1), "ms"),
        Figure("rules", "events replayed (details + proc events)", int(figures["events"]), "events"),
        Figure("rules", "events through stable rules (1 core, real traffic)", round(figures["rules_eps"]),
               "events/s", f">= {TARGET_EPS:,}"),
        Figure("rules", "events through process table + rules (1 core)", round(figures["both_eps"]), "events/s"),
        Figure("rules", "reference: synthetic traffic through stable rules (1 core)", round(synthetic_eps),
               "events/s"),
        Figure("rules", "alerts on the real traffic", int(figures["alerts"]), "alerts"),
        *_mix_figures(mix),
    ]

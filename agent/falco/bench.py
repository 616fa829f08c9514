"""`sysgram bench rules`: events/s through the upstream stable Falco rules on one core.

The traffic is synthetic but shaped like a busy host: mostly file opens of many paths (libraries, /proc,
configs, logs, a few sensitive files), execs under realistic parents, sockets/connects/accepts, dups and
closes, with a fake process table. It is generated once, then replayed through a fresh Engine and timed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from agent.bench import Figure
from agent.events import DetailEvent
from agent.falco import Engine, load_rules
from agent.proc.info import ProcessInfo

STABLE_RULES = Path(__file__).resolve().parents[2].parent / "shared" / "falco-rules" / "falco_rules.yaml"
TARGET_EPS = 200_000

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
    """(events/s, matches, load seconds): the best of ``rounds`` replays, each through a fresh Engine."""
    t0 = time.perf_counter()
    ruleset, _ = load_rules(rules)
    load_s = time.perf_counter() - t0
    procs, events = synthetic_events(n)
    best = 0.0
    matches = 0
    for _ in range(rounds):
        engine = Engine(ruleset, procs.get, hostname="bench")
        evaluate = engine.evaluate
        matches = 0
        # CPU time of this process: the figure is "on one core" even when the machine is busy.
        t0 = time.process_time()
        for ev in events:
            matches += len(evaluate(ev))
        best = max(best, n / max(time.process_time() - t0, 1e-9))
    return best, matches, load_s


def run(quick: bool) -> list[Figure]:
    if not STABLE_RULES.exists():
        return [Figure("rules", "status", f"skipped: {STABLE_RULES} not found")]
    n = 30_000 if quick else 200_000
    eps, matches, load_s = measure(n, [str(STABLE_RULES)])
    return [
        Figure("rules", "stable rules load+compile", round(load_s * 1000, 1), "ms"),
        Figure("rules", "events through stable rules (1 core)", round(eps), "events/s", f">= {TARGET_EPS:,}"),
        Figure("rules", "alerts on synthetic traffic", matches, "alerts", ""),
    ]

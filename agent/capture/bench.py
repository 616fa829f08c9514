"""``sysgram bench capture``: what capturing every syscall costs, measured beside its reference.

A getppid loop (bpf/getppid_loop.c, compiled here) runs bare, under two floors (count-only programs on
the raw sys_enter tracepoint, bpf/floor_raw.bpf.c, the cheapest possible tracer, and on the
raw_syscalls:sys_enter tracepoint, bpf/floor.bpf.c) and under Sysgram's capture with its consumer
draining the ring buffers. Each program is loaded once and attached only for its own rounds, so the
settings interleave round by round; the best rounds are compared,
in the loop's CPU time per syscall (see agent.bench.loop_cpu_ns).
The other reference is auditd logging every syscall of the loop (installed and started for the
measurement when missing, then stopped; its rule is removed and the audit settings restored).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench import Figure, added_ratio, bpf_stats, loop_cpu_ns, loop_times, read_fdinfo
from agent.capture._headers import ensure_kernel_headers, ensure_tracefs
from agent.capture._loader import BPF_DIR, _import_bcc
from agent.capture.source import LiveSource

PART = "capture"
AUDIT_TIMEOUT_S = 300.0


@dataclass
class AuditReference:
    """The loop's ns/syscall with auditd logging all its syscalls, or why that could not be measured."""

    ns: float | None = None
    wall_ns: float | None = None
    lost: int = 0
    installed: bool = False
    why_not: str = ""

    def figures(self, part: str, bare_ns: float, ours_added: float) -> list[Figure]:
        if self.ns is None:
            return [Figure(part, "auditd reference", f"not measured: {self.why_not}")]
        added = self.ns - bare_ns
        return [
            Figure(
                part,
                "getppid + auditd (every syscall of the loop logged)",
                round(self.ns, 1),
                "CPU ns/syscall",
            ),
            Figure(part, "auditd added", round(added, 1), "CPU ns/syscall"),
            Figure(
                part,
                "getppid + auditd, wall time (waits on auditd's backlog)",
                round(self.wall_ns, 1) if self.wall_ns is not None else "n/a",
                "ns/syscall",
            ),
            Figure(part, "auditd added / sysgram added", added_ratio(added, ours_added, 1), "x", "> 1"),
            Figure(part, "audit records lost (kernel)", self.lost, "records"),
        ]


def _auditctl(*args: str) -> str:
    return subprocess.run(["auditctl", *args], check=True, capture_output=True, text=True).stdout


def _audit_status() -> dict[str, str]:
    pairs = (line.split(" ", 1) for line in _auditctl("-s").splitlines() if " " in line)
    return {k: v.strip() for k, v in pairs}


def _ensure_auditd() -> bool:
    """auditctl and auditd present, installing the Debian package when missing; True if installed now."""
    if shutil.which("auditctl") and shutil.which("auditd"):
        return False
    if shutil.which("apt-get") is None:
        raise OSError("auditd is missing and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "auditd"],
        check=True,
        capture_output=True,
        env=env,
        timeout=AUDIT_TIMEOUT_S,
    )
    return True


def audit_reference(exe: Path, measure: Callable[[], tuple[float, float]], rounds: int) -> AuditReference:
    """Measure ``measure()`` with auditd logging every syscall of ``exe``, then leave the host as found.

    A running auditd is used as it is; otherwise one is started with a private config whose log lives in
    a temporary directory, and stopped afterwards. Only our own rule is added and removed.
    """
    ref = AuditReference()
    try:
        ref.installed = _ensure_auditd()
        before = _audit_status()
    except (OSError, subprocess.SubprocessError) as err:
        ref.why_not = str(err).splitlines()[0] if str(err) else type(err).__name__
        return ref
    rule = ["always,exit", "-F", "arch=b64", "-S", "all", "-F", f"exe={exe}"]
    daemon: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="sysgram-audit-") as tmp:
        try:
            if before.get("pid", "0") == "0":
                daemon = _start_auditd(Path(tmp))
            _auditctl("-b", str(max(int(before.get("backlog_limit", "64")), 8192)))
            _auditctl("-a", *rule)
            lost0 = int(_audit_status().get("lost", "0"))
            times = [measure() for _ in range(rounds)]
            ref.ns, ref.wall_ns = min(t[0] for t in times), min(t[1] for t in times)
            ref.lost = int(_audit_status().get("lost", "0")) - lost0
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            ref.why_not = str(err).splitlines()[0] if str(err) else type(err).__name__
        finally:
            subprocess.run(["auditctl", "-d", *rule], capture_output=True)
            if daemon is not None:
                daemon.terminate()
                try:
                    daemon.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            subprocess.run(["auditctl", "-b", before.get("backlog_limit", "64")], capture_output=True)
            subprocess.run(["auditctl", "-e", before.get("enabled", "0")], capture_output=True)
    return ref


def _start_auditd(tmp: Path) -> subprocess.Popen[bytes]:
    """auditd in the foreground (-n) with the system config but its log in ``tmp``."""
    text = Path("/etc/audit/auditd.conf").read_text()
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "log_file":
            line = f"log_file = {tmp / 'audit.log'}"
        elif key in ("space_left", "admin_space_left"):  # a small tmpfs must not make it suspend
            line = f"{key} = {2 if key == 'space_left' else 1}"
        lines.append(line)
    conf = tmp / "auditd.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o640)
    daemon = subprocess.Popen(
        ["auditd", "-n", "-c", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise OSError(f"auditd exited with status {daemon.returncode}")
        if _audit_status().get("pid", "0") == str(daemon.pid):
            return daemon
        time.sleep(0.1)
    daemon.terminate()
    daemon.wait()
    raise OSError("auditd did not register with the kernel within 10 s")


def _build_loop(workdir: Path) -> Path:
    exe = workdir / "getppid_loop"
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([cc, "-O2", "-o", str(exe), str(BPF_DIR / "getppid_loop.c")], check=True)
    return exe


def _loop_ns(exe: Path, n: int) -> float:
    return loop_cpu_ns(str(exe), n)


class AttachSwitch:
    """A loaded program whose sys_enter hook is attached only while its round is measured, so that bare,
    both floors and Sysgram interleave round by round (compiling and loading happen once)."""

    def __init__(self, bpf: Any, raw: bool) -> None:
        self.bpf, self.raw = bpf, raw
        self.fn = "raw_tracepoint__sys_enter" if raw else "tracepoint__raw_syscalls__sys_enter"
        self.off()

    def on(self) -> None:
        if self.raw:
            self.bpf.attach_raw_tracepoint(tp="sys_enter", fn_name=self.fn)
        else:
            self.bpf.attach_tracepoint(tp="raw_syscalls:sys_enter", fn_name=self.fn)

    def run_ns(self) -> tuple[int, int]:
        """(total ns, runs) of the program so far, from the kernel's BPF stats (kernel.bpf_stats_enabled)."""
        info = read_fdinfo(f"/proc/self/fdinfo/{self.bpf.funcs[self.fn.encode()].fd}")
        return int(info.get("run_time_ns", "0")), int(info.get("run_cnt", "0"))

    def off(self) -> None:
        if self.raw:
            self.bpf.detach_raw_tracepoint(tp="sys_enter")
        else:
            self.bpf.detach_tracepoint(tp="raw_syscalls:sys_enter")


class HookSwitch:
    """Idle programs of bpf/detail_hooks.bpf.c on ``tracepoints`` (an idle sys_exit_X hook: the dispatch the
    agent's detail exits cost every syscall; an idle sys_enter_X hook: the entry dispatch it avoids), loaded
    once, attached only while their loop is measured."""

    EXIT = ("syscalls:sys_exit_execve",)
    ENTRY = ("syscalls:sys_enter_execve",)

    def __init__(self, bpf: Any, tracepoints: tuple[str, ...] = EXIT) -> None:
        self.bpf, self.tracepoints = bpf, tracepoints
        self.off()  # bcc attaches TRACEPOINT_PROBE programs as it loads them

    def on(self) -> None:
        for tp in self.tracepoints:
            self.bpf.attach_tracepoint(tp=tp, fn_name="tracepoint__" + tp.replace(":", "__"))

    def off(self) -> None:
        for tp in self.tracepoints:
            with contextlib.suppress(Exception):  # not attached
                self.bpf.detach_tracepoint(tp=tp)


Floors = tuple[AttachSwitch, AttachSwitch, HookSwitch, HookSwitch]  # raw_syscalls floor, raw floor, exit, entry


@contextmanager
def loaded_floors() -> Iterator[Floors]:
    """Both count-only floors and the idle detail exit and entry hooks, compiled and loaded once, detached;
    unloaded after."""
    ensure_tracefs()
    ensure_kernel_headers()
    bcc = _import_bcc()
    tp = bcc.BPF(src_file=str(BPF_DIR / "floor.bpf.c"))
    raw = bcc.BPF(src_file=str(BPF_DIR / "floor_raw.bpf.c"))
    hooks = bcc.BPF(src_file=str(BPF_DIR / "detail_hooks.bpf.c"))
    try:
        yield (AttachSwitch(tp, raw=False), AttachSwitch(raw, raw=True), HookSwitch(hooks, HookSwitch.EXIT),
               HookSwitch(hooks, HookSwitch.ENTRY))
    finally:
        tp.cleanup()
        raw.cleanup()
        hooks.cleanup()


@dataclass(frozen=True, slots=True)
class FloorRound:
    """The loop bare and under each count-only floor, alternated in short loops (attaching a loaded floor
    takes milliseconds, so the host's slow drifts hit all three alike)."""

    bare_ns: list[float]
    tp_ns: list[float]  # under the raw_syscalls-tracepoint floor: the reference of the targets
    raw_ns: list[float]  # under the raw-tracepoint floor: the same count on Sysgram's cheaper hook
    raw_bpf_ns: float | None  # the raw floor's BPF run time per loop syscall (kernel stats)
    hooked_ns: list[float] = field(default_factory=list)  # raw floor + idle detail exit hook (detail_hooks.bpf.c)
    entry_hooked_ns: list[float] = field(default_factory=list)  # the same + an idle sys_enter_X hook

    @property
    def tp_added(self) -> float:
        return statistics.median(t - b for b, t in zip(self.bare_ns, self.tp_ns, strict=True))

    @property
    def raw_added(self) -> float:
        return statistics.median(r - b for b, r in zip(self.bare_ns, self.raw_ns, strict=True))

    @property
    def hooked_added(self) -> float:
        """The raw floor with the per-syscall dispatch the agent's detail exit hooks cost every syscall."""
        if not self.hooked_ns:
            return self.raw_added
        return statistics.median(h - b for b, h in zip(self.bare_ns, self.hooked_ns, strict=True))

    @property
    def entry_dispatch(self) -> float | None:
        """What one idle sys_enter_X program adds to every syscall (the kernel's entry dispatcher): the
        median of the paired differences with and without it, both loops with the exit hook on."""
        if not self.entry_hooked_ns or not self.hooked_ns:
            return None
        return statistics.median(e - h for h, e in zip(self.hooked_ns, self.entry_hooked_ns, strict=True))


def floor_round(loop: Path, tp: AttachSwitch, raw: AttachSwitch, cycles: int, n: int,
                hooks: HookSwitch | None = None, entry_hook: HookSwitch | None = None) -> FloorRound:
    """``cycles`` x (bare, ``tp`` attached, ``raw`` attached, ``raw`` with ``hooks`` attached, and with
    ``entry_hook`` too) loops of ``n``, then one loop under ``raw`` with the kernel's BPF stats on."""
    bare_ns: list[float] = []
    tp_ns: list[float] = []
    raw_ns: list[float] = []
    hooked_ns: list[float] = []
    entry_hooked_ns: list[float] = []
    kinds: list[tuple[list[Any], list[float]]] = [([tp], tp_ns), ([raw], raw_ns)]
    if hooks is not None:
        kinds.append(([raw, hooks], hooked_ns))
        if entry_hook is not None:
            kinds.append(([raw, hooks, entry_hook], entry_hooked_ns))
    for _ in range(cycles):
        bare_ns.append(_loop_ns(loop, n))
        for switches, into in kinds:
            try:
                for switch in switches:
                    switch.on()
                into.append(_loop_ns(loop, n))
            finally:
                for switch in switches:
                    switch.off()
    raw_bpf: float | None = None
    with bpf_stats() as on:
        if on:
            before = raw.run_ns()[0]
            raw.on()
            try:
                _loop_ns(loop, n)
            finally:
                raw.off()
            raw_bpf = (raw.run_ns()[0] - before) / n
    return FloorRound(bare_ns, tp_ns, raw_ns, raw_bpf if raw_bpf else None, hooked_ns, entry_hooked_ns)


def run(quick: bool = False) -> list[Figure]:
    ensure_tracefs()
    ensure_kernel_headers()
    n = 1_000_000 if quick else 5_000_000
    rounds = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp, loaded_floors() as (floor_tp, floor_raw, hooks, entry_hook):
        exe = _build_loop(Path(tmp))
        audit = audit_reference(exe, lambda: loop_times(str(exe), n // 50), rounds)  # auditd costs ~100x more
        source = LiveSource(detail_syscalls=set())
        source.start()
        assert source.tracer is not None
        settings = {"floor_tp": floor_tp, "floor_raw": floor_raw, "sysgram": AttachSwitch(source.tracer.bpf, raw=True)}
        times: dict[str, list[float]] = {"bare": [], **{k: [] for k in settings}}
        consumed = [0]
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                group = source.get(0.05)
                if group:
                    consumed[0] += sum(len(c) for c in group if isinstance(c, np.ndarray))

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        cpu_s = 0.0
        for _ in range(rounds):
            times["bare"].append(_loop_ns(exe, n))
            for name, switch in settings.items():
                switch.on()
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                times[name].append(_loop_ns(exe, n))
                if name == "sysgram":
                    source.flush_all()
                    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                    cpu_s += (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
                switch.off()
        per_call = _program_rounds(settings, exe, max(n // 5, 100_000), rounds)
        paired = floor_round(exe, settings["floor_tp"], settings["floor_raw"], 10 if not quick else 3,
                             200_000 if not quick else 100_000, hooks=hooks, entry_hook=entry_hook)
        time.sleep(0.3)
        source.flush_all()
        time.sleep(0.3)
        drops = source.drops()
        stop.set()
        drainer.join()
        source.close()
        events = max(1, consumed[0])
    # best of the interleaved rounds: the host's noise only ever adds time
    best = {k: min(v) for k, v in times.items()}
    bare_ns = best["bare"]
    added = {k: best[k] - bare_ns for k in settings}
    return [
        Figure(PART, "getppid bare", round(bare_ns, 1), "CPU ns/syscall"),
        Figure(PART, "getppid + floor (count-only, raw tracepoint)", round(best["floor_raw"], 1), "CPU ns/syscall"),
        Figure(PART, "getppid + floor (count-only, raw_syscalls tracepoint)", round(best["floor_tp"], 1), "CPU ns/syscall"),
        Figure(PART, "getppid + sysgram capture", round(best["sysgram"], 1), "CPU ns/syscall"),
        Figure(PART, "floor added (raw tracepoint: the cheapest tracer)", round(added["floor_raw"], 1), "CPU ns/syscall"),
        Figure(PART, "floor added (raw_syscalls tracepoint)", round(added["floor_tp"], 1), "CPU ns/syscall"),
        Figure(PART, "sysgram added", round(added["sysgram"], 1), "CPU ns/syscall"),
        Figure(
            PART,
            "sysgram added / floor added (raw tracepoint)",
            added_ratio(added["sysgram"], added["floor_raw"]),
            "x",
            "<= 1.5 (goal 1.3)",
        ),
        Figure(
            PART,
            "sysgram added / floor added (raw_syscalls tracepoint)",
            added_ratio(added["sysgram"], added["floor_tp"]),
            "x",
            "<= 1.5 (goal 1.3)",
        ),
        *_program_figures(per_call),
        *_kernel_accounted(paired, per_call),
        _entry_dispatch_figure(paired),
        *audit.figures(PART, bare_ns, added["sysgram"]),
        Figure(PART, "syscall rate under capture", round(1e3 / best["sysgram"], 2), "M/s"),
        Figure(PART, "events consumed", events, "events"),
        Figure(PART, "drops (all stages)", sum(drops.values()), "events", "0"),
        Figure(PART, "userspace CPU per million events", round(cpu_s / events * 1e6, 3), "CPU s"),
    ]


def _program_rounds(settings: dict[str, AttachSwitch], exe: Path, n: int, rounds: int) -> dict[str, list[float]]:
    """Each program's run time per call (ns) in ``rounds`` more loops of ``n`` with the kernel's BPF stats
    on, the programs in turn each round (the stats add two clock reads to every run, so the loop-time
    rounds above are measured with them off). Empty where the kernel keeps no stats."""
    per_call: dict[str, list[float]] = {name: [] for name in settings}
    with bpf_stats() as on:
        if not on:
            return {}
        for _ in range(rounds):
            for name, switch in settings.items():
                ns0, runs0 = switch.run_ns()
                switch.on()
                try:
                    _loop_ns(exe, n)
                finally:
                    switch.off()
                ns1, runs1 = switch.run_ns()
                if runs1 <= runs0:
                    return {}
                per_call[name].append((ns1 - ns0) / (runs1 - runs0))
    return per_call


def _kernel_accounted(paired: FloorRound, per_call: dict[str, list[float]]) -> list[Figure]:
    """Sysgram's added cost with its extra over the raw floor read from the kernel: the raw floor's added
    cost + the median of Sysgram's BPF run time per call over that floor's (the statistics' clock reads
    cancel), over the ``raw_syscalls`` floor's added cost. Both floors' added costs are medians of paired
    short loops (``floor_round``): the host's drifts, as large as the costs measured, cancel there and
    never reach the kernel's figures."""
    name = "sysgram added / floor added (raw_syscalls tracepoint), kernel-accounted"
    if not per_call:
        return [Figure(PART, name, "not measured: kernel BPF stats unavailable")]
    extra = statistics.median(s - f for s, f in zip(per_call["sysgram"], per_call["floor_raw"], strict=True))
    return [
        Figure(PART, "floor added (raw_syscalls / raw tracepoint), median of paired short loops",
               f"{paired.tp_added:.1f} / {paired.raw_added:.1f}", "CPU ns/syscall"),
        # here the capture's own process and exec hooks stay attached through every loop, bare included, so
        # this is ~ the raw floor; in e2e (no agent in the bare loops) it carries their per-syscall dispatch
        Figure(PART, "raw floor + idle detail exit hook added, median of paired short loops",
               round(paired.hooked_added, 1), "CPU ns/syscall"),
        Figure(PART, "sysgram's BPF time per call over the raw floor's (kernel stats, median)", round(extra, 1), "ns"),
        Figure(PART, name, added_ratio(paired.hooked_added + extra, paired.tp_added), "x", "<= 1.5 (goal 1.3)"),
    ]


def _entry_dispatch_figure(paired: FloorRound) -> Figure:
    """Why detail entries are kept by the raw sys_enter program: what one idle sys_enter_X program costs
    every syscall, with the capture loaded and draining (so the floor under it is the agent's own)."""
    name = "an idle sys_enter_X hook added (the entry dispatch the capture avoids), median of paired short loops"
    value = paired.entry_dispatch
    return Figure(PART, name, "not measured" if value is None else round(value, 1), "CPU ns/syscall")


def _program_figures(per_call: dict[str, list[float]]) -> list[Figure]:
    """Each program's own run time per call (kernel BPF stats, median of the rounds; includes the stats'
    own clock reads, the same for all three), beside the loop-time figures, which the noise moves more."""
    if not per_call:
        return [Figure(PART, "BPF program run time", "not measured: kernel BPF stats unavailable")]
    median = {name: statistics.median(values) for name, values in per_call.items()}
    return [
        Figure(PART, "BPF run time per call: floor (raw tracepoint)", round(median["floor_raw"], 1), "ns"),
        Figure(PART, "BPF run time per call: floor (raw_syscalls tracepoint)", round(median["floor_tp"], 1), "ns"),
        Figure(PART, "BPF run time per call: sysgram", round(median["sysgram"], 1), "ns"),
    ]

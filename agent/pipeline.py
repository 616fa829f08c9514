"""The thin orchestrator: wires capture -> process table -> windows/scorer -> rules/seccomp -> verdict ->
outputs/enforcement. Live capture and replay feed it the same chunks (see agent/capture/source.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from agent._abi import AbiWatch
from agent._text import escape_controls
from agent.capture.names import syscall_name
from agent.capture.source import Chunk, LiveSource, ReplaySource
from agent.events import FLAG_COMPAT, DetailEvent, KernelSignal, ProcEvent
from agent.memory import release_free_memory
from agent.proc import ProcessInfo, ProcessTable
from agent.proc._table import CRED_SYSCALLS
from agent.verdict import DecisionTable, Evidence, Verdict

if TYPE_CHECKING:  # pyarrow (the recording format) is loaded only by the commands that record or replay
    from agent.capture.recording import RecordingWriter

ANOMALY_RULE = "Sysgram anomalous syscall sequence"
SECCOMP_RULE = "Sysgram seccomp policy violation"
BLOCK_RULE = "Sysgram blocked a process"
# a block a rule asked for and the enforcer refused (PID 1, an allow-listed program, a reused pid...): its own
# name, so a count of blocks is a count of blocks
BLOCK_REFUSED_RULE = "Sysgram did not block a process"
NOT_ENFORCED = "not enforced: no enforcer here (a replay, or the tracer not yet attached)"
BLOCK_WITHDRAWN_RULE = "Sysgram withdrew a block"  # after its "blocked" alert: the signal never went
# A syscall through the other ABI's gate than the process's executable: a 64-bit program's `int 0x80` (i386
# numbers, which native per-syscall hooks and native deny lists do not see) or a 32-bit program switching to
# 64-bit code. Rare in legitimate software; a known way round syscall monitoring.
ABI_RULE_32_IN_64 = "Sysgram 32-bit syscalls from a 64-bit program"
ABI_RULE_64_IN_32 = "Sysgram 64-bit syscalls from a 32-bit program"
ABI_PRIORITY: Final = "Warning"
ABI_MAX_NAMES = 16
OVERLOAD_RULE = "Sysgram internal: syscall event drop"  # named after Falco's "Falco internal: syscall event drop"
OVERLOAD_PRIORITY: Final = "Critical"  # lost events are blind spots an attacker can make on purpose
OVERLOAD_INTERVAL_NS = 30_000_000_000  # at most one overload alert per 30 s
SAMPLE_INTERVAL_S = 1.0  # how often drops and model stats are sampled into the metrics
# /healthz says "stalled" when the pipeline loop or the capture reader has not turned for this long: far
# above a turn under load (one queued group; at most DETAIL_TURN_BUDGET details), so a probe that restarts
# the agent does not fire on load
STALL_AFTER_S = 30.0
DETECTOR_SLICE_ROWS = 65536
# The agent runs ahead of the workloads it watches (auditd boosts itself likewise: priority_boost = 4):
# at nice 0 a busy host's fair share left it ~0.3 cores and it dropped events (docs/performance.md).
AGENT_NICE = -10
# glibc keeps memory freed after a burst (a backlog, a churn of processes) for later: RSS stayed at each
# burst's high-water mark. Handing it back costs ~1-6 ms of the pipeline thread (docs/performance.md).
TRIM_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class Filters:
    """Which processes a recording keeps: these pids and their descendants, these comms, these exes."""

    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    exes: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.pids or self.comms or self.exes)


@dataclass
class Pipeline:
    table: ProcessTable
    recorder: RecordingWriter | None = None
    filters: Filters = field(default_factory=Filters)
    detector: Any = None  # agent.model.AnomalyDetector
    engine: Any = None  # agent.falco.Engine
    policy: Any = None  # agent.seccomp.PolicyEvaluator
    decisions: DecisionTable = field(default_factory=DecisionTable)
    outputs: Any = None  # agent.respond.Outputs
    enforcer: Any = None  # agent.enforce.Enforcer
    on_tracer: Callable[[Any], None] | None = None  # called with the live tracer once it is attached
    # the kernel flags each 32-bit syscall (agent/capture/_btf.py); else a 32-bit executable's are marked
    kernel_compat: bool = False
    # called once when the host first runs 32-bit code: attaches the 32-bit syscalls' exit program (True: did)
    on_compat: Callable[[], bool] | None = None
    counters: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._matched: set[int] = set()
        self._comms = {c[:15] for c in self.filters.comms}  # the kernel keeps 15 characters of a comm
        self._lock = threading.Lock()
        self.latencies_ns: list[int] = []
        self._drops_seen: dict[str, int] = {}  # last sampled totals, for the metrics' increments
        self._drops_reported: dict[str, int] = {}  # totals at the last overload alert
        self._events_reported = 0
        self._last_overload_ns: int | None = None
        self._model_seen: dict[str, int] = {}
        self._abi = AbiWatch()
        self._compat_seen = False

    @property
    def metrics(self) -> Any:
        """The running agent.respond.Metrics, or None without outputs."""
        return self.outputs.metrics if self.outputs is not None else None

    # -- filters (record) --------------------------------------------------------------------------
    def _matches(self, pid: int) -> bool:
        if not self.filters.active:
            return True
        if pid in self._matched:
            return True
        info = self.table.get(pid)
        if info is None:
            return False
        if info.comm in self._comms or info.exe in self.filters.exes or pid in self.filters.pids:
            self._matched.add(pid)
            return True
        return False

    def seed(self) -> None:
        """Every process alive now, before the tracer starts (the enforcer protects them from its start)."""
        self.table.seed()
        self._seeded(self.table.snapshot())

    def seed_new(self) -> None:
        """Once the tracer runs: the processes born since :meth:`seed`. Their fork came before the tracer,
        so without this they would run unnamed (a short one exits before a lazy /proc read finds it)."""
        self._seeded(self.table.seed_new())

    def _seeded(self, processes: list[ProcessInfo]) -> None:
        if self.recorder is not None:
            for info in processes:
                if self._matches(info.pid):
                    self.recorder.add_process(info)
        if self.enforcer is not None:
            self.enforcer.protect_processes(processes)

    # -- the one entry point ------------------------------------------------------------------------
    def handle(self, group: Iterable[Chunk]) -> None:
        with self._lock:
            for chunk in group:
                if isinstance(chunk, np.ndarray):
                    self._syscalls(chunk)
                elif isinstance(chunk, ProcEvent):
                    self._proc(chunk)
                elif isinstance(chunk, KernelSignal):
                    self._kernel_block(chunk)
                else:
                    self._detail(chunk)

    def _syscalls(self, batch: np.ndarray) -> None:
        if not len(batch):
            return
        self.counters["syscalls"] += len(batch)
        if self.metrics is not None:
            self.metrics.events.inc(len(batch))
        tgid = batch["tgid"]
        # Rows come in runs of one process: the batch's processes are the run heads, not a sort of every row.
        heads = np.empty(len(tgid), dtype=bool)
        heads[0] = True
        np.not_equal(tgid[1:], tgid[:-1], out=heads[1:])
        pids = set(tgid[heads].tolist())
        exe_of, program_of = self.table.exe_and_program_of(pids)  # also reads processes not seen yet
        exe_compat = self.table.compat_mask(tgid) if self.table.has_compat else None
        if exe_compat is not None and not self.kernel_compat and exe_compat.any():
            batch = batch.copy()
            batch["flags"][exe_compat] |= FLAG_COMPAT
        flagged = bool(batch["flags"].any())  # rows carry no flag but FLAG_COMPAT
        if flagged and not self._compat_seen and self.on_compat is not None:
            self.note_compat_code(int(batch["tgid"][np.flatnonzero(batch["flags"])[0]]))
        elf_compat_pids = set(np.unique(tgid[exe_compat]).tolist()) if exe_compat is not None and exe_compat.any() \
            else set()
        self._check_abi(batch, heads, pids, flagged, elf_compat_pids)
        if self.recorder is not None:
            if self.filters.active:
                keep = np.array([t for t in sorted(pids) if self._matches(t)], dtype=np.uint32)
                batch = batch[np.isin(batch["tgid"], keep)]
            self.recorder.add_syscalls(batch)
        if self.detector is not None:
            # bounded slices keep the detector's per-window temporaries small after a backlog
            for start in range(0, len(batch), DETECTOR_SLICE_ROWS):
                for anomaly in self.detector.push(batch[start:start + DETECTOR_SLICE_ROWS], exe_of, program_of):
                    self._anomaly(anomaly)

    def note_compat_code(self, pid: int) -> None:
        """The host runs 32-bit code (``pid``'s): from now on 32-bit syscalls' details are traced too."""
        self._compat_seen = True
        assert self.on_compat is not None
        if self.on_compat():
            self.counters["compat_details_started"] += 1
            print(f"sysgram: note: pid {pid} runs 32-bit code: 32-bit syscalls' arguments are traced from now on "
                  "(a raw sys_exit program, ~11 ns on every syscall; compat_details in the config)",
                  file=sys.stderr, flush=True)

    def _check_abi(
        self, batch: np.ndarray, heads: np.ndarray, pids: set[int], flagged: bool, elf_compat_pids: set[int]
    ) -> None:
        """Alert once per process whose syscalls went through the other ABI's gate than its program's."""
        for found in self._abi.check(batch, heads, pids, flagged, self.table.compat_of, elf_compat_pids):
            info = self.table.get(found.pid)
            compat = not found.program_compat  # the odd syscalls' ABI
            names = list(dict.fromkeys(syscall_name(int(nr), compat=compat) for nr in found.rows["nr"]))
            names = names[:ABI_MAX_NAMES]
            self.counters["abi_mismatches"] += 1
            rule = ABI_RULE_32_IN_64 if compat else ABI_RULE_64_IN_32
            exe = info.exe if info is not None else ""
            comm = info.comm if info is not None else ""
            output = (
                f"{'64' if compat else '32'}-bit program {exe or comm or '?'} (pid={found.pid} comm={comm}) made "
                f"{'32' if compat else '64'}-bit syscalls: {' '.join(names)}"
                + (" (through int 0x80)" if compat else "")
            )
            fields = {
                "proc.pid": found.pid, "proc.ppid": info.ppid if info else None, "proc.exe": exe or None,
                "proc.name": comm or None, "proc.cmdline": info.cmdline if info else None, "evt.type": names[0],
                "sysgram.abi.syscalls": names, "sysgram.abi.syscall_abi": "i386" if compat else "x86_64",
            }
            self._send(rule, ABI_PRIORITY, output, fields, ("sysgram", "evasion"), int(found.rows["ts"][0]))

    def _proc(self, event: ProcEvent) -> None:
        self.counters["proc_events"] += 1
        if (
            event.kind == "fork"
            and not event.is_thread
            and self.filters.active
            and event.ppid in self._matched
        ):
            self._matched.add(event.pid)
        if event.kind == "exec":
            self._abi.on_exec(event.pid, event.ts, event.image_compat)
            if event.image_compat and not self._compat_seen and self.on_compat is not None:
                self.note_compat_code(event.pid)
        elif event.kind == "fork" and not event.is_thread:
            self._abi.on_fork(event.pid, event.ppid, event.ts)
        self.table.apply(event)
        if event.kind == "exec" and self.enforcer is not None:
            # The kernel matched the path string given to exec (./x, symlinks and a/../x get past it):
            # apply the per-exe policy again by what the process really runs.
            info = self.table.get(event.pid)
            self.enforcer.on_exec(event.pid, info.exe if info is not None else event.filename)
        if self.engine is not None:
            self.engine.on_proc_event(event)
        if self.detector is not None:
            if event.kind == "fork":
                self.detector.on_fork(event.pid, event.tid, event.ts)
            elif event.kind == "exec":
                self.detector.on_exec(event.pid, (event.tid,), event.ts)
            elif event.kind == "exit":
                self.detector.on_exit(event.tid, event.ts)  # its last syscalls may still be on their way
                if event.tid == event.pid:
                    self.detector.on_process_exit(event.pid, event.ts)
        if self.recorder is not None and self._matches(event.pid):
            self.recorder.add_event(event)

    def _detail(self, event: DetailEvent) -> None:
        self.counters["details"] += 1
        if event.syscall in ("execve", "execveat") and event.res == 0:
            self.table.apply_exec_detail(event)
            if self.recorder is not None and self._matches(event.tgid):
                info = self.table.get(event.tgid)
                if info is not None:
                    self.recorder.add_process(info)
        if self.recorder is not None and self._matches(event.tgid):
            self.recorder.add_event(event)
        matches = []
        if self.engine is not None:
            matches = self.engine.evaluate(event)
            self.counters["rules_evaluated"] += 1
            if self.metrics is not None:
                self.metrics.rules_evaluated.inc()
            for m in matches:
                self.counters["rule_matches"] += 1
                if self.metrics is not None:
                    self.metrics.rule_matches.labels(rule=m.rule).inc()
        others: list[Evidence] = []  # what the rules are cross-checked with
        if self.policy is not None:
            info = self.table.get(event.tgid)
            if info is not None:
                decision = self.policy.evaluate(info, event.syscall, event.raw_args)
                if decision is not None and decision.violation:
                    others.append(
                        Evidence("seccomp", decision.rule, detail=os.path.basename(decision.profile))
                    )
        if event.syscall in CRED_SYSCALLS:  # after the rules: they judge the call by who made it, as Falco does
            self.table.apply_creds_detail(event)
        if not matches and not others:
            return
        state = self.detector.state(event.tgid) if self.detector is not None else None
        detail = "score"
        if self.detector is not None and event.syscall in ("execve", "execveat") and not (
                state is not None and state.is_anomalous):
            # a program just exec'd has no state worth reading: what started it is the evidence (the process
            # before its exec, else its parent), as the rules' sysgram.anomaly.spawner.* fields read it
            info = self.table.get(event.tgid)
            state = self.detector.exec_origin(event.tgid) or (
                self.detector.state(info.ppid) if info is not None and info.ppid > 0 else None)
            detail = f"its spawner (pid {state.pid}, {os.path.basename(state.exe)}) scored" if state else detail
        if state is not None and state.is_anomalous:
            others.append(
                Evidence("anomaly", ANOMALY_RULE, score=state.score, detail=f"{detail} {state.score:.2f}")
            )
        # As Falco does, every rule the event matched is its own alert; each is cross-checked with the
        # same seccomp and anomaly evidence. A seccomp violation no rule matched is an alert of its own.
        decided: list[tuple[Verdict, Any]] = []
        for m in matches:
            verdict = self.decisions.decide([Evidence("rule", m.rule, m.priority, tuple(m.tags), m.output), *others])
            if verdict is not None:
                decided.append((verdict, m))
        if not matches and any(e.kind == "seccomp" for e in others):
            verdict = self.decisions.decide(others)
            if verdict is not None:
                decided.append((verdict, None))
        if decided:
            self._emit(decided, event.tgid, event.ts)

    def _anomaly(self, anomaly: Any) -> None:
        """One anomaly from the detector (a summary of held-back ones too): counted, decided, alerted."""
        self.counters["anomalies"] += 1
        if self.metrics is not None:
            self.metrics.anomalies.inc()
        verdict = self.decisions.decide(
            [Evidence("anomaly", ANOMALY_RULE, score=anomaly.process_score, detail=anomaly.explanation)]
        )
        if verdict is None or self.outputs is None:
            return
        fields = dict(anomaly.output_fields())
        info = self.table.get(anomaly.pid)
        if info is not None and ((info.exe and anomaly.exe and info.exe != anomaly.exe) or info.start_ns > anomaly.ts):
            info = None  # the pid names another process now (a summary goes out a minute after its anomaly)
        fields["proc.ppid"] = info.ppid if info else None
        fields["proc.cmdline"] = info.cmdline if info else None
        if info is not None and info.comm:  # Falco's proc.name is the comm, as in our rule alerts for the pid
            fields["proc.name"] = info.comm
        fields.update(
            {
                "sysgram.verdict.severity": verdict.severity,
                "sysgram.verdict.action": verdict.action,
                "sysgram.verdict.explanation": verdict.explanation,
            }
        )
        output = (
            f"Anomalous syscall sequence by {fields['proc.name']} (pid={anomaly.pid} exe={anomaly.exe} "
            f"score={anomaly.process_score:.2f} threshold={anomaly.process_threshold:.2f}): {anomaly.explanation}"
        )
        if anomaly.new_since_alert:
            output += f" (follow-up: since its last alert it also made {' '.join(anomaly.new_since_alert)})"
        if anomaly.held_back:
            pids = " ".join(map(str, anomaly.held_back_pids)) + (
                " ..." if anomaly.held_back > len(anomaly.held_back_pids) else "")
            output = (
                f"{anomaly.held_back} anomalous processes of {anomaly.exe} were held back by the per-program "
                f"alert limit (pids {pids}); the highest-scoring of them: {output}"
            )
        self._send(ANOMALY_RULE, verdict.severity, output, fields, ("sysgram", "anomaly"), anomaly.ts)

    def _emit(self, decided: list[tuple[Verdict, Any]], pid: int, ts: int) -> None:
        """Alerts for one event's verdicts (one per matched rule); the process is blocked at most once."""
        blocked: dict[str, Any] = {}
        for verdict, match in decided:
            self.counters["verdicts"] += 1
            fields: dict[str, Any] = {}
            rule, output, tags = SECCOMP_RULE, verdict.explanation, ("sysgram", "seccomp")
            if match is not None:
                rule, output, tags = match.rule, match.output, tuple(match.tags)
                fields.update(match.output_fields)
            fields.setdefault("proc.pid", pid)
            fields.update(
                {
                    "sysgram.verdict.severity": verdict.severity,
                    "sysgram.verdict.action": verdict.action,
                    "sysgram.verdict.reasons": list(verdict.reasons),
                    "sysgram.verdict.explanation": verdict.explanation,
                }
            )
            if verdict.action == "block" and self.enforcer is not None and not blocked:
                blocked = self._block(pid, rule, verdict, fields, ts)
            elif verdict.action == "block" and self.enforcer is None:
                # a replay, or the moment before the tracer is up: the verdict says block, nothing can act
                fields["sysgram.action"] = NOT_ENFORCED
            fields.update(blocked)
            if verdict.action != "log":
                self._send(rule, verdict.severity, output, fields, tags, ts)

    def _block(self, pid: int, rule: str, verdict: Verdict, fields: dict[str, Any], ts: int) -> dict[str, Any]:
        """Block ``pid``; raise the alert that says what was done; -> the field naming the action taken."""
        record = self.enforcer.block(pid, f"{rule}: {verdict.explanation}")
        self.counters["blocks" if record.done else "blocks_refused"] += 1
        if self.metrics is not None:
            self.metrics.block(record.signal if record.done else "refused")
        action = {"sysgram.action": f"{record.signal} sent" if record.done else record.reason}
        self.latencies_ns.append(time.monotonic_ns() - ts)
        self._send(
            BLOCK_RULE if record.done else BLOCK_REFUSED_RULE,
            "Critical",
            f"Sysgram {'blocked' if record.done else 'did not block'} pid {pid} ({record.signal}): "
            f"{rule}" + ("" if record.done else f"; {record.reason}"),
            {**fields, **action},
            ("sysgram", "enforcement"),
            ts,
        )
        return action

    def _alert_withdrawn(self) -> None:
        """A block withdrawn before its signal went (the process became one never to block: an exec of an
        allow-listed program): its "blocked" alert is out, so this one says the signal never went."""
        if self.enforcer is None:
            return
        for record in self.enforcer.take_withdrawn():
            self.counters["blocks_withdrawn"] += 1
            if self.metrics is not None:
                self.metrics.block("withdrawn")
            info = self.table.get(record.pid)
            self._send(
                BLOCK_WITHDRAWN_RULE, "Critical",
                f"Sysgram withdrew its block of pid {record.pid} ({record.signal}) before the signal went: "
                f"{record.reason.removeprefix('withdrawn: ')}",
                {"proc.pid": record.pid, "proc.exe": info.exe if info is not None else None,
                 "proc.name": info.comm if info is not None else None, "sysgram.action": record.reason},
                ("sysgram", "enforcement"), time.monotonic_ns(),
            )

    def _kernel_block(self, event: KernelSignal) -> None:
        """The BPF program signalled a process. When the agent asked for it (a verdict), the block alert is
        already out; otherwise an in-kernel policy (deny_syscalls) decided, and this records it."""
        self.counters["kernel_signals"] += 1
        if not event.by_policy:  # the signal a verdict armed: its block alert is already out
            return
        info = self.table.get(event.pid)
        exe = info.exe if info is not None else ""
        action, signal_name = {9: ("kill", "SIGKILL"), 19: ("stop", "SIGSTOP")}.get(event.signal, ("kill", "signal"))
        denied = syscall_name(event.nr, compat=event.compat)
        self.counters["blocks"] += 1
        if self.metrics is not None:
            self.metrics.block(action)  # labelled as the agent's own blocks are: kill | stop | refused
        output = (
            f"Sysgram blocked pid {event.pid} ({signal_name}): the in-kernel policy for {exe or 'its program'} "
            f"denies {denied}" + (" (a 32-bit syscall)" if event.compat else "")
        )
        fields = {
            "proc.pid": event.pid,
            "proc.exe": exe or None,
            "proc.name": info.comm if info is not None else None,
            "evt.type": denied,
            "sysgram.action": f"{signal_name} sent (in kernel)",
        }
        self._send(BLOCK_RULE, "Critical", output, fields, ("sysgram", "enforcement"), event.ts)

    def _send(
        self, rule: str, priority: str, output: str, fields: dict[str, Any], tags: tuple[str, ...], ts: int
    ) -> None:
        self.counters["alerts"] += 1
        if self.outputs is None:
            return
        from agent.respond import Alert

        boot_to_wall = time.time_ns() - time.monotonic_ns()
        # one line whatever the process put in its exe, comm or argv (rule outputs are escaped already)
        alert = Alert.new(rule, priority, escape_controls(output), fields, tags=tags, time_ns=ts + boot_to_wall)  # type: ignore[arg-type]
        self.outputs.sink.emit(alert)

    def on_falco_alert(self, falco_alert: Any) -> None:
        """A real Falco's alert, ingested: cross-checked with the process's anomaly state."""
        self.counters["falco_alerts"] += 1
        # A pid from another host's Falco names some other process here: never correlate or block by it.
        pid = falco_alert.output_fields.get("proc.pid") if falco_alert.is_local else None
        evidence = [
            Evidence(
                "falco", falco_alert.rule, falco_alert.priority, tuple(falco_alert.tags), falco_alert.output
            )
        ]
        state = None
        if isinstance(pid, int) and self.detector is not None:
            state = self.detector.state(pid)
        if state is not None and state.is_anomalous:
            evidence.append(Evidence("anomaly", ANOMALY_RULE, score=state.score))
        verdict = self.decisions.decide(evidence)
        if verdict is None:
            return
        fields = dict(falco_alert.output_fields)
        fields.update(
            {
                "sysgram.verdict.severity": verdict.severity,
                "sysgram.verdict.action": verdict.action,
                "sysgram.verdict.explanation": verdict.explanation,
                "sysgram.source": "falco",
                "sysgram.anomaly.score": state.score if state else None,
                "sysgram.anomaly.is_anomalous": bool(state and state.is_anomalous),
                "sysgram.remote": not falco_alert.is_local,
            }
        )
        with self._lock:
            if verdict.action == "block" and self.enforcer is not None and isinstance(pid, int):
                fields.update(self._block(pid, f"falco: {falco_alert.rule}", verdict, fields, time.monotonic_ns()))
            self._send(
                falco_alert.rule,
                verdict.severity,
                falco_alert.output,
                fields,
                tuple(falco_alert.tags),
                time.monotonic_ns(),
            )

    # -- housekeeping ---------------------------------------------------------------------------------
    def reap(self, now_ns: int) -> None:
        """Forget what exited long enough before ``now_ns`` (CLOCK_MONOTONIC, as event times are): the
        table's exited processes, the detector's windows of exited threads (on a quiet host no syscall
        moves the detector's own clock)."""
        with self._lock:
            self._alert_withdrawn()
            self.table.reap(now_ns)
            self._abi.forget(lambda pid: pid not in self.table)
            if self.detector is not None:
                self.detector.settle(now_ns)
                self._held_back(now_ns)

    def _held_back(self, now_ns: int | None) -> None:
        """Alert the detector's summaries of anomalies its per-program limit held back (due ones; all when
        ``now_ns`` is None)."""
        if self.detector is None:
            return
        for anomaly in self.detector.release_held(now_ns):
            self._anomaly(anomaly)

    def finish(self) -> None:
        """The stream ended: what is still held back goes out now (nothing judged anomalous is lost)."""
        with self._lock:
            self._held_back(None)
            self._alert_withdrawn()

    # -- periodic sampling: drops and model counters into the metrics; the overload alert ------------------
    def sample(self, drops: dict[str, int], now_ns: int | None = None) -> None:
        """Fold the source's drop totals (and the model's counters) into the metrics; raise the overload
        alert when any stage lost events since the last one, at most once per OVERLOAD_INTERVAL_NS."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            metrics = self.metrics
            if metrics is not None:
                for stage, total in drops.items():
                    grew = total - self._drops_seen.get(stage, 0)
                    metrics.drops.labels(stage=stage).inc(max(0, grew))  # every stage shown, even at 0
                if self.detector is not None:
                    model = dict(self.detector.stats)
                    for key, counter in (("windows_scored", metrics.windows_scored),
                                         ("windows_known", metrics.windows_known),
                                         ("cache_hits", metrics.cache_hits),
                                         ("anomalies_suppressed", metrics.anomalies_suppressed)):
                        grew = model.get(key, 0) - self._model_seen.get(key, 0)
                        if grew > 0:
                            counter.inc(grew)
                    self._model_seen = model
            self._drops_seen = dict(drops)
            lost = {s: n - self._drops_reported.get(s, 0) for s, n in drops.items()}
            if sum(v for v in lost.values() if v > 0) <= 0:
                return
            if self._last_overload_ns is not None and now_ns - self._last_overload_ns < OVERLOAD_INTERVAL_NS:
                return  # still counted: the next alert reports everything lost since this one
            self._overload(lost, now_ns)
            self._drops_reported = dict(drops)
            self._last_overload_ns = now_ns

    def _overload(self, lost: dict[str, int], now_ns: int) -> None:
        events = self.counters["syscalls"]
        seen = events - self._events_reported
        self._events_reported = events
        n_drops = sum(v for v in lost.values() if v > 0)
        since = "the agent started" if self._last_overload_ns is None else (
            f"the last {(now_ns - self._last_overload_ns) / 1e9:.0f} s"
        )
        by_stage = ", ".join(f"{s}={n}" for s, n in sorted(lost.items()) if n > 0)
        output = (
            f"Sysgram internal: syscall event drop. {n_drops} syscall events dropped since {since} "
            f"({by_stage}); the host outruns the agent, events are not being inspected"
        )
        fields: dict[str, Any] = {
            "n_drops": n_drops,
            "n_evts": seen,
            "n_drops_perc": round(100.0 * n_drops / max(1, n_drops + seen), 3),
            **{f"n_drops_{stage}": max(0, n) for stage, n in sorted(lost.items())},
        }
        self.counters["overload_alerts"] += 1
        self.counters["alerts"] += 1
        if self.outputs is None:
            return
        from agent.respond import internal_alert

        self.outputs.sink.emit(internal_alert(OVERLOAD_RULE, OVERLOAD_PRIORITY, output, **fields))

    def stats(self, drops: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "events": self.counters["syscalls"] + self.counters["details"] + self.counters["proc_events"],
            "drops": sum(drops.values()),
            "drops_by_stage": drops,
        }
        out.update({k: v for k, v in sorted(self.counters.items())})
        out["processes"] = len(self.table)
        if self.detector is not None:
            out["model"] = dict(self.detector.stats)
        if self.latencies_ns:
            ms = np.array(self.latencies_ns, dtype=np.float64) / 1e6
            out["event_to_block_ms"] = {
                "n": len(ms), "p50": round(float(np.percentile(ms, 50)), 3),
                "p99": round(float(np.percentile(ms, 99)), 3),
            }
        return out


def build_recorder_pipeline(output: str, filters: Filters) -> Pipeline:
    from agent.capture._btf import compat_probe
    from agent.capture.recording import RecordingWriter

    recorder = RecordingWriter(
        output,
        filters={"pids": sorted(filters.pids), "comms": sorted(filters.comms), "exes": sorted(filters.exes)},
        # whether each row's 32-bit flag is the kernel's (the tracer will find what this finds)
        compat_from_kernel=compat_probe().status_offset is not None,
    )
    return Pipeline(table=ProcessTable(), recorder=recorder, filters=filters)


def _ready(source: LiveSource) -> None:
    print(
        f"sysgram: ready (pid {os.getpid()}, {len(source.tracer.attached) if source.tracer else 0} "
        "detail tracepoints)",
        file=sys.stderr,
        flush=True,
    )


def _own_threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def boost_priority(nice: int) -> dict[int, int]:
    """Set every thread of this process to ``nice`` (threads started later inherit it from their creator);
    -> each changed thread's previous nice value, for :func:`restore_priority`. Threads where the
    change is refused (no CAP_SYS_NICE) keep theirs."""
    previous: dict[int, int] = {}
    for tid in _own_threads():
        try:
            old = os.getpriority(os.PRIO_PROCESS, tid)  # on Linux, PRIO_PROCESS with a tid is one thread
            if old != nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                previous[tid] = old
        except OSError:  # refused, or the thread is gone
            continue
    return previous


def restore_priority(previous: dict[int, int]) -> None:
    for tid, old in previous.items():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, old)
        except OSError:
            continue


def stall_reason(now: float, last_turns: dict[str, float], limit: float = STALL_AFTER_S) -> str | None:
    """Why the agent is not healthy (the stage that has not turned for longest, past ``limit`` s), or None."""
    stage, last = min(last_turns.items(), key=lambda item: item[1])
    if now - last <= limit:
        return None
    return f"stalled: the {stage} has not turned for {now - last:.0f} s"


def run_live(
    pipeline: Pipeline,
    *,
    seconds: float = 0.0,
    detail_syscalls: set[str] | None = None,
    compat_details: str = "auto",
    enforce: bool = False,
    flush_interval: float = 0.02,
    queue_max_events: int = 2_000_000,
    nice: int | None = AGENT_NICE,
) -> int:
    """Capture until SIGINT/SIGTERM (or ``seconds``); print ``sysgram: stats {json}`` last; exit 0.

    ``nice``: the scheduling priority of the agent's threads while it captures (None: leave it). The
    agent's work follows the host's syscalls; at the default nice 0, under load it gets a fair share of
    the CPUs like any busy thread and falls behind while using well under a core (docs/performance.md).
    """
    from agent.capture._decode import SPECS

    details = set(SPECS) if detail_syscalls is None else detail_syscalls
    source = LiveSource(
        detail_syscalls=details, enforce=enforce, flush_interval=flush_interval, queue_max_events=queue_max_events,
        compat_details=compat_details,
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    boosted: dict[int, int] = {}
    metrics = pipeline.metrics
    turned = {"pipeline": time.monotonic()}
    if metrics is not None:
        metrics.health = lambda: "starting: loading the tracer"
    try:
        if nice is not None:
            boosted = boost_priority(nice)  # before the capture threads start: they inherit it
        pipeline.seed()
        source.start()
        pipeline.kernel_compat = source.tracer is not None and source.tracer.compat.status_offset is not None
        if source.tracer is not None and source.tracer.compat_details_built:
            pipeline.on_compat = source.tracer.attach_compat_exit
            if pipeline.table.has_compat:  # 32-bit programs were running before the agent
                pipeline.note_compat_code(pipeline.table.compat_pids()[0])
        if not pipeline.kernel_compat and source.tracer is not None:
            print(f"sysgram: note: 32-bit syscalls are told apart by executable only ({source.tracer.compat.reason}):"
                  " a 64-bit program's int 0x80 passes for native syscalls", file=sys.stderr, flush=True)
        pipeline.seed_new()
        if nice is not None:
            boosted = {**boost_priority(nice), **boosted}  # threads started since (the first value wins)
        if pipeline.on_tracer is not None:
            pipeline.on_tracer(source.tracer)
        _ready(source)
        turned["pipeline"] = time.monotonic()  # loading may have taken longer than the stall limit
        if metrics is not None:
            metrics.health = lambda: stall_reason(
                time.monotonic(), {"pipeline": turned["pipeline"], "capture reader": source.last_turn}
            )
        deadline = time.monotonic() + seconds if seconds > 0 else None
        last_reap = last_trim = time.monotonic()
        last_sample = 0.0  # the first sample at once: /metrics shows every drop stage from the start
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            group = source.get(0.1)
            if group:
                pipeline.handle(group)
            turned["pipeline"] = time.monotonic()
            if time.monotonic() - last_reap > 1.0:
                pipeline.reap(time.monotonic_ns())
                last_reap = time.monotonic()
            if time.monotonic() - last_trim >= TRIM_INTERVAL_S:
                release_free_memory()
                last_trim = time.monotonic()
            if time.monotonic() - last_sample >= SAMPLE_INTERVAL_S:
                pipeline.sample(source.drops())
                last_sample = time.monotonic()
        if metrics is not None:
            metrics.health = lambda: "stopping"
        source.stop()
        while (group := source.get(0.0)) is not None:
            pipeline.handle(group)
        drops = source.drops()
        pipeline.sample(drops)
    finally:
        source.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        restore_priority(boosted)
    return _finish(pipeline, drops)


def _finish(pipeline: Pipeline, drops: dict[str, int]) -> int:
    pipeline.finish()
    if pipeline.recorder is not None:
        pipeline.recorder.close(drops)
    if pipeline.outputs is not None:
        pipeline.outputs.close()
    print(f"sysgram: stats {json.dumps(pipeline.stats(drops))}", file=sys.stderr, flush=True)
    return 0


def run_replay(pipeline: Pipeline, path: str) -> int:
    source = ReplaySource(path)
    source.start()
    # rows flagged by the kernel are taken as they are; older recordings' were flagged by executable already
    pipeline.kernel_compat = bool(source.recording.meta.get("compat_from_kernel", False))
    for info in source.recording.processes:
        pipeline.table.add(info)  # everything the recorder knew: exe, cmdline, user, container
    print("sysgram: ready (replay)", file=sys.stderr, flush=True)
    for group in source.chunks():
        pipeline.handle(group)
    return _finish(pipeline, source.drops())

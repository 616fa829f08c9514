"""Streaming anomaly detection: windows -> cached ONNX scores -> per-process aggregate -> rare alerts."""

from __future__ import annotations

import itertools
import math
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from agent.capture.names import syscall_name
from agent.events import FLAG_COMPAT
from agent.model._model import Model
from agent.model._sidecar import PAD, UNK
from agent.model._windows import _COMPAT_BIT, ThreadWindows, Windows, run_heads, run_indices


class ScoreCache:
    """Bounded hash table, window key -> window score, looked up and filled a whole batch at a time (numpy only).
    The detector stores a window that ends on a syscall new for its program with its score negated (the sign
    carries that fact to every later hit); the cache itself only stores and returns numbers.

    Open addressing with linear probing, at most half full. Each entry remembers the generation (batch) that
    last used it; when new entries would not fit in ``size``, the table is rebuilt from its most recently used
    half (a clock-like approximation of LRU that costs O(size) once per size/2 inserts).
    """

    def __init__(self, size: int) -> None:
        self.size = max(int(size), 0)
        capacity = 1 << max(4, (2 * self.size - 1).bit_length()) if self.size else 0
        self._mask = np.uint64(max(capacity - 1, 0))
        self._keys = np.zeros(capacity, dtype=np.uint64)  # 0 marks an empty slot
        self._scores = np.zeros(capacity, dtype=np.float64)
        self._used = np.zeros(capacity, dtype=np.int64)
        self._count = 0
        self.generation = 0
        self.evictions = 0

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def _nonzero(keys: np.ndarray) -> np.ndarray:
        return np.maximum(keys.astype(np.uint64, copy=False), np.uint64(1))  # 0 is the empty marker

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, score where found) of each key; hits count as used in a new generation."""
        self.generation += 1
        found = np.zeros(len(keys), dtype=bool)
        scores = np.zeros(len(keys), dtype=np.float64)
        if not self._count or not len(keys):
            return found, scores
        keys = self._nonzero(keys)
        mask = int(self._mask)
        pos = keys.view(np.int64) & mask
        at = self._keys[pos]
        slot = np.where(at == keys, pos, -1)
        # the few keys whose home slot holds another key probe on (at most half the table is full)
        pending = np.flatnonzero((slot < 0) & (at != 0))
        while len(pending):
            step = (pos[pending] + 1) & mask
            pos[pending] = step
            at = self._keys[step]
            hit = at == keys[pending]
            slot[pending[hit]] = step[hit]
            pending = pending[~hit & (at != 0)]
        found = slot >= 0
        slots = slot[found]
        scores[found] = self._scores[slots]
        self._used[slots] = self.generation
        return found, scores

    def insert(self, keys: np.ndarray, scores: np.ndarray) -> None:
        """Add distinct keys that :meth:`lookup` did not find."""
        if not self.size or not len(keys):
            return
        keys, scores = self._nonzero(keys), np.asarray(scores, dtype=np.float64)
        if len(keys) > self.size:  # more new windows than room: keep the latest
            keys, scores = keys[-self.size:], scores[-self.size:]
        if self._count + len(keys) > self.size:
            self._evict(keep=min(self.size // 2, self.size - len(keys)))
        self._place(keys, scores, np.full(len(keys), self.generation, dtype=np.int64))

    def _evict(self, keep: int) -> None:
        occupied = np.flatnonzero(self._keys)
        if keep > 0 and len(occupied) > keep:
            occupied = occupied[np.argpartition(-self._used[occupied], keep - 1)[:keep]]
        elif keep <= 0:
            occupied = occupied[:0]
        keys, scores, used = self._keys[occupied], self._scores[occupied], self._used[occupied]
        self.evictions += self._count - len(occupied)
        self._keys[:] = 0
        self._count = 0
        self._place(keys, scores, used)

    def _place(self, keys: np.ndarray, scores: np.ndarray, used: np.ndarray) -> None:
        pos = keys.view(np.int64) & int(self._mask)
        active = np.arange(len(keys))
        while len(active):
            free = self._keys[pos] == 0
            # several keys may reach the same free slot in one step: the first of each takes it
            slots, first = np.unique(pos[free], return_index=True)
            winners = active[free][first]
            self._keys[slots] = keys[winners]
            self._scores[slots] = scores[winners]
            self._used[slots] = used[winners]
            lost = np.ones(len(active), dtype=bool)
            lost[np.flatnonzero(free)[first]] = False
            active, pos = active[lost], (pos[lost] + 1) & int(self._mask)
        self._count += len(keys)


@dataclass(frozen=True, slots=True)
class AnomalyState:
    """A process's latest verdict from the model, for the rules cross-check."""

    pid: int
    exe: str
    ts: int
    score: float  # the process aggregate: mean window score over the current span and what earlier spans carried in
    threshold: float  # the process threshold for this program
    windows: int  # windows in the current span (the carried-in mean is worth up to span_memory more)
    window_score: float  # the most unusual window of the latest batch
    window_threshold: float
    window: tuple[str, ...]
    is_anomalous: bool
    new_syscalls: tuple[str, ...] = ()  # syscalls it made that its program made in no known window


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One alert-worthy finding: a process whose recent syscalls look unlike its program's normal."""

    ts: int
    pid: int
    tid: int
    exe: str
    score: float  # the window's score (mean NLL per position)
    threshold: float  # the window threshold for this program
    window: tuple[str, ...]
    contributions: tuple[tuple[int, str, float], ...]  # (position, syscall, share of the window's score)
    explanation: str
    process_score: float  # the aggregate that triggered the alert
    process_threshold: float
    process_windows: int
    aggregate: str = "mean"
    program: str = "*"  # the program slot the model used ("*" = generic)
    # syscalls this process made (in its life so far) that its program made in none of the model's known
    # windows: plain evidence for the SOC beside the scores ("socket connect" from a program that never
    # networked). Empty for the generic slot and for models without known windows.
    new_syscalls: tuple[str, ...] = ()
    # A summary of processes the per-program limit held back (0: an ordinary alert): this is the
    # highest-scoring of ``held_back`` anomalous processes of its executable not alerted in one limit
    # period, the first HELD_PIDS_MAX of them listed.
    held_back: int = 0
    held_back_pids: tuple[int, ...] = ()
    # A follow-up within the alert period: the new syscalls made since this process's last alert.
    new_since_alert: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return os.path.basename(self.exe)

    def output_fields(self) -> dict[str, Any]:
        """Falco-style output fields this room knows (proc.ppid is the pipeline's)."""
        return {
            "proc.pid": self.pid, "proc.exe": self.exe, "proc.name": self.name,
            "sysgram.anomaly.score": round(self.process_score, 4),
            "sysgram.anomaly.threshold": round(self.process_threshold, 4),
            "sysgram.anomaly.window": " ".join(self.window),
            "sysgram.anomaly.window_score": round(self.score, 4),
            "sysgram.anomaly.window_threshold": round(self.threshold, 4),
            "sysgram.anomaly.program": self.program,  # the model's program it was judged as ("*": generic)
            "sysgram.anomaly.new_syscalls": " ".join(self.new_syscalls),
            **({"sysgram.anomaly.new_since_alert": " ".join(self.new_since_alert)} if self.new_since_alert else {}),
            **({"sysgram.anomaly.held_back": self.held_back,
                "sysgram.anomaly.held_back_pids": " ".join(map(str, self.held_back_pids))} if self.held_back else {}),
        }


@dataclass(slots=True)
class _Held:
    """Anomalous processes of one executable held back by the per-program limit since ``first_ts``."""

    first_ts: int
    worst: Anomaly
    pids: dict[int, None] = field(default_factory=dict)  # every process held back, in order, each once

    def summary(self) -> Anomaly:
        return replace(self.worst, held_back=len(self.pids),
                       held_back_pids=tuple(itertools.islice(self.pids, HELD_PIDS_MAX)))


@dataclass(slots=True)  # one per live process: no per-instance __dict__
class _Process:
    exe: str
    span_start: int = 0
    total: float = 0.0
    count: int = 0
    started: bool = True  # seen starting (fork or exec): start-up thresholds apply while it is young
    lifetime: int = 0  # windows since it was first seen
    # the mean carried over from earlier spans, as a total over a number of windows (at most span_memory)
    carried_total: float = 0.0
    carried: int = 0
    last_alert: int | None = None  # the latest alert, or hold by the per-program limit
    alerted: bool = False  # whether that was an alert (a follow-up may come) or a hold (the summary speaks)
    state: AnomalyState | None = None
    # the latest batch's verdict, made an AnomalyState only when asked for (most never are):
    # (ts, score, threshold, windows, window score, window threshold, window tokens as bytes, anomalous)
    latest: tuple[int, float, float, int, float, float, bytes, bool] | None = None
    new_syscalls: tuple[str, ...] = ()  # in the order first made, at most NEW_SYSCALLS_MAX
    reported_new: int = 0  # how many of new_syscalls its latest alert carried


def contributions_of(nll: np.ndarray, window: tuple[str, ...], top: int = 3) -> tuple[tuple[int, str, float], ...]:
    total = float(nll.sum())
    if total <= 0:
        return ()
    order = np.argsort(-nll, kind="stable")[:top]
    return tuple((int(i), window[int(i)], round(float(nll[i]) / total, 3)) for i in order if nll[i] > 0)


def explain(exe: str, pid: int, window_score: float, window_threshold: float, process_score: float,
            process_threshold: float, windows: int, contributions: tuple[tuple[int, str, float], ...],
            aggregate: str = "mean", carried: int = 0, new_syscalls: tuple[str, ...] = ()) -> str:
    parts = ", ".join(f"{name} at position {pos} ({share:.0%})" for pos, name, share in contributions)
    earlier = f" (and its earlier spans' mean, worth {carried} windows)" if carried else ""
    new = f"; syscalls its program never made while learning: {', '.join(new_syscalls)}" if new_syscalls else ""
    return (f"{os.path.basename(exe) or '?'} (pid {pid}) made unusual syscalls: {aggregate} window score "
            f"{process_score:.2f} over {windows} windows{earlier} exceeds {process_threshold:.2f}; its most unusual "
            f"window scores {window_score:.2f} (threshold {window_threshold:.2f}), mostly from {parts or 'n/a'}{new}")


EXITED_KEEP_NS = 30_000_000_000
EXITED_KEEP_MAX = 4096  # and at most this many: fork/exit churn would otherwise keep ~30 s of processes
# A thread's exit event overtakes its last syscalls: the capture holds compact rows back (up to 250 ms) to
# order them across CPUs, while process events are handed on at once. Its windows are forgotten once the
# syscall stream (or the clock, see settle) is this far past the exit, so that those rows still find them
# and do not make state for a dead thread that nothing would remove (that was ~1 KB per process lifetime).
EXIT_SETTLE_NS = 1_000_000_000
ENDING_MAX = 16384  # exits waiting to settle; beyond this the oldest settles at once


SPAN_MEMORY_SPANS = 8  # span_memory, in min_windows: a burst of ~100 score units (measured) dilutes below a
# routine threshold of ~0.5 over ~250 windows; a sustained anomaly at 3 nats needs ~50 new windows to show
EXEC_ORIGINS_MAX = 4096  # anomalous processes' states kept past their exec (a pid each)
HELD_PIDS_MAX = 20  # pids listed in a summary of held-back anomalies
PROGRAMS_LIMITED_MAX = 4096  # executables whose recent anomaly alerts are remembered for the per-program limit
NEW_SYSCALLS_MAX = 16  # new syscalls remembered per process: enough to read, bounded under any behaviour
_NR_MASK = (1 << _COMPAT_BIT) - 1  # a row's syscall as one number: nr | compat << _COMPAT_BIT ...
_OWNER_SHIFT = _COMPAT_BIT + 1  # ... and with its process (index in the batch) above it
_NONE = np.zeros(0, dtype=np.int64)


class AnomalyDetector:
    """Feed it compact syscall batches; it returns anomalies (at most one per process per ``alert_every_ns``,
    and at most ``program_alerts`` per executable in that time: a program that does something new in every
    process it starts would otherwise flood the SOC with one alert per pid. Processes past the limit are still
    judged (their state says anomalous, for the rules' cross-check) and counted as ``anomalies_suppressed``;
    0 lifts the limit).

    ``span_ns``: the time span a process's aggregate covers; ``min_windows``: windows a span needs before it
    can be judged (default from the sidecar's calibration). Thresholds are calibrated on held-out processes'
    whole lives; a process seen starting is judged like one, with the start-up thresholds while its lifetime
    is within their buckets (a mean over few windows). A mean over a span's first few windows of a
    long-lived process is noisier: one burst of rare but normal syscalls (a signal racing a child's exit)
    can carry it over. So ``span_memory`` windows' worth of the previous spans' mean carries into each new
    span, and a process first seen mid-life (running before the agent) is judged once it has made that
    many windows.
    """

    def __init__(self, model: Model, *, cache_size: int = 65536, span_ns: int = 30_000_000_000,
                 alert_every_ns: int = 60_000_000_000, min_windows: int | None = None,
                 max_processes: int = 65536, program_alerts: int = 5, span_memory: int | None = None) -> None:
        self.model = model
        self.n = model.n
        self.cache = ScoreCache(cache_size)
        self.windows = ThreadWindows(self.n, model.nr_tokens, unseen="mid-life")
        self.span_ns = span_ns
        self.alert_every_ns = alert_every_ns
        self.min_windows = model.sidecar.thresholds.min_windows if min_windows is None else min_windows
        self.span_memory = SPAN_MEMORY_SPANS * self.min_windows if span_memory is None else span_memory
        self.max_processes = max_processes
        self.program_alerts = program_alerts
        self._program_alert_times: OrderedDict[str, deque[int]] = OrderedDict()  # exe -> its recent alerts
        self._held: OrderedDict[str, _Held] = OrderedDict()  # exe -> the limit's summary to come
        self._exec_origins: OrderedDict[int, AnomalyState] = OrderedDict()  # pid -> anomalous before its exec
        self._released: list[Anomaly] = []  # summaries pushed out early by the bound on _held
        self._procs: OrderedDict[int, _Process] = OrderedDict()
        # processes seen starting (fork or exec) whose first windows have not come yet: only they are judged
        # against start-up thresholds; one first seen mid-life waits for span_memory windows
        self._starting: OrderedDict[int, None] = OrderedDict()
        # [exit ts, pid, its state]: a list, because a process whose syscalls reach us after its exit event
        # gets its state then (``_late`` points at the entry until it is filled)
        self._exited: deque[list[Any]] = deque()
        self._late: dict[int, list[Any]] = {}  # pid -> its entry in _exited, not yet holding a state
        self._ending: OrderedDict[int, int] = OrderedDict()  # tid -> exit ts, windows kept until settled
        self._vocab = np.array(model.vocabulary, dtype=object)
        self._token_dtype = np.uint16 if len(self._vocab) <= 1 << 16 else np.int64  # a kept window, compact
        self._limits: dict[int, tuple[str, float, float, tuple[tuple[int, float], ...]]] = {}
        # [program * vocabulary + token] -> whether that program made that token in none of its known windows
        self._new_flat = None if model.made is None else ~model.made.ravel()
        self._stats = {"syscalls": 0, "windows": 0, "windows_scored": 0, "windows_known": 0, "cache_hits": 0,
                       "unk_tokens": 0,
                       "anomalies": 0, "anomalies_suppressed": 0, "held_back_alerts": 0, "batches": 0}

    @property
    def stats(self) -> dict[str, int]:
        return {**self._stats, "session_runs": self.model.session_runs, "cache_entries": len(self.cache),
                "cache_evictions": self.cache.evictions,
                "pre_exec_rows": self.windows.dropped, "context_only_rows": self.windows.context_only,
                "threads_evicted": self.windows.evicted,
                "threads": len(self.windows), "processes": len(self._procs), "exits_settling": len(self._ending)}

    def on_fork(self, pid: int, tid: int, ts: int | None = None) -> None:
        """A new task, seen from its start (at ``ts``): whatever an earlier task with this id left is not its
        own, including its last rows if they come after this fork (the id was reused within the holdback)."""
        reused = self._settle_exit(tid)
        self.windows.start(tid, ts if reused else None)
        if tid == pid:  # a new process: an exited one's state under this pid is no longer addressable
            self._late.pop(pid, None)
            self._procs.pop(pid, None)
            self._exec_origins.pop(pid, None)
            self._announce(pid)

    def _announce(self, pid: int) -> None:
        self._starting[pid] = None
        self._starting.move_to_end(pid)
        while len(self._starting) > self.max_processes:
            self._starting.popitem(last=False)

    def on_exec(self, tgid: int, tids: Iterable[int], ts: int | None = None) -> None:
        """The process runs a new program since ``ts``: its threads' rows from before are the old program's."""
        for tid in {tgid, *tids}:
            self._settle_exit(tid)
            self.windows.exec(tid, ts)
        self._late.pop(tgid, None)  # an exit placeholder under this pid is an earlier process's
        proc = self._procs.get(tgid)
        # whether it was judged anomalous before this exec (None: not judged yet, as when it exec'd again at
        # once: env, nice, timeout; the origin then holds); its state is made only when it was
        judged = None if proc is None else proc.latest[-1] if proc.latest is not None else (
            None if proc.state is None else proc.state.is_anomalous)
        if judged is not None:
            self._exec_origins.pop(tgid, None)
            before = self.state(tgid) if judged else None
            if before is not None:  # what exec'd the new program, for the rules
                self._exec_origins[tgid] = before
                while len(self._exec_origins) > EXEC_ORIGINS_MAX:
                    self._exec_origins.popitem(last=False)
        self._procs.pop(tgid, None)
        self._announce(tgid)

    def exec_origin(self, pid: int) -> AnomalyState | None:
        """The process's state just before its latest exec, when that was anomalous (a program that execs a
        shell in place leaves no state of its own under the shell's name); None otherwise."""
        return self._exec_origins.get(pid)

    def on_exit(self, tid: int, ts: int | None = None) -> None:
        """The thread exited at ``ts``: its windows go once its last syscalls are in (:meth:`settle`); at once
        when no time is given."""
        if ts is None:
            self._ending.pop(tid, None)
            self.windows.forget(tid)
            return
        self._ending[tid] = ts
        self._ending.move_to_end(tid)
        if len(self._ending) > ENDING_MAX:
            self._settle_exit(next(iter(self._ending)))

    def on_process_exit(self, pid: int, ts: int) -> None:
        """The process is gone: its state stays readable for EXITED_KEEP_NS (a Falco alert about it may
        still arrive to be cross-checked) and while it is among the EXITED_KEEP_MAX latest exits, then it
        is forgotten, so churn does not grow memory. Its state may not exist yet (its syscalls come after
        the exit event): the state those syscalls make is this exit's."""
        proc = self._procs.get(pid)
        entry: list[Any] = [ts, pid, proc]
        self._exited.append(entry)
        if proc is None:
            self._late[pid] = entry
        while self._exited and (ts - self._exited[0][0] > EXITED_KEEP_NS or len(self._exited) > EXITED_KEEP_MAX):
            oldest = self._exited.popleft()
            _, old_pid, old = oldest
            if self._late.get(old_pid) is oldest:  # its syscalls never came
                del self._late[old_pid]
            if old is not None and self._procs.get(old_pid) is old:  # not a new process that reused the pid
                del self._procs[old_pid]

    def settle(self, now_ns: int) -> int:
        """Forget the windows of threads that exited more than EXIT_SETTLE_NS before ``now_ns`` (the syscall
        stream's time, or CLOCK_MONOTONIC when the stream is quiet); -> how many."""
        settled = 0
        horizon = now_ns - EXIT_SETTLE_NS
        while self._ending:
            tid, ts = next(iter(self._ending.items()))
            if ts > horizon:
                break
            self._settle_exit(tid)
            settled += 1
        return settled

    def _settle_exit(self, tid: int) -> bool:
        """Forget an exited thread's windows now; whether its exit was still settling."""
        if self._ending.pop(tid, None) is None:
            return False
        self.windows.forget(tid)
        return True

    def state(self, pid: int) -> AnomalyState | None:
        proc = self._procs.get(pid)
        if proc is None:
            return None
        if proc.latest is not None:
            ts, score, threshold, windows, window_score, window_threshold, tokens, anomalous = proc.latest
            proc.state = AnomalyState(pid=pid, exe=proc.exe, ts=ts, score=score, threshold=threshold,
                                      windows=windows, window_score=window_score,
                                      window_threshold=window_threshold,
                                      window=self._window(np.frombuffer(tokens, dtype=self._token_dtype)),
                                      is_anomalous=anomalous, new_syscalls=proc.new_syscalls)
            proc.latest = None
        return proc.state

    def _window(self, tokens: np.ndarray) -> tuple[str, ...]:
        return tuple(self._vocab[tokens[tokens != PAD]].tolist())

    def push(self, batch: np.ndarray, exe_of: Mapping[int, str],
             program_of: Mapping[int, str] | None = None) -> list[Anomaly]:
        """Score a batch; ``exe_of``: tgid -> executable (alerts, limits); ``program_of``: tgid -> the name the
        model knows it by (a script's path, not its interpreter's; the executable when not given)."""
        win = self.windows.build(batch)
        if self._ending and len(batch):  # the stream's own clock: exits well before this batch are settled
            self.settle(int(batch["ts"].max()))
        self._stats["batches"] += 1
        self._stats["syscalls"] += len(batch)
        self._stats["unk_tokens"] += win.unknown
        now = int(batch["ts"].max()) if len(batch) else None
        if not len(win):
            return self.release_held(now) if (self._held or self._released) and now is not None else []
        self._stats["windows"] += len(win)
        # windows come grouped by process, then thread: per-process figures are reductions over contiguous
        # runs, found from the threads (a few hundred) rather than from every window
        thread_tgids = win.thread_tgids
        first_thread = run_heads(thread_tgids)
        starts = win.thread_starts[first_thread]
        counts = np.diff(np.append(starts, len(win)))
        pid_list = thread_tgids[first_thread].tolist()
        exes = [exe_of.get(p, "") for p in pid_list]
        keys = exes if program_of is None else [program_of.get(p) or e for p, e in zip(pid_list, exes, strict=True)]
        prog_of_pid = np.array([self.model.program_id(k) for k in keys], dtype=np.int64)
        programs = np.repeat(prog_of_pid, counts)
        scores, fresh = self._scores(win, programs)
        new_of = self._new_syscalls(batch, win, fresh, starts, pid_list, exes) if len(fresh) else {}
        sums = np.add.reduceat(scores, starts)
        # the highest-scoring window of each process in this batch (the last one on ties)
        top = np.repeat(np.maximum.reduceat(scores, starts), counts)
        best = np.maximum.reduceat(np.where(scores >= top, np.arange(len(scores)), -1), starts)
        best = np.where(best < 0, starts, best)  # NaN scores: fall back to the first window
        # a thread's rows are in time order: its last window is its latest
        last_ts = np.maximum.reduceat(batch["ts"][win.thread_last_rows], first_thread)
        best_tids = win.thread_tids[np.searchsorted(win.thread_starts, best, side="right") - 1]
        best_tokens = win.take(best)
        anomalies: list[Anomaly] = []
        for i, pid in enumerate(pid_list):
            w = int(best[i])
            anomaly = self._judge(pid, exes[i], int(prog_of_pid[i]), int(last_ts[i]), float(sums[i]),
                                  int(counts[i]), best_tokens[i], float(scores[w]), int(best_tids[i]),
                                  new_of.get(i, ()))
            if anomaly is not None:
                anomalies.append(anomaly)
        self._stats["anomalies"] += len(anomalies)
        if self._held or self._released:
            anomalies.extend(self.release_held(now))
        return anomalies

    def _new_syscalls(self, batch: np.ndarray, win: Windows, fresh: np.ndarray, starts: np.ndarray,
                      pids: list[int], exes: list[str]) -> dict[int, tuple[str, ...]]:
        """Per process (its index in this batch): the syscalls that the windows at ``fresh`` end on, named
        from the batch's syscall numbers (so a syscall outside the vocabulary, <unk> to the network, keeps
        its name; a 32-bit one is marked "(i386)"), in the order first made, each once.

        A process looping on a new syscall must not make this cost a gather and a sort of every window:
        repeats of one syscall by one thread collapse to their first, and processes whose list is full
        are skipped.
        """
        owner = np.searchsorted(starts, fresh, side="right") - 1
        owners = owner[run_heads(owner)].tolist()  # fresh is in window order, so owner does not decrease
        full = [i for i in owners if (p := self._procs.get(pids[i])) is not None
                and p.exe == exes[i] and len(p.new_syscalls) >= NEW_SYSCALLS_MAX]
        if full:
            keep = ~np.isin(owner, full)
            fresh, owner = fresh[keep], owner[keep]
        rows = win.rows[fresh]
        syscall = batch["nr"][rows].astype(np.int64) | (
            (batch["flags"][rows] & FLAG_COMPAT).astype(np.int64) << _COMPAT_BIT)
        key = (owner.astype(np.int64) << _OWNER_SHIFT) | syscall
        heads = run_heads(key)
        _, first = np.unique(key[heads], return_index=True)
        first = heads[first]
        first = first[np.argsort(batch["ts"][rows[first]], kind="stable")]  # across threads: by time
        out: dict[int, dict[str, None]] = {}
        for i in first.tolist():
            nr, compat = int(syscall[i]) & _NR_MASK, bool(int(syscall[i]) >> _COMPAT_BIT)
            name = f"{syscall_name(nr, compat=True)}(i386)" if compat else syscall_name(nr)
            out.setdefault(int(owner[i]), {})[name] = None
        return {owner_index: tuple(names) for owner_index, names in out.items()}

    def _scores(self, win: Windows, programs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every window's score: from the cache, the rest (each distinct window once) from onnxruntime; and
        the windows that end on a syscall new for their program (of a run of equal windows, the first)."""
        keys = win.keys(programs)
        # A thread repeating one syscall (the loops that make millions of syscalls/s) repeats its window:
        # look up each run of equal consecutive keys once when that saves at least half the lookups.
        heads: np.ndarray | None = None
        if len(keys) > 64:
            heads = run_heads(keys)
            if 2 * len(heads) > len(keys):
                heads = None
        distinct_keys = keys if heads is None else keys[heads]
        found, scores = self.cache.lookup(distinct_keys)
        missed = np.flatnonzero(~found)
        distinct = 0
        if len(missed):
            new_keys, first, inverse = np.unique(distinct_keys[missed], return_index=True, return_inverse=True)
            rows = missed[first] if heads is None else heads[missed[first]]
            tokens = win.take(rows)
            new_scores, known = self.model.known_or_scored(tokens, programs[rows], new_keys)
            if self._new_flat is not None:
                # A window ending on a syscall its program never made is stored with its score negated, so
                # that cache hits carry that too at the cost of a sign test (scores are never negative;
                # abs first clears the sign a NaN or -0.0 may have).
                np.abs(new_scores, out=new_scores)
                new = self._new_flat.take(programs[rows] * len(self._vocab) + tokens[:, -1])
                np.negative(new_scores, where=new, out=new_scores)
            scores[missed] = new_scores[inverse.ravel()]
            self.cache.insert(new_keys, new_scores)
            distinct = len(new_keys)
            self._stats["windows_known"] += known
        fresh = _NONE
        if self._new_flat is not None:  # the sign says new; read it before runs are expanded
            fresh = np.flatnonzero(np.signbit(scores))
            if len(fresh):
                np.abs(scores, out=scores)
                if heads is not None:
                    fresh = self._run_firsts(win, heads, fresh, len(keys))
        if heads is not None:
            scores = np.repeat(scores, np.diff(np.append(heads, len(keys))))
        self._stats["windows_scored"] += distinct
        self._stats["cache_hits"] += len(keys) - distinct
        return scores, fresh

    def _run_firsts(self, win: Windows, heads: np.ndarray, runs: np.ndarray, size: int) -> np.ndarray:
        """The windows to name for these runs of equal windows: each run's first, but every window of a run
        that ends on <unk>, which stands for many syscalls (equal windows, different syscalls)."""
        firsts = heads[runs]
        unk = win.buffer[win.starts[firsts] + (self.n - 1)] == UNK
        if not unk.any():
            return firsts
        return run_indices(firsts, np.where(unk, np.append(heads, size)[runs + 1] - firsts, 1))

    def _started(self, pid: int) -> bool:
        if pid in self._starting:
            del self._starting[pid]
            return True
        return False

    def _program_may_alert(self, exe: str, ts: int) -> bool:
        if self.program_alerts <= 0:
            return True
        times = self._program_alert_times.get(exe)
        if times is None:
            times = self._program_alert_times[exe] = deque()
            while len(self._program_alert_times) > PROGRAMS_LIMITED_MAX:
                self._program_alert_times.popitem(last=False)
        self._program_alert_times.move_to_end(exe)
        while times and ts - times[0] >= self.alert_every_ns:
            times.popleft()
        if len(times) >= self.program_alerts:
            return False
        times.append(ts)
        return True

    def _limits_of(self, program: int) -> tuple[str, float, float, tuple[tuple[int, float], ...]]:
        """(program name, process threshold, window threshold, start-up thresholds) of a program slot,
        memoised (looked up per process per batch)."""
        limits = self._limits.get(program)
        if limits is None:
            th = self.model.sidecar.thresholds
            name = self.model.program_name(program)
            limits = self._limits[program] = (name, th.process_for(name), th.window_for(name), th.startup_for(name))
        return limits

    def _judge(self, pid: int, exe: str, program: int, ts: int, total: float, count: int, tokens: np.ndarray,
               window_score: float, tid: int, new_syscalls: tuple[str, ...] = ()) -> Anomaly | None:
        proc = self._procs.get(pid)
        if proc is None or proc.exe != exe:
            # a process recreated because its exe became known is the same process: it keeps its start
            started = self._started(pid) or (proc is not None and proc.started)
            proc = self._procs[pid] = _Process(exe=exe, span_start=ts, started=started)
            late = self._late.pop(pid, None)
            if late is not None:  # the process exited before its syscalls got here: its exit keeps the state
                late[2] = proc
            while len(self._procs) > self.max_processes:
                self._procs.popitem(last=False)
        else:
            self._procs.move_to_end(pid)
        if ts - proc.span_start > self.span_ns and proc.count >= self.min_windows:
            # a new span: the mean so far carries into it, worth at most span_memory windows (a NaN score
            # would otherwise blind the process for good)
            weight = min(proc.count + proc.carried, self.span_memory)
            mean = (proc.total + proc.carried_total) / (proc.count + proc.carried)
            proc.carried, proc.carried_total = (weight, mean * weight) if math.isfinite(mean) else (0, 0.0)
            proc.span_start, proc.total, proc.count = ts, 0.0, 0
        proc.total += total
        proc.count += count
        proc.lifetime += count
        if new_syscalls and len(proc.new_syscalls) < NEW_SYSCALLS_MAX:
            seen = set(proc.new_syscalls)
            added = tuple(nm for nm in new_syscalls if nm not in seen)
            proc.new_syscalls = (*proc.new_syscalls, *added)[:NEW_SYSCALLS_MAX]
        program_name, p_threshold, w_threshold, startup = self._limits_of(program)
        enough = proc.count >= self.min_windows
        if proc.started:  # young: the mean still holds its start (carried spans included)
            for windows_below, threshold in startup:
                if proc.lifetime < windows_below:
                    p_threshold = threshold
                    break
        else:  # first seen mid-life: no start, and a mean over few windows is too noisy to judge
            enough = enough and proc.lifetime >= self.span_memory
        p_score = (proc.total + proc.carried_total) / (proc.count + proc.carried)
        anomalous = enough and p_score > p_threshold
        proc.latest = (ts, p_score, p_threshold, proc.count, window_score, w_threshold,
                       tokens.astype(self._token_dtype).tobytes(), anomalous)
        if not anomalous:
            return None
        new_since_alert: tuple[str, ...] = ()
        if proc.last_alert is not None and ts - proc.last_alert < self.alert_every_ns:
            # one alert per process per period, unless it was alerted (not held back: a held one is in its
            # program's summary) and has since made syscalls its program never made: the SOC hears of the
            # socket it opened after the first alert (bounded: NEW_SYSCALLS_MAX in a life)
            if not proc.alerted or len(proc.new_syscalls) <= proc.reported_new:
                return None
            new_since_alert = proc.new_syscalls[proc.reported_new:]
        held = not self._program_may_alert(exe, ts)
        proc.last_alert = ts  # when held: judged, state anomalous; not retried before alert_every_ns
        proc.alerted = not held
        proc.reported_new = len(proc.new_syscalls)
        real = tokens != PAD
        window = self._window(tokens)
        # the cache keeps scores only: the per-position NLL is recomputed for the rare window that alerts
        nll = self.model.score(tokens[None, :], np.array([program], dtype=np.int64))[0]
        scored = getattr(self.model.sidecar, "score_positions", None)  # a graph that scores only some positions
        if scored is not None:
            nll = np.where(np.isin(np.arange(len(nll)), scored), nll, 0.0)
        contributions = contributions_of(nll[real], window)
        anomaly = Anomaly(
            ts=ts, pid=pid, tid=tid, exe=exe, score=window_score, threshold=w_threshold, window=window,
            contributions=contributions,
            explanation=explain(exe, pid, window_score, w_threshold, p_score, p_threshold, proc.count,
                                contributions, self.model.sidecar.aggregate, carried=proc.carried,
                                new_syscalls=proc.new_syscalls),
            process_score=p_score, process_threshold=p_threshold, process_windows=proc.count,
            aggregate=self.model.sidecar.aggregate, program=program_name, new_syscalls=proc.new_syscalls,
            new_since_alert=new_since_alert,
        )
        if held:
            self._stats["anomalies_suppressed"] += 1
            self._hold(anomaly)
            return None
        return anomaly

    def _hold(self, anomaly: Anomaly) -> None:
        """Keep a held-back anomaly for its executable's summary: the count, the first pids, the worst."""
        held = self._held.get(anomaly.exe)
        if held is None:
            held = self._held[anomaly.exe] = _Held(anomaly.ts, anomaly)
            while len(self._held) > PROGRAMS_LIMITED_MAX:  # the oldest summary goes out early, not lost
                self._released.append(self._held.popitem(last=False)[1].summary())
        held.pids[anomaly.pid] = None  # a process judged again in the period is still one process
        if anomaly.process_score > held.worst.process_score:
            held.worst = anomaly

    def release_held(self, now_ns: int | None = None) -> list[Anomaly]:
        """Summaries of the anomalies the per-program limit held back, one per executable once a limit
        period has passed since its first (all of them when ``now_ns`` is None: the stream ended): so a
        program's quota spent on harmless runs cannot hide a later process unseen. Each is the worst
        held-back process's anomaly, with ``held_back`` = how many it stands for."""
        out, self._released = self._released, []
        # entries are made in the stream's order and never moved, so the due ones are the oldest: stop at the
        # first not due (one made later but stamped a little earlier in the same batch waits that long)
        while self._held and (now_ns is None or now_ns - next(iter(self._held.values())).first_ts
                              >= self.alert_every_ns):
            out.append(self._held.popitem(last=False)[1].summary())
        self._stats["held_back_alerts"] += len(out)
        return out

"""Streaming anomaly detection: windows -> cached ONNX scores -> per-process aggregate -> rare alerts."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.model._model import Model
from agent.model._sidecar import PAD
from agent.model._windows import ThreadWindows

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0xFF51AFD7ED558CCD)


def window_keys(tokens: np.ndarray, programs: np.ndarray) -> np.ndarray:
    """A 64-bit hash per (program, window), vectorised (collisions are negligible at cache sizes)."""
    h = np.full(len(tokens), _FNV_OFFSET, dtype=np.uint64) ^ programs.astype(np.uint64)
    with np.errstate(over="ignore"):
        for col in tokens.T.astype(np.uint64):
            h = (h ^ col) * _FNV_PRIME
        h ^= h >> np.uint64(33)
        h *= _MIX
        h ^= h >> np.uint64(33)
    return h


class ScoreCache:
    """Bounded LRU: window key -> (per-position NLL, score). Touched once per distinct window per batch."""

    def __init__(self, size: int, n: int) -> None:
        self.size = size
        self._slot: OrderedDict[int, int] = OrderedDict()
        self._nll = np.zeros((max(size, 0), n), dtype=np.float32)
        self._score = np.zeros(max(size, 0), dtype=np.float64)

    def __len__(self) -> int:
        return len(self._slot)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent; hits become most recently used."""
        if not self.size:
            return np.full(len(keys), -1, dtype=np.int64)
        slot, move = self._slot, self._slot.move_to_end
        found = [slot.get(k, -1) for k in keys.tolist()]
        for k, s in zip(keys.tolist(), found, strict=True):
            if s >= 0:
                move(k)
        return np.asarray(found, dtype=np.int64)

    def get(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._nll[slots], self._score[slots]

    def insert(self, keys: np.ndarray, nll: np.ndarray, scores: np.ndarray) -> None:
        if not self.size:
            return
        keep = slice(max(0, len(keys) - self.size), None)  # more misses than room: keep the latest
        for k, row, score in zip(keys[keep].tolist(), nll[keep], scores[keep].tolist(), strict=True):
            if len(self._slot) < self.size:
                s = len(self._slot)
            else:
                _, s = self._slot.popitem(last=False)
            self._slot[k] = s
            self._nll[s] = row
            self._score[s] = score


@dataclass(frozen=True, slots=True)
class AnomalyState:
    """A process's latest verdict from the model, for the rules cross-check."""

    pid: int
    exe: str
    ts: int
    score: float  # the process aggregate (mean window score) over the current span
    threshold: float  # the process threshold for this program
    windows: int  # windows in the current span
    window_score: float  # the most unusual window of the latest batch
    window_threshold: float
    window: tuple[str, ...]
    is_anomalous: bool


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
        }


@dataclass
class _Process:
    exe: str
    span_start: int = 0
    total: float = 0.0
    count: int = 0
    last_alert: int | None = None
    state: AnomalyState | None = None


def contributions_of(nll: np.ndarray, window: tuple[str, ...], top: int = 3) -> tuple[tuple[int, str, float], ...]:
    total = float(nll.sum())
    if total <= 0:
        return ()
    order = np.argsort(-nll, kind="stable")[:top]
    return tuple((int(i), window[int(i)], round(float(nll[i]) / total, 3)) for i in order if nll[i] > 0)


def explain(exe: str, pid: int, window_score: float, window_threshold: float, process_score: float,
            process_threshold: float, windows: int, contributions: tuple[tuple[int, str, float], ...],
            aggregate: str = "mean") -> str:
    parts = ", ".join(f"{name} at position {pos} ({share:.0%})" for pos, name, share in contributions)
    return (f"{os.path.basename(exe) or '?'} (pid {pid}) made unusual syscalls: {aggregate} window score "
            f"{process_score:.2f} over {windows} windows exceeds {process_threshold:.2f}; its most unusual "
            f"window scores {window_score:.2f} (threshold {window_threshold:.2f}), mostly from {parts or 'n/a'}")


class AnomalyDetector:
    """Feed it compact syscall batches; it returns anomalies (at most one per process per ``alert_every_ns``).

    ``span_ns``: the time span a process's aggregate covers (tumbling); ``min_windows``: windows a span
    needs before it can be judged (default from the sidecar's calibration).
    """

    def __init__(self, model: Model, *, cache_size: int = 65536, span_ns: int = 30_000_000_000,
                 alert_every_ns: int = 60_000_000_000, min_windows: int | None = None,
                 max_processes: int = 65536) -> None:
        self.model = model
        self.n = model.n
        self.cache = ScoreCache(cache_size, self.n)
        self.windows = ThreadWindows(self.n, model.nr_tokens)
        self.span_ns = span_ns
        self.alert_every_ns = alert_every_ns
        self.min_windows = model.sidecar.thresholds.min_windows if min_windows is None else min_windows
        self.max_processes = max_processes
        self._procs: OrderedDict[int, _Process] = OrderedDict()
        self._vocab = np.array(model.vocabulary, dtype=object)
        self._stats = {"syscalls": 0, "windows": 0, "windows_scored": 0, "cache_hits": 0, "unk_tokens": 0,
                       "anomalies": 0, "batches": 0}

    @property
    def stats(self) -> dict[str, int]:
        return {**self._stats, "session_runs": self.model.session_runs, "cache_entries": len(self.cache),
                "threads": len(self.windows), "processes": len(self._procs)}

    def on_exec(self, tgid: int, tids: Iterable[int]) -> None:
        for tid in (tgid, *tids):
            self.windows.reset(tid)
        self._procs.pop(tgid, None)

    def on_exit(self, tid: int) -> None:
        self.windows.forget(tid)

    def state(self, pid: int) -> AnomalyState | None:
        proc = self._procs.get(pid)
        return proc.state if proc else None

    def push(self, batch: np.ndarray, exe_of: Mapping[int, str]) -> list[Anomaly]:
        win = self.windows.build(batch)
        self._stats["batches"] += 1
        self._stats["syscalls"] += len(batch)
        self._stats["unk_tokens"] += win.unknown
        if not len(win.rows):
            return []
        self._stats["windows"] += len(win.rows)
        rows = batch[win.rows]
        pids, pid_of = np.unique(rows["tgid"], return_inverse=True)
        pid_list = pids.tolist()
        exes = [exe_of.get(p, "") for p in pid_list]
        prog_of_pid = np.array([self.model.program_id(e) for e in exes], dtype=np.int64)
        programs = prog_of_pid[pid_of]
        keys = window_keys(win.tokens, programs)
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        u_nll, u_score = self._lookup_or_score(uniq, first, win.tokens, programs)
        scores = u_score[inverse.ravel()]
        sums = np.bincount(pid_of, weights=scores, minlength=len(pids))
        counts = np.bincount(pid_of, minlength=len(pids))
        # the highest-scoring window of each process in this batch: last of each group sorted by (pid, score)
        by = np.lexsort((scores, pid_of))
        best = by[np.r_[np.flatnonzero(np.diff(pid_of[by])), len(by) - 1]]
        last_ts = np.zeros(len(pids), dtype=np.uint64)
        np.maximum.at(last_ts, pid_of, rows["ts"])
        anomalies: list[Anomaly] = []
        for i, pid in enumerate(pid_list):
            w = int(best[i])
            anomaly = self._judge(pid, exes[i], int(prog_of_pid[i]), int(last_ts[i]), float(sums[i]),
                                  int(counts[i]), win.tokens[w], u_nll[inverse.ravel()[w]], float(scores[w]),
                                  int(rows["tid"][w]))
            if anomaly is not None:
                anomalies.append(anomaly)
        self._stats["anomalies"] += len(anomalies)
        return anomalies

    def _lookup_or_score(self, uniq: np.ndarray, first: np.ndarray, tokens: np.ndarray, programs: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        slots = self.cache.lookup(uniq)
        u_nll = np.empty((len(uniq), self.n), dtype=np.float32)
        u_score = np.empty(len(uniq), dtype=np.float64)
        hit = slots >= 0
        if hit.any():
            u_nll[hit], u_score[hit] = self.cache.get(slots[hit])
        miss = np.flatnonzero(~hit)
        if len(miss):
            rows = first[miss]
            nll = self.model.score(tokens[rows], programs[rows])
            u_nll[miss] = nll
            u_score[miss] = self.model.window_scores(nll, tokens[rows])
            self.cache.insert(uniq[miss], u_nll[miss], u_score[miss])
        self._stats["windows_scored"] += len(miss)
        self._stats["cache_hits"] += len(tokens) - len(miss)
        return u_nll, u_score

    def _judge(self, pid: int, exe: str, program: int, ts: int, total: float, count: int, tokens: np.ndarray,
               nll: np.ndarray, window_score: float, tid: int) -> Anomaly | None:
        proc = self._procs.get(pid)
        if proc is None or proc.exe != exe:
            proc = self._procs[pid] = _Process(exe=exe, span_start=ts)
            while len(self._procs) > self.max_processes:
                self._procs.popitem(last=False)
        else:
            self._procs.move_to_end(pid)
        if ts - proc.span_start > self.span_ns and proc.count >= self.min_windows:
            proc.span_start, proc.total, proc.count = ts, 0.0, 0
        proc.total += total
        proc.count += count
        th = self.model.sidecar.thresholds
        program_name = self.model.program_name(program)
        p_score, p_threshold = proc.total / proc.count, th.process_for(program_name)
        w_threshold = th.window_for(program_name)
        window = tuple(str(s) for s in self._vocab[tokens[tokens != PAD]])
        real_nll = nll[tokens != PAD]
        anomalous = proc.count >= self.min_windows and p_score > p_threshold
        proc.state = AnomalyState(pid=pid, exe=exe, ts=ts, score=p_score, threshold=p_threshold,
                                  windows=proc.count, window_score=window_score, window_threshold=w_threshold,
                                  window=window, is_anomalous=anomalous)
        if not anomalous or (proc.last_alert is not None and ts - proc.last_alert < self.alert_every_ns):
            return None
        proc.last_alert = ts
        contributions = contributions_of(real_nll, window)
        return Anomaly(
            ts=ts, pid=pid, tid=tid, exe=exe, score=window_score, threshold=w_threshold, window=window,
            contributions=contributions,
            explanation=explain(exe, pid, window_score, w_threshold, p_score, p_threshold, proc.count,
                                contributions, self.model.sidecar.aggregate),
            process_score=p_score, process_threshold=p_threshold, process_windows=proc.count,
            aggregate=self.model.sidecar.aggregate, program=program_name,
        )

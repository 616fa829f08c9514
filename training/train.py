"""Training the masked window autoencoder, exporting it to ONNX, calibrating it, writing the sidecar."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from agent.errors import ConfigError, ModelError
from agent.model import (
    FORMAT,
    GENERIC_PROGRAM,
    MASK,
    PAD,
    SPECIALS,
    UNK,
    VERSION,
    Model,
    file_sha256,
    known_path,
    known_rows,
    load_model,
    sidecar_path,
    window_keys,
    windows_of_trace,
    write_known_windows,
)
from training.datasets import Trace, data_hash, traces_from_recordings
from training.net import MaskedWindowAE, NetConfig, scoring_graph

OPSET = 17
DEFAULT_N = 32
MASK_RATE = 0.25
UNK_NOISE = 0.01  # inputs swapped for UNK in training, so unseen syscalls at runtime are familiar noise
GENERIC_DROPOUT = 0.2  # windows trained as "any program" so the generic slot learns the mixture
DEFAULT_WINDOW_FAR = 1e-3
DEFAULT_PROCESS_FAR = 1e-5  # per process: a busy host starts ~500,000 an hour; 1e-3 is ~500 alerts (docs/model.md)
DEFAULT_MIN_WINDOWS = 32
AGGREGATE = "mean"  # chosen on ADFA-LD: see docs/model.md
UNK_QUANTILE = 0.99  # an unseen syscall costs this quantile of held-out NLL (see calibrate_unk_cost)
WARM_UP = 0.1  # of the optimiser's steps, the learning rate's rise (OneCycleLR)
LONG_TRACE = 4096  # syscalls: a held-out recorded trace this long gives its first half to training


@dataclass(frozen=True)
class TrainConfig:
    n: int = DEFAULT_N
    epochs: int = 30
    seed: int = 0
    batch_size: int = 512
    lr: float = 3e-3
    patience: int = 3
    threads: int = 2
    holdout: float = 0.15  # of traces, for early stopping and calibration
    # held-out traces this long are cut in two, the first half trained on (see split_holdout); 0: whole
    # traces, as the ADFA-LD protocol's units are (eval and probes keep that)
    holdout_split_long: int = 0
    min_program_syscalls: int = 2000  # a program with less training data shares the generic slot
    max_windows: int | None = None  # subsample training windows (frequency-preserving) for quick runs
    window_far: float = DEFAULT_WINDOW_FAR
    process_far: float = DEFAULT_PROCESS_FAR
    min_windows: int = DEFAULT_MIN_WINDOWS
    # score only the newest syscall of each window from the n-1 before it (one pass, see NetConfig.target);
    # False: the masked autoencoder scoring every position in NetConfig.passes passes
    newest: bool = True
    context_mask: float = 0.1  # target models: context positions hidden in training (robustness)
    net: dict[str, Any] = field(default_factory=dict)  # NetConfig overrides (hidden, bottleneck, dim, ...)
    # ship the (program, window) pairs of all the data (training and held-out) with the model: the runtime
    # scores them 0 (Model.is_known). Thresholds are calibrated on the network's scores alone, so known
    # windows can only lower a score: the target false-alarm rates become upper bounds. (Calibrating with
    # the training split's known windows instead put most thresholds at their floor, 0.0024, and one novel
    # window crossed them: 17 alerts on a replayed rerun against 1; docs/model.md.)
    known_windows: bool = True
    # no position's NLL counts for more than unk_cost (sidecar nll_cap): a known syscall out of place costs
    # no more than one never seen. The top ~1% of held-out positions (a wait4 racing a child's exit at
    # 9-15 nats) are flattened, so a process is judged by how much of it is surprising, not by one spike
    cap_nll: bool = True


@dataclass(frozen=True)
class TrainReport:
    onnx_path: str
    sidecar_path: str
    traces: int
    windows: int
    programs: tuple[str, ...]
    vocabulary_size: int
    epochs_run: int
    best_epoch: int
    holdout_nll: float
    seconds: float
    thresholds: dict[str, Any]
    thin: tuple[tuple[str, int], ...] = ()  # (program, judged held-out traces) below THIN_HOLDOUT
    known_windows: int = 0  # distinct (program, window) pairs shipped in <stem>.known.npz
    nll_cap: float | None = None  # no window scores above it, so no process mean does either

    def blind(self) -> tuple[str, ...]:
        """Program slots whose process threshold is at or above the NLL cap: no process judged as one of them
        can score above its threshold, so the model never alerts for it (rules still see it)."""
        if self.nll_cap is None:
            return ()
        process = self.thresholds.get("process", {})
        return tuple(p for p in self.programs if p in process and process[p] >= self.nll_cap)

    def blind_note(self) -> str:
        """One line for the analyst when the calibration left some programs beyond the model's reach."""
        blind = self.blind()
        if not blind:
            return ""
        names = ", ".join(os.path.basename(p) or p for p in blind[:8])
        more = f" and {len(blind) - 8} more" if len(blind) > 8 else ""
        return (f"{len(blind)} program slots can never raise an anomaly alert: their process threshold is at or "
                f"above the NLL cap {self.nll_cap:.3g} that bounds every score (their held-out runs scored that "
                f"far apart; `sysgram inspect` marks them; a longer or steadier learn narrows them): {names}{more}")

    def thin_note(self) -> str:
        """One line for the analyst when some programs were seen too few times for tight thresholds."""
        if not self.thin:
            return ""
        names = ", ".join(f"{os.path.basename(p)} ({k})" for p, k in self.thin[:8])
        more = f" and {len(self.thin) - 8} more" if len(self.thin) > 8 else ""
        return (f"{len(self.thin)} of {len(self.programs) - 1} programs had fewer than {THIN_HOLDOUT} held-out "
                f"runs long enough to judge: their thresholds are wide (a change must be larger to count; at 0, "
                f"the generic ones); a longer learn tightens them: {names}{more}")

    def summary(self) -> str:
        known = (f", {self.known_windows:,} known windows (in {known_path(self.onnx_path).name}, which travels "
                 "with the model)") if self.known_windows else ""
        return (f"{self.onnx_path} and {self.sidecar_path}: {self.traces} traces, {self.windows:,} windows{known}, "
                f"{len(self.programs) - 1} programs + generic, {self.vocabulary_size} tokens, "
                f"best epoch {self.best_epoch}/{self.epochs_run}, holdout NLL {self.holdout_nll:.3f}, "
                f"{self.seconds:.0f}s")


# ---------------------------------------------------------------------------------------------- data


def build_vocabulary(traces: Sequence[Trace]) -> list[str]:
    counts = Counter(name for t in traces for name in t.syscalls)
    return [*SPECIALS, *sorted(counts, key=lambda nm: (-counts[nm], nm))]


def build_programs(traces: Sequence[Trace], min_syscalls: int) -> list[str]:
    sizes: Counter[str] = Counter()
    for t in traces:
        sizes[t.program] += len(t.syscalls)
    own = sorted(p for p, size in sizes.items() if p != GENERIC_PROGRAM and size >= min_syscalls)
    return [GENERIC_PROGRAM, *own]


def encode_traces(traces: Sequence[Trace], vocabulary: Sequence[str], programs: Sequence[str], n: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All windows of all traces [N, n], each window's program id [N] and trace index [N]."""
    token_of = {name: i for i, name in enumerate(vocabulary)}
    program_of = {p: i for i, p in enumerate(programs)}
    parts, progs, owners = [], [], []
    for i, t in enumerate(traces):
        tokens = np.fromiter((token_of.get(s, UNK) for s in t.syscalls), dtype=np.int64, count=len(t.syscalls))
        w = windows_of_trace(tokens, n)[t.context if t.from_start else max(t.context, n - 1):]
        parts.append(w)
        progs.append(np.full(len(w), program_of.get(t.program, 0), dtype=np.int64))
        owners.append(np.full(len(w), i, dtype=np.int64))
    if not parts:
        return np.zeros((0, n), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(parts), np.concatenate(progs), np.concatenate(owners)


def split_holdout(traces: Sequence[Trace], fraction: float, seed: int, *, split_long: int = 0,
                  context: int = 0) -> tuple[list[Trace], list[Trace]]:
    """Whole traces held out (per program, so every program is calibrated on its own data).

    ``split_long``: a held-out trace of at least this many syscalls is cut in two instead, its first half
    trained on and its second half held out, carrying the ``context`` syscalls before the cut (windows of
    n need n-1). A long-lived process is one trace (a daemon, a workload's loop shell): held out whole, the
    model would never see it and would flag it on its next run. The price: that half is judged by a model
    that saw the same process's first half, so its scores lean low.
    """
    rng = np.random.default_rng(seed)
    by_program: dict[str, list[int]] = {}
    for i, t in enumerate(traces):
        by_program.setdefault(t.program, []).append(i)
    held: set[int] = set()
    for idx in by_program.values():
        if len(idx) < 2:
            continue
        k = max(1, round(len(idx) * fraction))
        held.update(rng.choice(idx, size=k, replace=False).tolist())
    train: list[Trace] = []
    holdout: list[Trace] = []
    for i, t in enumerate(traces):
        if i not in held:
            train.append(t)
        elif split_long and len(t.syscalls) >= split_long:
            cut = len(t.syscalls) // 2
            lead = min(context, cut)
            train.append(replace(t, syscalls=t.syscalls[:cut]))
            holdout.append(replace(t, syscalls=t.syscalls[cut - lead:], context=t.context + lead))
        else:
            holdout.append(t)
    return train, holdout


# ------------------------------------------------------------------------------------------ training


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _corrupt_target(tokens: torch.Tensor, target: int, context_mask: float, gen: torch.Generator
                    ) -> torch.Tensor:
    """Hide the target position; hide a few context positions too and sprinkle UNK (robust to odd context)."""
    real = tokens != PAD
    hide = (torch.rand(tokens.shape, generator=gen) < context_mask) & real
    hide[:, target] = True
    noisy = (torch.rand(tokens.shape, generator=gen) < UNK_NOISE) & real & ~hide
    return tokens.masked_fill(hide, MASK).masked_fill(noisy, UNK)


def _corrupt(tokens: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide ~25% of positions (at least one real one) behind MASK; sprinkle UNK noise on the rest."""
    real = tokens != PAD
    hide = (torch.rand(tokens.shape, generator=gen) < MASK_RATE) & real
    # windows that drew no hidden position hide their last (always real) position
    none = ~hide.any(dim=1)
    hide[none, -1] = True
    noisy = (torch.rand(tokens.shape, generator=gen) < UNK_NOISE) & real & ~hide
    inputs = tokens.masked_fill(hide, MASK).masked_fill(noisy, UNK)
    return inputs, hide


def holdout_nll(net: MaskedWindowAE, windows: np.ndarray, programs: np.ndarray, batch: int = 8192) -> float:
    """Mean per-position NLL of held-out windows under the deterministic scoring passes."""
    graph = scoring_graph(net).eval()
    target = net.cfg.target
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            tok = torch.from_numpy(windows[s:s + batch])
            nll = graph(tok, torch.from_numpy(programs[s:s + batch]))
            total += float(nll.sum())
            count += int((tok != PAD).sum() if target is None else (tok[:, target] != PAD).sum())
    return total / max(count, 1)


def fit(windows: np.ndarray, programs: np.ndarray, val_windows: np.ndarray, val_programs: np.ndarray,
        net_cfg: NetConfig, cfg: TrainConfig, *, progress: bool = True) -> tuple[MaskedWindowAE, dict[str, Any]]:
    """Train with early stopping on the held-out NLL; returns the best net and the history."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = MaskedWindowAE(net_cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = max(1, math.ceil(len(windows) / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    # OneCycleLR divides by pct_start * total_steps - 1: at exactly 10 steps a 10% warm-up raised
    # ZeroDivisionError (a small `learn --exe`, or `train --epochs 1` on ~5,000 windows)
    warm_up = 0.15 if total_steps * WARM_UP == 1 else WARM_UP
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=warm_up)
    best, best_state, best_epoch, bad = math.inf, None, 0, 0
    history: list[dict[str, float]] = []
    tokens_all, programs_all = torch.from_numpy(windows), torch.from_numpy(programs)
    with _torch_threads(cfg.threads), _progress(progress, cfg.epochs * steps_per_epoch, steps_per_epoch) as bar:
        for epoch in range(1, cfg.epochs + 1):
            net.train()
            order = torch.from_numpy(rng.permutation(len(windows)))
            running = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                tokens, prog = tokens_all[idx], programs_all[idx]
                if net_cfg.programs > 1:
                    prog = prog.masked_fill(torch.rand(prog.shape, generator=gen) < GENERIC_DROPOUT, 0)
                if net_cfg.target is None:
                    inputs, hide = _corrupt(tokens, gen)
                    logits = net.logits(net.encode(inputs, prog))
                    loss = loss_fn(logits[hide], tokens[hide])
                else:
                    inputs = _corrupt_target(tokens, net_cfg.target, cfg.context_mask, gen)
                    loss = loss_fn(net.logits_at(net.encode(inputs, prog), net_cfg.target),
                                   tokens[:, net_cfg.target])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
                bar(f"epoch {epoch}/{cfg.epochs} loss {running / (step + 1):.3f} best {best:.3f}")
            net.eval()
            val = holdout_nll(net, val_windows, val_programs) if len(val_windows) else running / steps_per_epoch
            history.append({"epoch": epoch, "train_loss": running / steps_per_epoch, "holdout_nll": val})
            if val < best - 1e-4:
                best, best_epoch, bad = val, epoch, 0
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return net, {"history": history, "best_epoch": best_epoch, "holdout_nll": best,
                 "epochs_run": len(history)}


@contextlib.contextmanager
def _progress(enabled: bool, total: int, every: int = 0) -> Iterator[Any]:
    """A rich progress bar on a terminal; elsewhere (a service's journal, a pipe, CI) one plain line on
    stderr every ``every`` steps (an epoch), so a long training is never silent for minutes."""
    if not enabled:
        yield lambda _desc: None
        return
    if not sys.stderr.isatty():
        done = [0]

        def line(desc: str) -> None:
            done[0] += 1
            if every and (done[0] % every == 0 or done[0] == total):
                print(f"training: {desc} (step {done[0]:,} of at most {total:,})", file=sys.stderr, flush=True)

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as prog:
        task = prog.add_task("training", total=total)

        def advance(desc: str) -> None:
            prog.update(task, advance=1, description=desc)

        yield advance


# ---------------------------------------------------------------------------------------------- export


def export_onnx(net: MaskedWindowAE, path: str | Path, check_windows: np.ndarray, check_programs: np.ndarray
                ) -> float:
    """Export the scoring graph; check it with onnx.checker and against torch on one batch.

    Returns the largest absolute difference seen (raises ModelError beyond 1e-3).
    """
    graph = scoring_graph(net).eval()
    cfg = net.cfg
    example = (torch.zeros(2, cfg.n, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    tmp = f"{path}.partial"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        torch.onnx.export(
            graph, example, tmp, dynamo=False, opset_version=OPSET, input_names=["tokens", "program"],
            output_names=["nll"], dynamic_axes={"tokens": {0: "batch"}, "program": {0: "batch"}, "nll": {0: "batch"}},
        )
    proto = onnx.load(tmp)
    for key, value in (("vocab_size", cfg.vocab_size), ("n", cfg.n), ("programs", cfg.programs),
                       ("passes", cfg.scoring_passes)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"sysgram.{key}", str(value)
    proto.producer_name = "sysgram-training"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, tmp)
    sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    tok = np.ascontiguousarray(check_windows[:512], dtype=np.int64)
    prog = np.ascontiguousarray(check_programs[:512], dtype=np.int64)
    (got,) = sess.run(["nll"], {"tokens": tok, "program": prog})
    with torch.no_grad():
        want = graph(torch.from_numpy(tok), torch.from_numpy(prog)).numpy()
    diff = float(np.abs(got - want).max()) if len(tok) else 0.0
    if diff > 1e-3:
        os.unlink(tmp)
        raise ModelError(f"onnxruntime and torch disagree after export (max |diff| {diff:.2e})", path=str(path))
    os.replace(tmp, path)
    return diff


# ------------------------------------------------------------------------------------------ calibration


def trace_window_scores(model: Model, traces: Sequence[Trace]) -> list[np.ndarray]:
    """Window scores of each trace, each distinct (program, window) scored once (0 if the model knows it)."""
    windows, programs, owner = encode_traces(traces, model.vocabulary, model.sidecar.programs, model.n)
    if not len(windows):
        return [np.zeros(0) for _ in traces]
    keys = window_keys(windows, programs)
    distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    scores = model.known_or_scored(windows[first], programs[first], distinct)[0][inverse.ravel()]
    bounds = np.searchsorted(owner, np.arange(len(traces) + 1))
    return [scores[bounds[i]:bounds[i + 1]] for i in range(len(traces))]


def calibrate_unk_cost(model: Model, windows: np.ndarray, programs: np.ndarray) -> float:
    """What an unseen syscall costs: the UNK_QUANTILE of held-out NLL of known syscalls (capped at log |V|).

    log |V| per unseen syscall let a few syscalls absent from training dominate a normal trace's mean; a
    syscall never seen is treated as about as surprising as the rarest known ones.
    """
    ceiling = float(math.log(model.sidecar.vocab_size))
    if not len(windows):
        return ceiling
    both = np.unique(np.column_stack([programs, windows]), axis=0)[:200_000]
    uniq = both[:, 1:]
    nll = model.score(uniq, both[:, 0])
    positions = list(model.sidecar.score_positions or range(model.n))
    known = (uniq[:, positions] != PAD) & (uniq[:, positions] != UNK)
    values = nll[:, positions][known]
    return min(ceiling, float(np.quantile(values, UNK_QUANTILE))) if len(values) else ceiling


def aggregate(scores: np.ndarray, how: str = AGGREGATE) -> float:
    if not len(scores):
        return 0.0
    if how == "mean":
        return float(scores.mean())
    if how == "median":
        return float(np.median(scores))
    if how == "trimmed":
        lo, hi = np.quantile(scores, [0.1, 0.9])
        kept = scores[(scores >= lo) & (scores <= hi)]
        return float(kept.mean()) if len(kept) else float(scores.mean())
    if how == "max":
        return float(scores.max())
    raise ValueError(how)


STARTUP_BUCKETS = 4  # a process's first span is judged against start-up thresholds up to 2**4 x min_windows


# Thresholds from few held-out traces (below 1/far of them, i.e. nearly always): see docs/model.md.
LOG_FLOOR = 0.01  # nats per window: means are compared as log(mean + LOG_FLOOR); below it, differences are noise
PRIOR_TRACES = 10  # weight, in traces, of the spread pooled over all programs in a program's own estimate
# below this many degrees of freedom over all programs there is no spread worth borrowing (a one-program
# learn of a few runs): Student's t would be huge and the threshold out of reach; 1.05 x the largest instead
MIN_POOLED_DOF = 30
THIN_HOLDOUT = 10  # held-out runs below which `learn` and `train` name a program as thinly calibrated


@dataclass(frozen=True)
class SpreadPrior:
    """How far one program's held-out process aggregates spread around their own mean, on the log scale,
    pooled over every program (``variance`` with ``dof`` degrees of freedom; dof 0: nothing to pool)."""

    variance: float = 0.0
    dof: int = 0

    @staticmethod
    def pooled(groups: Sequence[np.ndarray]) -> SpreadPrior:
        logs = [np.log(np.asarray(g, dtype=np.float64) + LOG_FLOOR) for g in groups if len(g) >= 2]
        dof = sum(len(x) - 1 for x in logs)
        return SpreadPrior(float(sum(((x - x.mean()) ** 2).sum() for x in logs) / dof), dof) if dof else SpreadPrior()


def _far_threshold(values: np.ndarray, far: float, prior: SpreadPrior = SpreadPrior()) -> float:
    """The (1 - far) quantile of ``values`` when there are at least 1/far of them. Below that a quantile
    cannot be read off, and the largest value is only about the 1 - 1/(k+1) quantile of k: the threshold is
    then a one-sided prediction bound for one more trace at rate ``far``, on the log scale, with the spread
    taken from the program's own traces shrunk towards the spread pooled over all programs (a program seen
    a dozen times, always alike, has shown no spread but still has one). Never below 1.05 x the largest,
    and just that when the pool is thin (fewer than MIN_POOLED_DOF degrees of freedom)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) * far >= 1:
        return float(np.quantile(values, 1 - far))
    largest = float(values.max()) * 1.05
    if prior.dof < MIN_POOLED_DOF:
        return largest
    from scipy.stats import t as student_t

    logs = np.log(values + LOG_FLOOR)
    own = len(logs) - 1
    variance = (float(((logs - logs.mean()) ** 2).sum()) + PRIOR_TRACES * prior.variance) / (own + PRIOR_TRACES)
    bound = logs.mean() + float(student_t.ppf(1 - far, own + PRIOR_TRACES)) * math.sqrt(variance * (1 + 1 / len(logs)))
    return max(largest, math.exp(bound) - LOG_FLOOR)


def startup_peaks(traces: Sequence[np.ndarray], min_windows: int) -> list[np.ndarray]:
    """Per start-up bucket [m, 2m), [2m, 4m), ... (m = ``min_windows``): each trace's highest running mean
    while its window count is in the bucket (traces that reach it)."""
    running = [np.cumsum(s) / np.arange(1, len(s) + 1) for s in traces if len(s) >= min_windows]
    out: list[np.ndarray] = []
    low = min_windows
    for _ in range(STARTUP_BUCKETS):
        peaks = [float(r[low - 1:2 * low - 1].max()) for r in running if len(r) >= low]
        if not peaks:
            break
        out.append(np.array(peaks))
        low *= 2
    return out


def startup_thresholds(traces: Sequence[np.ndarray], min_windows: int, routine: float, far: float,
                       priors: Sequence[SpreadPrior] = ()) -> list[list[float]]:
    """[[windows_below, threshold], ...]: a process in its first span with fewer windows than ``windows_below``
    is judged against ``threshold``: the same false-alarm rate over the held-out traces' *highest running
    mean* while their window count was in [previous bound, windows_below). A program's start-up scores higher
    than its routine, and the runtime judges a running mean from ``min_windows`` on; the whole-trace mean
    the routine threshold comes from would alert on normal start-ups. Never below ``routine``; buckets
    that add nothing are left out. ``priors``: each bucket's pooled spread (see :func:`_far_threshold`)."""
    out: list[list[float]] = []
    for bucket, peaks in enumerate(startup_peaks(traces, min_windows)):
        prior = priors[bucket] if bucket < len(priors) else SpreadPrior()
        out.append([min_windows << (bucket + 1), max(routine, _far_threshold(peaks, far, prior))])
    while out and out[-1][1] <= routine:
        out.pop()
    return out


def thinly_calibrated(programs: Sequence[str], calibration: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """(program, judged held-out traces) below THIN_HOLDOUT, fewest first; a program with a slot of its own
    but no held-out trace (one long trace, never held out) counts 0: it is judged by the generic thresholds."""
    counts = {p: calibration["programs"].get(p, {}).get("judged_traces", 0) for p in programs[1:]}
    return tuple(sorted(((p, k) for p, k in counts.items() if k < THIN_HOLDOUT), key=lambda x: (x[1], x[0])))


def process_thresholds(judged_of: dict[str, list[np.ndarray]], startups_of: dict[str, list[np.ndarray]],
                       cfg: TrainConfig) -> tuple[dict[str, float], dict[str, list[list[float]]], SpreadPrior]:
    """Per program: the routine process threshold and the start-up buckets, from held-out window scores.

    ``judged_of``: per program ("*": all of them again), the traces the runtime would judge (at least
    ``min_windows`` windows; all of them when none has that many). ``startups_of``: those of them that
    begin at a process start (not the held-out half of a cut trace). The spread is pooled over the programs
    themselves, "*" left out, and only over traces that really are judged (short traces' means are noisy).
    """
    aggregates = {program: np.array([aggregate(s) for s in judged]) for program, judged in judged_of.items()}
    pooled = [program for program, judged in judged_of.items()
              if program != GENERIC_PROGRAM and len(judged[0]) >= cfg.min_windows]
    prior = SpreadPrior.pooled([aggregates[program] for program in pooled])
    bucket_peaks = [startup_peaks(startups_of.get(program, []), cfg.min_windows) for program in pooled]
    startup_priors = [SpreadPrior.pooled([peaks[b] for peaks in bucket_peaks if len(peaks) > b])
                      for b in range(STARTUP_BUCKETS)]
    process_th: dict[str, float] = {}
    startup: dict[str, list[list[float]]] = {}
    for program in judged_of:
        process_th[program] = _far_threshold(aggregates[program], cfg.process_far, prior)
        startup[program] = startup_thresholds(startups_of.get(program, []), cfg.min_windows, process_th[program],
                                              cfg.process_far, startup_priors)
    return process_th, startup, prior


def calibrate(model: Model, holdout: Sequence[Trace], cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Thresholds per program from held-out normal traces at the target false-alarm rates."""
    per_trace = trace_window_scores(model, holdout)
    groups: dict[str, list[int]] = {GENERIC_PROGRAM: list(range(len(holdout)))}
    for i, t in enumerate(holdout):
        if t.program in model.sidecar.programs[1:]:
            groups.setdefault(t.program, []).append(i)
    scored_of = {program: [i for i in idx if len(per_trace[i])] for program, idx in groups.items()}
    # the runtime judges a process only once it has min_windows windows: calibrate on those traces
    judged_idx = {program: [i for i in idx if len(per_trace[i]) >= cfg.min_windows] or idx
                  for program, idx in scored_of.items() if idx}
    judged_of = {program: [per_trace[i] for i in idx] for program, idx in judged_idx.items()}
    startups_of = {program: [per_trace[i] for i in idx if holdout[i].starts_a_process]
                   for program, idx in judged_idx.items()}
    process_th, startup, prior = process_thresholds(judged_of, startups_of, cfg)
    window_th: dict[str, float] = {}
    calibration: dict[str, Any] = {"programs": {}}
    for program, idx in judged_idx.items():
        windows = np.concatenate([per_trace[i] for i in scored_of[program]])
        aggregates = np.array([aggregate(s) for s in judged_of[program]])
        window_th[program] = float(np.quantile(windows, 1 - cfg.window_far))
        calibration["programs"][program] = {
            "holdout_traces": len(scored_of[program]), "judged_traces": len(idx), "holdout_windows": len(windows),
            "window_quantiles": {str(p): float(np.quantile(windows, p)) for p in (0.5, 0.9, 0.99, 0.999)},
            "aggregate_quantiles": {str(p): float(np.quantile(aggregates, p)) for p in (0.5, 0.9, 0.99)},
        }
    if GENERIC_PROGRAM not in window_th:
        raise ConfigError("no held-out data to calibrate thresholds on (need at least two traces)")
    thresholds = {"window": window_th, "process": process_th, "min_windows": cfg.min_windows,
                  "process_startup": {p: b for p, b in startup.items() if b},
                  "target_window_far": cfg.window_far, "target_process_far": cfg.process_far,
                  "aggregate": AGGREGATE}
    calibration["pooled_spread"] = {"log_floor": LOG_FLOOR, "prior_traces": PRIOR_TRACES,
                                    "variance": prior.variance, "dof": prior.dof}
    return thresholds, calibration


# ---------------------------------------------------------------------------------------------- whole


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def train_model(traces: Sequence[Trace], out: str | Path, cfg: TrainConfig, *, progress: bool = True,
                how: str = "", holdout: Sequence[Trace] | None = None) -> TrainReport:
    """Train on ``traces`` (holding some out unless ``holdout`` is given), export ``out`` + sidecar.

    The files are made in a scratch directory beside ``out`` and moved in (each move atomic) only once the
    model is complete and loads: a training that fails, or is stopped, leaves a model already at ``out``
    as it was."""
    final = Path(out)
    if final.is_dir():
        raise ConfigError("the model path is a directory", path=str(final))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{final.stem}.training-", dir=final.parent))
    except OSError as err:
        raise ConfigError(f"cannot write the model here: {err.strerror}", path=str(final)) from None
    try:
        report = _train_model(traces, work / final.name, cfg, progress=progress, how=how, holdout=holdout)
        made = [work / final.name, sidecar_path(work / final.name), known_path(work / final.name)]
        try:
            known_path(final).unlink(missing_ok=True)  # an earlier model's, which this one must not seem to have
            for path in made:
                if path.exists():
                    os.replace(path, final.parent / path.name)
        except OSError as err:
            raise ModelError(f"cannot put the model in place: {err.strerror}", path=str(err.filename or final)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return replace(report, onnx_path=str(final), sidecar_path=str(sidecar_path(final)))


def _train_model(traces: Sequence[Trace], out: Path, cfg: TrainConfig, *, progress: bool, how: str,
                 holdout: Sequence[Trace] | None) -> TrainReport:
    started = time.monotonic()
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError("the model file must end in .onnx (the sidecar takes the same stem + .json)",
                          path=str(out))
    if holdout is None:
        train, held = split_holdout(traces, cfg.holdout, cfg.seed, split_long=cfg.holdout_split_long,
                                    context=cfg.n - 1)
    else:
        train, held = list(traces), list(holdout)
    if not train or not held:
        raise ConfigError(f"too little training data ({len(traces)} traces; need at least two per program)")
    vocabulary = build_vocabulary(train)
    programs = build_programs(train, cfg.min_program_syscalls)
    net_over = {"target": cfg.n - 1, **cfg.net} if cfg.newest else dict(cfg.net)
    net_cfg = NetConfig(vocab_size=len(vocabulary), n=cfg.n, programs=len(programs), **net_over)
    windows, progs, _ = encode_traces(train, vocabulary, programs, cfg.n)
    # the known set holds every window, not the training sample: reduced now, so the full array can go
    known = known_rows(progs, windows) if cfg.known_windows else None
    if cfg.max_windows is not None and len(windows) > cfg.max_windows:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(windows), cfg.max_windows, replace=False))
        windows, progs = windows[keep], progs[keep]
    val_windows, val_progs, _ = encode_traces(held, vocabulary, programs, cfg.n)
    net, result = fit(windows, progs, val_windows, val_progs, net_cfg, cfg, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    diff = export_onnx(net, out, val_windows, val_progs)
    sidecar: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "onnx": out.name, "onnx_sha256": file_sha256(out),
        "n": cfg.n, "passes": net_cfg.scoring_passes, "vocabulary": vocabulary, "programs": programs,
        "specials": {"pad": PAD, "unk": UNK, "mask": MASK},
        "inputs": {"tokens": ["batch", cfg.n], "program": ["batch"]}, "outputs": {"nll": ["batch", cfg.n]},
        "opset": OPSET, "unk_cost": float(math.log(len(vocabulary))), "aggregate": AGGREGATE,
        "thresholds": {"window": {GENERIC_PROGRAM: 0.0}, "process": {GENERIC_PROGRAM: 0.0},
                       "min_windows": cfg.min_windows, "target_window_far": cfg.window_far,
                       "target_process_far": cfg.process_far},
    }
    if net_cfg.target is not None:
        sidecar["score_positions"] = [net_cfg.target]
    side_path = sidecar_path(out)
    side_path.write_text(json.dumps(sidecar))
    sidecar["unk_cost"] = calibrate_unk_cost(load_model(out, threads=cfg.threads), val_windows, val_progs)
    if cfg.cap_nll:
        sidecar["nll_cap"] = sidecar["unk_cost"]
    side_path.write_text(json.dumps(sidecar))
    model = load_model(out, threads=cfg.threads)
    thresholds, calibration = calibrate(model, held, cfg)
    if known is not None:  # after calibration, which judges the network's scores alone (see TrainConfig)
        held_rows = known_rows(val_progs, val_windows)  # concatenate widens uint16 to uint32 if one needs it
        sidecar["known_windows"] = write_known_windows(out, np.unique(np.concatenate([known, held_rows]), axis=0))
    sidecar.update({
        "thresholds": thresholds, "calibration": calibration,
        "training_data": {"sha256": data_hash(train), "traces": len(train), "windows": len(windows),
                          "syscalls": int(sum(len(t.syscalls) for t in train)), "holdout_traces": len(held),
                          "holdout_windows": len(val_windows)},
        "metrics": {"holdout_nll": result["holdout_nll"], "best_epoch": result["best_epoch"],
                    "epochs_run": result["epochs_run"], "history": result["history"],
                    "onnx_torch_max_abs_diff": diff},
        "versions": _versions(),
        "made": {"how": how or " ".join(sys.argv), "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "seed": cfg.seed, "epochs": cfg.epochs, "net": net_cfg.as_dict(), "mask_rate": MASK_RATE,
                 "unk_noise": UNK_NOISE, "generic_dropout": GENERIC_DROPOUT, "batch_size": cfg.batch_size,
                 "lr": cfg.lr, "threads": cfg.threads, "holdout_split_long": cfg.holdout_split_long,
                 "seconds": round(time.monotonic() - started, 1)},
    })
    side_path.write_text(json.dumps(sidecar, indent=1))
    return TrainReport(
        onnx_path=str(out), sidecar_path=str(side_path), traces=len(train), windows=len(windows),
        programs=tuple(programs), vocabulary_size=len(vocabulary), epochs_run=result["epochs_run"],
        best_epoch=result["best_epoch"], holdout_nll=result["holdout_nll"],
        seconds=time.monotonic() - started, thresholds=thresholds,
        thin=thinly_calibrated(programs, calibration),
        known_windows=int(sidecar.get("known_windows", {}).get("windows", 0)), nll_cap=sidecar.get("nll_cap"),
    )


def train_from_recordings(paths: Sequence[str], out: str, *, exes: Sequence[str] = (), epochs: int = 8,
                          seed: int = 0, progress: bool = True, n: int = DEFAULT_N,
                          max_windows: int | None = 400_000, net: dict[str, Any] | None = None) -> TrainReport:
    """What ``sysgram train`` and the pipeline's ``sysgram learn`` call after recording."""
    traces = traces_from_recordings(paths, exes)
    if not traces:
        where = f" for {', '.join(exes)}" if exes else ""
        raise ConfigError(f"no syscalls{where} in the recordings", path=paths[0] if paths else None)
    cfg = TrainConfig(n=n, epochs=epochs, seed=seed, max_windows=max_windows, net=dict(net or {}),
                      holdout_split_long=LONG_TRACE)
    return train_model(traces, out, cfg, progress=progress,
                       how=f"train_from_recordings({list(paths)!r}, exes={list(exes)!r}, epochs={epochs}, "
                           f"seed={seed}, net={net!r})")

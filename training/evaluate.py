"""The standard ADFA-LD protocol: train on Training_Data_Master, score Validation (normal) vs Attack.

Our model and a STIDE baseline (window 6) are measured in the same run on the same traces.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from agent.model import PAD, UNK, load_model, windows_of_trace
from training.datasets import Trace, adfa_traces
from training.train import TrainConfig, aggregate, build_vocabulary, trace_window_scores, train_model

STIDE_WINDOW = 6


def rates(normal: np.ndarray, attack: np.ndarray) -> dict[str, float]:
    """AUC, FAR at 90% detection, detection at 1% and 5% FAR (fractions 0..1); higher score = attack."""
    y = np.r_[np.zeros(len(normal)), np.ones(len(attack))]
    s = np.r_[normal, attack]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auc": float(roc_auc_score(y, s)),
        "far_at_dr90": float(fpr[np.argmax(tpr >= 0.9)]),
        "dr_at_far1": float(tpr[fpr <= 0.01].max()),
        "dr_at_far5": float(tpr[fpr <= 0.05].max()),
        "normal_traces": len(normal),
        "attack_traces": len(attack),
    }


def stide_scores(train: Sequence[Trace], tests: Sequence[Trace], k: int = STIDE_WINDOW) -> np.ndarray:
    """STIDE: the fraction of a trace's k-windows never seen in training (unknown syscalls never match)."""
    vocabulary = build_vocabulary(train)
    token_of = {name: i for i, name in enumerate(vocabulary)}
    base = np.int64(len(vocabulary))

    def codes(trace: Trace) -> np.ndarray:
        tokens = np.fromiter((token_of.get(s, UNK) for s in trace.syscalls), np.int64, len(trace.syscalls))
        w = windows_of_trace(tokens, k)
        code = np.zeros(len(w), dtype=np.int64)
        for col in w.T:
            code = code * base + col
        # a window holding an unseen syscall can never be normal
        code[(w == UNK).any(axis=1)] = -1
        return code

    known = np.unique(np.concatenate([codes(t) for t in train]))
    known = known[known >= 0]
    out = np.empty(len(tests))
    for i, t in enumerate(tests):
        c = codes(t)
        out[i] = float((~np.isin(c, known)).mean()) if len(c) else 0.0
    return out


def evaluate_adfa(root: str | Path, cfg: TrainConfig, *, quick: bool = False, progress: bool = True,
                  model_out: str | None = None) -> dict[str, Any]:
    started = time.monotonic()
    limits = {"train": 250, "validation": 600, "attack": 240} if quick else {}
    train = adfa_traces(root, "train", limit=limits.get("train"))
    normal = adfa_traces(root, "validation", limit=limits.get("validation"))
    attack = adfa_traces(root, "attack", limit=limits.get("attack"))
    if quick:
        cfg = replace(cfg, epochs=min(cfg.epochs, 4))
    with tempfile.TemporaryDirectory() as tmp:
        out = model_out or str(Path(tmp) / "adfa.onnx")
        report = train_model(train, out, cfg, progress=progress, how=f"sysgram eval adfa {root}")
        model = load_model(out, threads=cfg.threads)
        score_started = time.monotonic()
        normal_w = trace_window_scores(model, normal)
        attack_w = trace_window_scores(model, attack)
        score_seconds = time.monotonic() - score_started
    result: dict[str, Any] = {}
    for how in ("mean", "median", "trimmed", "max"):
        result[f"model_{how}"] = rates(np.array([aggregate(s, how) for s in normal_w]),
                                       np.array([aggregate(s, how) for s in attack_w]))
    model_rates = dict(result["model_mean"])
    model_rates.update({"aggregate": "mean", "n": cfg.n, "scoring": "newest" if cfg.newest else "masked",
                        "epochs_run": report.epochs_run,
                        "train_seconds": round(report.seconds, 1), "score_seconds": round(score_seconds, 1),
                        "train_traces": report.traces, "train_windows": report.windows})
    stide_normal, stide_attack = stide_scores(train, normal), stide_scores(train, attack)
    stide = rates(stide_normal, stide_attack)
    stide["window"] = STIDE_WINDOW
    per_class: dict[str, float] = {}
    threshold = float(np.quantile([aggregate(s) for s in normal_w], 0.95))
    for label in sorted({t.label for t in attack}):
        idx = [i for i, t in enumerate(attack) if t.label == label]
        per_class[label] = float(np.mean([aggregate(attack_w[i]) > threshold for i in idx]))
    return {
        "model": model_rates, "stide": stide,
        "aggregates": {k[6:]: v for k, v in result.items()},
        "model_dr_per_class_at_far5": per_class,
        "roc": {"model": _roc(normal_w, attack_w), "stide": _roc_raw(stide_normal, stide_attack)},
        "quick": quick, "seconds": round(time.monotonic() - started, 1),
    }


def _roc(normal_w: list[np.ndarray], attack_w: list[np.ndarray]) -> dict[str, list[float]]:
    return _roc_raw(np.array([aggregate(s) for s in normal_w]), np.array([aggregate(s) for s in attack_w]))


def _roc_raw(normal: np.ndarray, attack: np.ndarray) -> dict[str, list[float]]:
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(normal)), np.ones(len(attack))], np.r_[normal, attack])
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def plot_roc(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name in ("model", "stide"):
        roc = result["roc"][name]
        ax.plot(roc["fpr"], roc["tpr"], label=f"{name} (AUC {result[name]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false-alarm rate (normal traces)")
    ax.set_ylabel("detection rate (attack traces)")
    ax.set_title("ADFA-LD: Validation vs Attack")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["PAD", "evaluate_adfa", "plot_roc", "rates", "stide_scores"]

"""``sysgram train`` (offline retraining from recordings), ``sysgram eval adfa`` (the ADFA-LD protocol), and
what ``sysgram inspect MODEL.onnx`` shows of a model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent._argtypes import bounded_int, check_model_file, epochs, seed
from agent.errors import ConfigError

ADFA_EPOCHS = 20  # the configuration measured on ADFA-LD (docs/model.md), ~10 min end to end on 2 cores


def register(subparsers: Any) -> None:
    train = subparsers.add_parser("train", help="train the anomaly model from recordings (needs the train extras)")
    train.add_argument("--input", "-i", nargs="+", required=True, metavar="REC", help="sysgram recordings")
    train.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                       help="model to write (the sidecar goes next to it, same stem + .json)")
    train.add_argument("--exe", action="append", default=[], metavar="PATH",
                       help="train only on these executables (repeatable; default: every program recorded)")
    train.add_argument("--epochs", type=epochs, default=8)
    train.add_argument("--seed", type=seed, default=0)
    train.add_argument("--window", type=window_length, default=None,
                       help=f"window length n, 2-{WINDOW_MAX} (default: measured)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    ev = subparsers.add_parser("eval", help="evaluate the model on a public dataset")
    which = ev.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    adfa = which.add_parser("adfa", help="ADFA-LD: train on Training, test Validation (normal) vs Attack")
    adfa.add_argument("directory", metavar="DIR", help="ADFA-LD root (Training_Data_Master/ ...)")
    adfa.add_argument("--json", action="store_true", help="print the results as JSON")
    adfa.add_argument("--plot", metavar="PNG", help="write both ROC curves to this PNG")
    adfa.add_argument("--quick", action="store_true", help="a subset of traces and few epochs (smoke test)")
    adfa.add_argument("--epochs", type=epochs, default=ADFA_EPOCHS,
                      help=f"training epochs (default {ADFA_EPOCHS}: measured in docs/model.md)")
    adfa.add_argument("--window", type=window_length, default=None, help=f"window length n, 2-{WINDOW_MAX}")
    adfa.add_argument("--seed", type=seed, default=0)
    adfa.add_argument("--masked", action="store_true",
                      help="the 4-pass masked autoencoder scoring every position (before issue 3), not the newest "
                           "syscall from the n-1 before it")
    adfa.add_argument("--save-model", metavar="MODEL.onnx", help="keep the trained model")
    adfa.set_defaults(handler=_eval_adfa)


# n: 2 at least (a window predicts one syscall from the ones before it); at most 128 (the network's first
# layer and the training windows grow with n: 100,000 took this host's 24 GB)
WINDOW_MAX = 128
window_length = bounded_int(2, WINDOW_MAX)


def _need_training() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("training needs the train extras (pip install 'sysgram[train]')") from None


def _train(args: argparse.Namespace) -> int:
    _need_training()
    from training.train import DEFAULT_N, train_from_recordings

    check_model_file(args.output)
    report = train_from_recordings(args.input, args.output, exes=args.exe, epochs=args.epochs, seed=args.seed,
                                   progress=not args.no_progress, n=args.window or DEFAULT_N)
    print(f"wrote {report.summary()}")
    if note := report.thin_note():
        print(note)
    if note := report.blind_note():
        print(f"sysgram: warning: {note}", file=sys.stderr)
    return 0


def _eval_adfa(args: argparse.Namespace) -> int:
    _need_training()
    from training.evaluate import evaluate_adfa, plot_roc
    from training.train import DEFAULT_N, TrainConfig

    if not Path(args.directory).is_dir():
        raise ConfigError("no such directory", path=args.directory)
    if args.plot and (not args.plot.endswith(".png") or Path(args.plot).is_dir()
                      or not Path(args.plot).resolve().parent.is_dir()):  # said now, not after the evaluation
        raise ConfigError("--plot takes a .png file path in an existing directory", path=args.plot)
    if args.save_model:
        check_model_file(args.save_model)
    cfg = TrainConfig(n=args.window or (16 if args.masked else DEFAULT_N), seed=args.seed, newest=not args.masked,
                      **({"epochs": args.epochs} if args.epochs else {}))
    result = evaluate_adfa(args.directory, cfg, quick=args.quick, progress=not args.json,
                           model_out=args.save_model)
    if args.plot:
        plot_roc(result, args.plot)
    roc = result.pop("roc")
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("detector", "AUC", "FAR@DR90", "DR@FAR1%", "DR@FAR5%", title="ADFA-LD, Validation vs Attack")
    for name in ("model", "stide"):
        r = result[name]
        table.add_row(name, f"{r['auc']:.3f}", f"{r['far_at_dr90']:.1%}", f"{r['dr_at_far1']:.1%}",
                      f"{r['dr_at_far5']:.1%}")
    Console().print(table)
    m = result["model"]
    print(f"{m['normal_traces']} normal and {m['attack_traces']} attack traces; window n={m['n']}, "
          f"{m['epochs_run']} epochs; {result['seconds']:.0f}s" + (f"; ROC curves in {args.plot}" if args.plot else ""))
    del roc
    return 0


def model_summary(path: str, program: str | None = None) -> dict[str, Any]:
    """What a model knows, for ``sysgram inspect MODEL.onnx``: its make-up, and per program slot the syscalls
    it made in the known windows, its held-out traces judged in calibration and its thresholds. With
    ``program``: that slot alone, with the syscalls by name."""
    import numpy as np

    from agent.model import load_model
    from agent.model._sidecar import GENERIC_PROGRAM, SPECIALS

    model = load_model(path)
    side = model.sidecar
    th = side.thresholds
    calibration = _mapping(_mapping(side.raw, "calibration"), "programs")
    if program is not None and program not in side.programs:
        raise ConfigError(f"the model has no program {program!r} (it has {len(side.programs) - 1}; "
                          f"`sysgram inspect {path}` lists them)", path=path)

    def made_by(slot: int) -> list[str] | None:
        if model.made is None or side.programs[slot] == GENERIC_PROGRAM:
            return None
        return sorted(side.vocabulary[t] for t in np.flatnonzero(model.made[slot]) if side.vocabulary[t] not in SPECIALS)

    programs = []
    for slot, name in enumerate(side.programs):
        if program is not None and name != program:
            continue
        made = made_by(slot)
        entry: dict[str, Any] = {
            "program": name,
            "syscalls_made": None if made is None else len(made),
            "judged_traces": _mapping(calibration, name).get("judged_traces"),
            "process_threshold": th.process_for(name),
            "window_threshold": th.window_for(name),
            "startup_thresholds": [list(b) for b in th.startup_for(name)],
        }
        # no score exceeds the cap: at or above it, a threshold is never crossed (the slot cannot alert)
        cap = side.nll_cap
        entry["cannot_alert"] = cap is not None and th.process_for(name) >= cap
        entry["startup_cannot_alert"] = [w for w, t in th.startup_for(name) if cap is not None and t >= cap]
        if program is not None:
            entry["syscalls"] = made
        programs.append(entry)
    made_info = _mapping(side.raw, "made")
    return {
        "model": path, "n": side.n, "tokens": side.vocab_size, "program_slots": len(side.programs),
        "programs": programs,
        "known_windows": len(model.known_keys),
        "unk_cost": side.unk_cost, "nll_cap": side.nll_cap,
        "target_process_far": th.target_process_far, "target_window_far": th.target_window_far,
        "min_windows": th.min_windows, "training_data": _mapping(side.raw, "training_data"),
        "created": made_info.get("created"), "how": made_info.get("how"),
    }


def _mapping(raw: Any, key: str) -> dict[str, Any]:
    """``raw[key]`` when both are JSON objects, else {}: the sidecar's descriptive fields (how it was made,
    calibration details) are optional and the model loads without them, so showing them must not fail."""
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, dict) else {}


def print_model_summary(summary: dict[str, Any]) -> None:
    """The text form of :func:`model_summary`: two lines about the model, then a row per program slot."""

    def number(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"

    def count(value: Any) -> str:
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "?"

    data = summary["training_data"]

    print(f"{summary['model']}: n {summary['n']}, {summary['tokens']} tokens, {summary['program_slots']} program "
          f"slots (* = any other program), {summary['known_windows']:,} known windows, nll cap "
          f"{number(summary['nll_cap'])} (unseen syscall {number(summary['unk_cost'])})")
    print(f"  made {summary['created'] or '?'} from {count(data.get('traces'))} traces ({count(data.get('windows'))} "
          f"windows); targets: process false alarms {summary['target_process_far']:g}, windows "
          f"{summary['target_window_far']:g}; judged from {summary['min_windows']} windows")
    print(f"  {'program':<48} {'syscalls':>8} {'judged':>6} {'process':>8} {'window':>7}  start-up")
    for p in summary["programs"]:
        startup = " ".join(f"<{w}:{number(t)}" + ("!" if w in p.get("startup_cannot_alert", ()) else "")
                           for w, t in p["startup_thresholds"]) or "-"
        made = "-" if p["syscalls_made"] is None else p["syscalls_made"]
        judged = "-" if p["judged_traces"] is None else p["judged_traces"]
        blind = "!" if p.get("cannot_alert") else " "
        print(f"  {p['program']:<48} {made:>8} {judged:>6} {number(p['process_threshold']):>7}{blind} "
              f"{number(p['window_threshold']):>7}  {startup}")
        if "syscalls" in p:
            print(f"    syscalls made while learning: {' '.join(p['syscalls']) if p['syscalls'] else '(not known)'}")
    if any(p.get("cannot_alert") or p.get("startup_cannot_alert") for p in summary["programs"]):
        print(f"  ! at or above the nll cap {number(summary['nll_cap'])}, which bounds every score: never crossed, so "
              "no anomaly alert from the model for that program (or that start-up bucket); rules still apply")

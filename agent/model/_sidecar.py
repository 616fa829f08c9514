"""The JSON sidecar that travels next to the .onnx (same stem): what the numbers in the graph mean."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent._files import read_regular
from agent.errors import ModelError

FORMAT = "sysgram-model"
VERSION = 1
GENERIC_PROGRAM = "*"  # program slot 0: any executable the model was not trained on
SPECIALS = ("<pad>", "<unk>", "<mask>")
PAD, UNK, MASK = 0, 1, 2


@dataclass(frozen=True)
class Thresholds:
    """Per program (``*`` = any other): a window's score and a process's aggregate over a span."""

    window: dict[str, float]
    process: dict[str, float]
    min_windows: int
    target_window_far: float
    target_process_far: float
    # optional: per program, ((windows_below, threshold), ...) ascending: a process's first span is judged
    # against these while it has fewer windows (start-ups score higher than routines; docs/model.md)
    process_startup: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)

    def window_for(self, exe: str) -> float:
        return self.window.get(exe, self.window[GENERIC_PROGRAM])

    def process_for(self, exe: str) -> float:
        return self.process.get(exe, self.process[GENERIC_PROGRAM])

    def startup_for(self, exe: str) -> tuple[tuple[int, float], ...]:
        if exe in self.process:  # a program with its own routine threshold has its own start-up ones (or none)
            return self.process_startup.get(exe, ())
        return self.process_startup.get(GENERIC_PROGRAM, ())


@dataclass(frozen=True)
class Sidecar:
    path: str
    n: int
    passes: int
    vocabulary: tuple[str, ...]
    programs: tuple[str, ...]
    unk_cost: float
    aggregate: str
    thresholds: Thresholds
    raw: dict[str, Any]
    # optional: the only positions the graph scores (a one-pass target model); None = every position
    score_positions: tuple[int, ...] | None = None
    # optional: no position's NLL counts for more than this (training sets it to unk_cost: a known syscall
    # out of place costs no more than one never seen); None = uncapped, as older models were scored
    nll_cap: float | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def _need(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    if key not in raw:
        raise ModelError(f"sidecar has no {key!r}", path=path)
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelError(f"sidecar field {key!r} has the wrong type ({type(value).__name__})", path=path)
    return value


def _threshold(value: Any, where: str, path: str) -> float:
    """A score threshold: a finite number >= 0 (NaN is never crossed and would switch detection off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ModelError(f"sidecar {where} must be a finite number >= 0, not {value!r}", path=path)
    return float(value)


def _float_map(raw: Any, key: str, path: str) -> dict[str, float]:
    if not isinstance(raw, dict) or GENERIC_PROGRAM not in raw:
        raise ModelError(f"sidecar thresholds.{key} must map programs to numbers, with '*'", path=path)
    return {str(k): _threshold(v, f"thresholds.{key}[{str(k)!r}]", path) for k, v in raw.items()}


def _startup_map(raw: Any, path: str) -> dict[str, tuple[tuple[int, float], ...]]:
    """thresholds.process_startup: {program: [[windows_below, threshold], ...]} with windows_below rising."""
    if raw is None:
        return {}
    where = "sidecar thresholds.process_startup"
    if not isinstance(raw, dict):
        raise ModelError(f"{where} must map programs to [[windows, threshold], ...]", path=path)
    out: dict[str, tuple[tuple[int, float], ...]] = {}
    for program, buckets in raw.items():
        try:
            pairs = tuple((int(b[0]), float(b[1])) for b in buckets if len(b) == 2)
        except (TypeError, ValueError, IndexError):
            pairs = ()
        bounds = [b for b, _ in pairs]
        if not pairs or len(pairs) != len(buckets) or bounds != sorted(set(bounds)) or bounds[0] < 1:
            raise ModelError(f"{where}[{program!r}] must be [[windows, threshold], ...] with rising windows",
                             path=path)
        for _, value in pairs:
            _threshold(value, f"thresholds.process_startup[{str(program)!r}]", path)
        out[str(program)] = pairs
    return out


AGGREGATES = ("mean",)  # how window scores become a process's: the one the runtime computes
MIN_WINDOWS_MAX = 1_000_000  # more and no process would ever be judged


def _count(value: Any, where: str, path: str) -> int:
    if isinstance(value, float) and value.is_integer():  # 16.0 from a JSON writer that writes floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MIN_WINDOWS_MAX:
        raise ModelError(f"sidecar {where} must be a whole number from 1 to {MIN_WINDOWS_MAX:,}, not {value!r}",
                         path=path)
    return value


def _positive(value: Any, where: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelError(f"sidecar {where} must be a finite positive number, not {value!r}", path=path)
    return float(value)


def _fraction(value: Any, where: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ModelError(f"sidecar {where} must be a rate between 0 and 1, not {value!r}", path=path)
    return float(value)


def parse_sidecar(raw: Any, path: str) -> Sidecar:
    if not isinstance(raw, dict):
        raise ModelError("sidecar is not a JSON object", path=path)
    if raw.get("format") != FORMAT:
        raise ModelError(f"not a sysgram model sidecar (format {raw.get('format')!r})", path=path)
    if raw.get("version") != VERSION:
        raise ModelError(
            f"unknown sidecar version {raw.get('version')!r} (this sysgram reads version {VERSION})", path=path
        )
    n = _need(raw, "n", int, path)
    passes = _need(raw, "passes", int, path)
    vocab = _need(raw, "vocabulary", list, path)
    programs = _need(raw, "programs", list, path)
    if n < 2 or passes < 1 or n % passes:
        raise ModelError(f"sidecar n={n} / passes={passes} are inconsistent", path=path)
    if tuple(vocab[:3]) != SPECIALS or not all(isinstance(v, str) for v in vocab) or len(set(vocab)) != len(vocab):
        raise ModelError(f"sidecar vocabulary must be unique names starting with {list(SPECIALS)}", path=path)
    if not programs or programs[0] != GENERIC_PROGRAM or not all(isinstance(p, str) for p in programs):
        raise ModelError(f"sidecar programs must be names starting with {GENERIC_PROGRAM!r}", path=path)
    score_positions = raw.get("score_positions")
    if score_positions is not None:
        if (not isinstance(score_positions, list) or not score_positions
                or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < n for p in score_positions)):
            raise ModelError(f"sidecar score_positions must be a non-empty list of positions 0..{n - 1}", path=path)
        score_positions = tuple(score_positions)
    nll_cap = raw.get("nll_cap")
    if nll_cap is not None:
        _positive(nll_cap, "nll_cap", path)
    unk_cost = _positive(_need(raw, "unk_cost", (int, float), path), "unk_cost", path)
    aggregate = raw.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise ModelError(f"sidecar aggregate must be one of {list(AGGREGATES)}, not {aggregate!r}", path=path)
    specials = raw.get("specials")
    if specials is not None and specials != dict(zip(("pad", "unk", "mask"), (PAD, UNK, MASK), strict=True)):
        raise ModelError(f"sidecar specials must be {{'pad': {PAD}, 'unk': {UNK}, 'mask': {MASK}}}, not {specials!r}",
                         path=path)
    th = _need(raw, "thresholds", dict, path)
    try:
        thresholds = Thresholds(
            window=_float_map(th.get("window"), "window", path),
            process=_float_map(th.get("process"), "process", path),
            min_windows=_count(th["min_windows"], "thresholds.min_windows", path),
            target_window_far=_fraction(th["target_window_far"], "thresholds.target_window_far", path),
            target_process_far=_fraction(th["target_process_far"], "thresholds.target_process_far", path),
            process_startup=_startup_map(th.get("process_startup"), path),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"sidecar thresholds malformed ({err})", path=path) from None
    return Sidecar(
        path=path, n=n, passes=passes, vocabulary=tuple(vocab), programs=tuple(programs),
        unk_cost=unk_cost,
        aggregate=str(aggregate), thresholds=thresholds, raw=raw,
        score_positions=score_positions, nll_cap=None if nll_cap is None else float(nll_cap),
    )


def read_sidecar(onnx_path: str | Path) -> Sidecar:
    path = sidecar_path(onnx_path)
    try:
        text = read_regular(path).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ModelError(f"sidecar is not UTF-8 text (byte {err.start})", path=str(path)) from None
    except FileNotFoundError:
        raise ModelError(f"model sidecar missing (expected next to {Path(onnx_path).name})", path=str(path)) from None
    except OSError as err:
        raise ModelError(f"cannot read model sidecar: {err.strerror}", path=str(path)) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(f"sidecar is not valid JSON: {err.msg}", path=str(path), line=err.lineno,
                         col=err.colno) from None
    except RecursionError:
        raise ModelError("sidecar JSON is nested too deeply", path=str(path)) from None
    return parse_sidecar(raw, str(path))

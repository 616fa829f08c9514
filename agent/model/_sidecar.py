"""The JSON sidecar that travels next to the .onnx (same stem): what the numbers in the graph mean."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _float_map(raw: Any, key: str, path: str) -> dict[str, float]:
    if not isinstance(raw, dict) or GENERIC_PROGRAM not in raw:
        raise ModelError(f"sidecar thresholds.{key} must map programs to numbers, with '*'", path=path)
    try:
        return {str(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ModelError(f"sidecar thresholds.{key} holds a non-number", path=path) from None


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
        out[str(program)] = pairs
    return out


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
    if nll_cap is not None and (isinstance(nll_cap, bool) or not isinstance(nll_cap, (int, float))
                                or not nll_cap > 0):
        raise ModelError(f"sidecar nll_cap must be a positive number, not {nll_cap!r}", path=path)
    th = _need(raw, "thresholds", dict, path)
    try:
        thresholds = Thresholds(
            window=_float_map(th.get("window"), "window", path),
            process=_float_map(th.get("process"), "process", path),
            min_windows=int(th["min_windows"]),
            target_window_far=float(th["target_window_far"]),
            target_process_far=float(th["target_process_far"]),
            process_startup=_startup_map(th.get("process_startup"), path),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"sidecar thresholds malformed ({err})", path=path) from None
    return Sidecar(
        path=path, n=n, passes=passes, vocabulary=tuple(vocab), programs=tuple(programs),
        unk_cost=float(_need(raw, "unk_cost", (int, float), path)),
        aggregate=str(raw.get("aggregate", "mean")), thresholds=thresholds, raw=raw,
        score_positions=score_positions, nll_cap=None if nll_cap is None else float(nll_cap),
    )


def read_sidecar(onnx_path: str | Path) -> Sidecar:
    path = sidecar_path(onnx_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelError(f"model sidecar missing (expected next to {Path(onnx_path).name})", path=str(path)) from None
    except OSError as err:
        raise ModelError(f"cannot read model sidecar: {err.strerror}", path=str(path)) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(f"sidecar is not valid JSON: {err.msg}", path=str(path), line=err.lineno,
                         col=err.colno) from None
    return parse_sidecar(raw, str(path))

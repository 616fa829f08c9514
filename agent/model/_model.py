"""A loaded model: the onnxruntime session, its sidecar, and syscall-number -> token tables."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # loaded when a model is: every other sysgram command starts without it
    import onnxruntime as ort

from agent.capture.names import name_table
from agent.errors import ModelError
from agent.model._sidecar import GENERIC_PROGRAM, MASK, PAD, UNK, Sidecar, read_sidecar
from agent.model._windows import window_keys

INPUT_TOKENS, INPUT_PROGRAM, OUTPUT_NLL = "tokens", "program", "nll"
_RUN_CHUNK = 256  # windows per session run: the gathered [chunk, n, hidden] tensor stays in L2 (1024 ran ~1.8x
# faster than 8192; 256 a further 5-30% over 1024 for the learn net, h128: measured in docs/performance.md)


@dataclass
class Model:
    """The ONNX scorer and what its numbers mean. Build with :func:`load_model`."""

    path: str
    sidecar: Sidecar
    session: ort.InferenceSession
    session_runs: int = 0
    # keys (this process's secret hash) of the (program, window) pairs seen in training, sorted: see is_known
    known_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    # bool [programs, vocabulary]: the tokens each program slot made in its known windows (see made_tokens);
    # None without known windows
    made: np.ndarray | None = None
    _token_of: dict[str, int] = field(default_factory=dict)
    _program_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._token_of = {name: i for i, name in enumerate(self.sidecar.vocabulary)}
        self._program_of = {exe: i for i, exe in enumerate(self.sidecar.programs)}
        self.nr_tokens = {compat: self._nr_table(compat) for compat in (False, True)}

    @property
    def n(self) -> int:
        return self.sidecar.n

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return self.sidecar.vocabulary

    def _nr_table(self, compat: bool) -> np.ndarray:
        names = name_table(compat)
        return np.array([self._token_of.get(str(nm), UNK) for nm in names], dtype=np.int64)

    def tokens_of_names(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        return np.array([self._token_of.get(nm, UNK) for nm in names], dtype=np.int64)

    def program_id(self, program: str) -> int:
        """The program slot of ``program``; 0 (generic) for programs the model never saw."""
        return self._program_of.get(program, 0)

    def program_name(self, program: int) -> str:
        return self.sidecar.programs[program] if 0 <= program < len(self.sidecar.programs) else GENERIC_PROGRAM

    def score(self, tokens: np.ndarray, programs: np.ndarray) -> np.ndarray:
        """Per-position NLL [B, n] (float32) of windows [B, n], at most ``nll_cap``; unknown syscalls cost
        ``unk_cost``."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        programs = np.ascontiguousarray(programs, dtype=np.int64)
        out = np.empty(tokens.shape, dtype=np.float32)
        for start in range(0, len(tokens), _RUN_CHUNK):
            stop = start + _RUN_CHUNK
            (out[start:stop],) = self.session.run(
                [OUTPUT_NLL], {INPUT_TOKENS: tokens[start:stop], INPUT_PROGRAM: programs[start:stop]}
            )
            self.session_runs += 1
        # the net never predicts UNK, so its NLL there is huge and would drown the rest of the window
        out[tokens == UNK] = self.sidecar.unk_cost
        if self.sidecar.nll_cap is not None:  # after UNK: no position costs more, whatever the sidecar says
            np.minimum(out, self.sidecar.nll_cap, out=out)
        out[tokens == PAD] = 0.0
        return out

    def is_known(self, keys: np.ndarray) -> np.ndarray:
        """Which window keys (:func:`window_keys`) the program made in training: those windows score 0.

        The network generalises; it also gives a normal but rare window (seen once among thousands of
        processes) a high NLL. A window the program is known to make is not evidence of anything new.
        """
        if not len(self.known_keys) or not len(keys):
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self.known_keys, keys), len(self.known_keys) - 1)
        return self.known_keys[at] == keys

    def known_or_scored(self, tokens: np.ndarray, programs: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, int]:
        """Scores of distinct windows [B, n] with their keys: 0 for known ones (not run through the
        network), :meth:`window_scores` for the rest; and how many were known."""
        known = self.is_known(keys)
        count = int(np.count_nonzero(known))
        scores = np.zeros(len(keys), dtype=np.float64)
        if count < len(keys):
            novel = np.flatnonzero(~known) if count else slice(None)  # none known (the usual case): no copies
            tokens = tokens[novel]
            scores[novel] = self.window_scores(self.score(tokens, programs[novel]), tokens)
        return scores, count

    def window_scores(self, nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Mean NLL over the real (non-PAD) scored positions of each window (all positions unless the
        sidecar names ``score_positions``, as a one-pass target model does)."""
        positions = self.sidecar.score_positions
        if positions is not None:
            nll, tokens = nll[:, list(positions)], tokens[:, list(positions)]
        real = np.maximum((tokens != PAD).sum(axis=1), 1)
        return nll.sum(axis=1) / real


def _session(path: str, threads: int) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # ~25% over basic, measured
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped errors for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"not a loadable ONNX model (corrupt or truncated?): {first[:200]}", path=path) from None


def known_path(onnx_path: str | Path) -> Path:
    """Where a model's known windows live: same stem, ``.known.npz``."""
    return Path(onnx_path).with_suffix(".known.npz")


def known_rows(programs: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The distinct (program, window) rows [k, 1 + n] worth keeping as known, compact (uint16 when they fit).

    Windows holding UNK or MASK are left out: UNK stands for every syscall the vocabulary lacks, so a held-out
    window with one would make any unseen syscall in that context known.
    """
    keep = ~np.isin(windows, (UNK, MASK)).any(axis=1)
    both = np.column_stack([programs[keep], windows[keep]])
    return np.unique(both.astype(np.uint16 if both.max(initial=0) < 1 << 16 else np.uint32), axis=0)


def write_known_windows(onnx_path: str | Path, rows: np.ndarray) -> dict[str, object]:
    """Write :func:`known_rows` to the model's ``.known.npz``; the sidecar entry to store."""
    path = known_path(onnx_path)
    tmp = path.with_suffix(".tmp.npz")
    try:
        np.savez_compressed(tmp, rows=rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "sha256": file_sha256(path), "windows": len(rows)}


_HASH_CHUNK = 65536  # rows hashed at a time: a large known set must not cost its int64 copy all at once


def hash_known(rows: np.ndarray) -> np.ndarray:
    """Sorted unique keys (this process's secret base) of (program, window) rows [k, 1 + n]."""
    parts = [window_keys(rows[i:i + _HASH_CHUNK, 1:], rows[i:i + _HASH_CHUNK, 0])
             for i in range(0, len(rows), _HASH_CHUNK)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def _read_rows(path: Path, sha256: str) -> np.ndarray:
    try:
        if file_sha256(path) != sha256:
            raise ModelError("known-windows file does not match its sidecar (sha256 differs)", path=str(path))
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an archive")
            return np.asarray(data["rows"])
    except ModelError:
        raise
    except Exception as err:  # numpy raises many kinds (EOFError, TypeError, tokenize errors) for bad files
        raise ModelError(f"known-windows file is not a readable .npz with 'rows' ({type(err).__name__}: "
                         f"{str(err)[:120]})", path=str(path)) from None


def made_tokens(rows: np.ndarray, programs: int, vocab_size: int) -> np.ndarray:
    """bool [programs, vocab_size]: which tokens each program slot made in the known (program, window) rows.

    The generic slot's row is all True: a program the model never saw has no syscalls of its own to be
    compared with. Known rows leave out windows holding <unk>, so a syscall a program made only within n-1
    syscalls after one outside the vocabulary (possible in held-out traces only) counts as not made.
    """
    made = np.zeros((programs, vocab_size), dtype=bool)
    for i in range(0, len(rows), _HASH_CHUNK):
        chunk = rows[i:i + _HASH_CHUNK].astype(np.intp)
        made[np.repeat(chunk[:, 0], chunk.shape[1] - 1), chunk[:, 1:].ravel()] = True
    made[0] = True  # GENERIC_PROGRAM's slot
    return made


def _known_rows(sidecar: Sidecar, onnx_path: str) -> np.ndarray | None:
    """The sidecar's ``known_windows`` rows [k, 1 + n], checked against its tables; None when it has none."""
    entry = sidecar.raw.get("known_windows")
    if entry is None:
        return None
    name = entry.get("file") if isinstance(entry, dict) else None
    if (not isinstance(name, str) or not isinstance(entry.get("sha256"), str) or Path(name).name != name
            or name in ("", ".", "..")):
        raise ModelError('sidecar known_windows must be {"file": a file name, "sha256": ...}', path=sidecar.path)
    # next to the model, never elsewhere: by the name it was written under, or by the model's own stem
    # (a model renamed as a whole, .onnx, .json and .known.npz)
    path = Path(onnx_path).parent / name
    if not path.is_file() and known_path(onnx_path).is_file():
        path = known_path(onnx_path)
    if not path.is_file():
        raise ModelError(f"known-windows file missing (named by {Path(sidecar.path).name}; copy "
                         f"{name} with the model)", path=str(path))
    rows = _read_rows(path, entry["sha256"])
    n = sidecar.n
    if rows.ndim != 2 or rows.shape[1] != n + 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ModelError(f"known-windows rows must be integers [k, {n + 1}] (program, then {n} tokens), "
                         f"not {rows.dtype} {list(rows.shape)}", path=str(path))
    if len(rows) and (rows.min() < 0 or rows[:, 0].max() >= len(sidecar.programs)
                      or rows[:, 1:].max() >= sidecar.vocab_size):
        raise ModelError("known-windows rows hold a program or token outside the sidecar's tables", path=str(path))
    if len(rows) and np.isin(rows[:, 1:], (UNK, MASK)).any():
        raise ModelError("known-windows rows hold <unk> or <mask>, which stand for more than one syscall",
                         path=str(path))
    return rows


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path, *, threads: int = 1) -> Model:
    """Load ``path`` (.onnx) and its sidecar (same stem, .json), checking that they belong together."""
    onnx_path = str(path)
    if Path(onnx_path).is_dir():
        raise ModelError("a directory, not a model file", path=onnx_path)
    if not Path(onnx_path).is_file():
        raise ModelError("no such model file", path=onnx_path)
    sidecar = read_sidecar(onnx_path)
    expected = sidecar.raw.get("onnx_sha256")
    if isinstance(expected, str) and expected != file_sha256(onnx_path):
        raise ModelError(f"model file does not match its sidecar {Path(sidecar.path).name} (sha256 differs; "
                         "truncated, replaced or retrained without its sidecar?)", path=onnx_path)
    session = _session(onnx_path, threads)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    if set(inputs) != {INPUT_TOKENS, INPUT_PROGRAM} or outputs != [OUTPUT_NLL]:
        raise ModelError(f"ONNX inputs {sorted(inputs)} / outputs {outputs} are not "
                         f"{[INPUT_PROGRAM, INPUT_TOKENS]} / {[OUTPUT_NLL]}", path=onnx_path)
    width = inputs[INPUT_TOKENS].shape[-1] if inputs[INPUT_TOKENS].shape else None
    if width != sidecar.n:
        raise ModelError(f"ONNX window width {width} does not match sidecar n={sidecar.n}", path=onnx_path)
    meta = session.get_modelmeta().custom_metadata_map
    for key, want in (("vocab_size", sidecar.vocab_size), ("programs", len(sidecar.programs)),
                      ("n", sidecar.n)):
        got = meta.get(f"sysgram.{key}")
        if got is None or got != str(want):
            raise ModelError(f"ONNX {key}={got} does not match sidecar {key}={want}", path=onnx_path)
    rows = _known_rows(sidecar, onnx_path)
    if rows is None:
        return Model(path=onnx_path, sidecar=sidecar, session=session)
    return Model(path=onnx_path, sidecar=sidecar, session=session, known_keys=hash_known(rows),
                 made=made_tokens(rows, len(sidecar.programs), sidecar.vocab_size))

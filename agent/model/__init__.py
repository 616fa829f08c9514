"""The anomaly model at runtime: per-thread syscall windows, the ONNX scorer with its cache, explanations.

Public API (numpy + onnxruntime only; training lives in ``training/``)::

    model = load_model("models/sysgram-default.onnx")        # ModelError naming the file on any problem
    model.is_known(window_keys(tokens, programs))           # windows made in training (sidecar known_windows) score 0
    detector = AnomalyDetector(model, cache_size=65536)
    anomalies = detector.push(batch, exe_of, program_of)      # SYSCALL_DTYPE rows; tgid -> exe, tgid -> program
    detector.on_fork(pid, tid, ts); detector.on_exec(tgid, tids, ts); detector.on_exit(tid, ts); detector.on_process_exit(pid, ts)
    detector.settle(now_ns)                                   # exited threads' windows go once their rows are in
    detector.state(pid) -> AnomalyState | None
    detector.stats -> {"windows", "windows_scored", "windows_known", "cache_hits", "cache_evictions", "pre_exec_rows", ...}

    cache = ScoreCache(size)                                  # numpy open-addressing table, key -> window score (signed)
    found, scores = cache.lookup(keys); cache.insert(new_keys, new_scores)
    win = ThreadWindows(n, model.nr_tokens).build(batch)      # Windows: views into one token buffer
    win.keys(programs) == window_keys(win.tokens, programs); win.take(index) -> int64 [k, n]
"""

from agent.model._detector import Anomaly, AnomalyDetector, AnomalyState, ScoreCache
from agent.model._model import (
    Model,
    file_sha256,
    hash_known,
    known_path,
    known_rows,
    load_model,
    write_known_windows,
)
from agent.model._sidecar import (
    FORMAT,
    GENERIC_PROGRAM,
    MASK,
    PAD,
    SPECIALS,
    UNK,
    VERSION,
    Sidecar,
    Thresholds,
    parse_sidecar,
    read_sidecar,
    sidecar_path,
)
from agent.model._windows import ThreadWindows, Windows, tokens_of_batch, window_keys, windows_of_trace

__all__ = [
    "FORMAT",
    "GENERIC_PROGRAM",
    "MASK",
    "PAD",
    "SPECIALS",
    "UNK",
    "VERSION",
    "Anomaly",
    "AnomalyDetector",
    "AnomalyState",
    "Model",
    "ScoreCache",
    "Sidecar",
    "ThreadWindows",
    "Thresholds",
    "Windows",
    "file_sha256",
    "hash_known",
    "known_path",
    "known_rows",
    "load_model",
    "parse_sidecar",
    "read_sidecar",
    "sidecar_path",
    "tokens_of_batch",
    "window_keys",
    "windows_of_trace",
    "write_known_windows",
]

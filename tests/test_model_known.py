"""Known windows (the (program, window) pairs of the training data travel with the model and score 0) and
the NLL cap (no syscall costs more than one never seen)."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.capture.names import syscall_number
from agent.cli import main
from agent.errors import ModelError
from agent.events import SYSCALL_DTYPE
from agent.model import AnomalyDetector, Model, file_sha256, known_path, load_model, window_keys
from training.datasets import Trace
from training.synthetic import ATTACK, HABITS, habit_trace, synthetic_traces, write_recording
from training.train import TrainConfig, encode_traces, trace_window_scores, train_model

TINY = {"hidden": 32, "bottleneck": 16, "dim": 8}
ALPHA = "/usr/bin/alpha"
TRACES = synthetic_traces(40, seed=3)
CFG = TrainConfig(n=8, epochs=3, threads=1, min_program_syscalls=500, net=TINY, min_windows=16)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("known") / "tiny.onnx"
    train_model(TRACES, out, CFG, progress=False)
    return out


@pytest.fixture()
def model(model_path: Path) -> Model:
    return load_model(model_path)


def copy_model(src: Path, dst_dir: Path) -> Path:
    for path in (src, src.with_suffix(".json"), known_path(src)):
        shutil.copy(path, dst_dir / path.name)
    return dst_dir / src.name


def distinct_pairs(model: Model, traces: list[Trace]) -> set[tuple[int, ...]]:
    windows, programs, _ = encode_traces(traces, model.vocabulary, model.sidecar.programs, model.n)
    return {tuple(row) for row in np.column_stack([programs, windows]).tolist()}


def test_the_model_ships_every_distinct_window_of_its_training_and_held_out_data(model: Model) -> None:
    entry = model.sidecar.raw["known_windows"]
    with np.load(known_path(model.path)) as data:
        rows = data["rows"]
    shipped = {tuple(row) for row in rows.astype(np.int64).tolist()}
    assert shipped == distinct_pairs(model, TRACES)  # training and held-out traces, each pair once
    assert entry["windows"] == len(rows) == len(shipped)
    assert entry["sha256"] == file_sha256(known_path(model.path))
    assert len(model.known_keys) == len(rows)


def test_known_windows_score_zero_without_the_network_and_new_ones_are_scored(model: Model) -> None:
    seen = TRACES[0]
    odd = Trace(program=ALPHA, syscalls=tuple(habit_trace(HABITS[ALPHA], 60, np.random.default_rng(0))[:30]
                                              + ATTACK * 4))
    runs = model.session_runs
    (seen_scores,) = trace_window_scores(model, [seen])
    assert len(seen_scores) == len(seen.syscalls) and not seen_scores.any()
    assert model.session_runs == runs  # nothing reached onnxruntime
    (odd_scores,) = trace_window_scores(model, [odd])
    windows, programs, _ = encode_traces([odd], model.vocabulary, model.sidecar.programs, model.n)
    novel = ~model.is_known(window_keys(windows, programs))
    assert novel.any() and (~novel).any()
    assert (odd_scores[~novel] == 0).all() and (odd_scores[novel] > 0).all()
    assert model.session_runs > runs


def test_the_same_windows_of_another_program_are_not_known(model: Model) -> None:
    windows, programs, _ = encode_traces(TRACES[:1], model.vocabulary, model.sidecar.programs, model.n)
    beta = model.program_id("/usr/bin/beta")
    assert programs[0] != beta and model.is_known(window_keys(windows, programs)).all()
    assert not model.is_known(window_keys(windows, np.full(len(windows), beta))).any()


def rows_of(names: list[str], pid: int) -> np.ndarray:
    out = np.zeros(len(names), dtype=SYSCALL_DTYPE)
    out["ts"] = np.arange(len(names)) * 1000
    out["tgid"] = out["tid"] = pid
    out["nr"] = [syscall_number(nm) for nm in names]
    return out


def test_the_detector_counts_known_windows_and_judges_only_novelty(model: Model) -> None:
    det = AnomalyDetector(model, cache_size=4096)
    for pid in (10, 11):
        det.on_fork(pid, pid)
    det.push(rows_of(list(TRACES[0].syscalls), 10), {10: ALPHA})
    stats = det.stats
    assert stats["windows_known"] == stats["windows_scored"] > 0 and model.session_runs == 0
    state = det.state(10)
    assert state is not None and state.score == 0.0 and not state.is_anomalous
    det.push(rows_of(list(TRACES[2].syscalls[:40]) + ATTACK * 20, 11), {11: ALPHA})
    assert det.stats["windows_scored"] > det.stats["windows_known"]  # the attack's windows went to the network
    state = det.state(11)
    assert state is not None and state.is_anomalous


def test_a_model_trained_without_known_windows_has_none(tmp_path: Path) -> None:
    out = tmp_path / "plain.onnx"
    known_path(out).write_bytes(b"an earlier model's")  # retrained to the same path: it must not stay
    train_model(TRACES, out, replace(CFG, known_windows=False, epochs=1), progress=False)
    assert not known_path(out).exists() and "known_windows" not in json.loads(out.with_suffix(".json").read_text())
    model = load_model(out)
    (scores,) = trace_window_scores(model, TRACES[:1])
    assert len(model.known_keys) == 0 and (scores > 0).all()
    assert model.made is None  # nothing to say which syscalls a program made: no new_syscalls in alerts


def test_the_shipped_model_loads_without_known_windows() -> None:
    model = load_model(Path(__file__).resolve().parents[1] / "models" / "sysgram-default.onnx")
    assert "known_windows" not in model.sidecar.raw and len(model.known_keys) == 0


def resign(dst: Path) -> None:
    """Make the sidecar's sha256 match the (spoiled) known-windows file again."""
    side = json.loads(dst.with_suffix(".json").read_text())
    side["known_windows"]["sha256"] = file_sha256(known_path(dst))
    dst.with_suffix(".json").write_text(json.dumps(side))


def rewrite_rows(dst: Path, rows: np.ndarray) -> None:
    np.savez_compressed(known_path(dst), rows=rows)
    resign(dst)


def spoil_with(dst: Path, content: bytes) -> None:
    """Replace the known-windows file's bytes, keeping the sidecar's sha256 true (the content is what's bad)."""
    known_path(dst).write_bytes(content)
    resign(dst)


def npy_bytes(array: np.ndarray) -> bytes:
    """A bare .npy (one array, not an .npz archive)."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("spoil, message", [
    (lambda dst: known_path(dst).unlink(), r"known-windows file missing \(named by tiny\.json"),
    (lambda dst: known_path(dst).write_bytes(known_path(dst).read_bytes()[:-9]), "sha256 differs"),
    (lambda dst: spoil_with(dst, b"not a zip"), "not a readable .npz"),
    (lambda dst: spoil_with(dst, npy_bytes(np.zeros((2, 9), np.uint16))), "not a readable .npz"),
    (lambda dst: spoil_with(dst, b""), "not a readable .npz"),
    (lambda dst: rewrite_rows(dst, np.array([[1] + [1] * 8], np.uint16)), "hold <unk> or <mask>"),
    (lambda dst: rewrite_rows(dst, np.zeros((3, 5), np.uint16)), "rows must be integers"),
    (lambda dst: rewrite_rows(dst, np.array([[0] + [60000] * 8], np.uint16)), "outside the sidecar's tables"),
    (lambda dst: rewrite_rows(dst, np.array([[999] + [3] * 8], np.uint16)), "outside the sidecar's tables"),
])
def test_a_bad_known_windows_file_is_one_model_error_naming_it(model_path: Path, tmp_path: Path, spoil,
                                                               message: str) -> None:
    dst = copy_model(model_path, tmp_path)
    spoil(dst)
    with pytest.raises(ModelError, match=message) as err:
        load_model(dst)
    assert str(known_path(dst)) in str(err.value)


def test_a_sidecar_entry_that_is_not_an_object_is_refused(model_path: Path, tmp_path: Path) -> None:
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    side["known_windows"] = "everything"
    dst.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ModelError, match="known_windows must be") as err:
        load_model(dst)
    assert str(dst.with_suffix(".json")) in str(err.value)


def test_the_cli_reports_a_missing_known_windows_file_in_one_line(model_path: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    dst = copy_model(model_path, tmp_path)
    known_path(dst).unlink()
    recording = write_recording(tmp_path / "r.parquet")
    code = main(["replay", str(recording), "--model", str(dst), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "known-windows" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- NLL cap


def out_of_place(model: Model) -> tuple[np.ndarray, np.ndarray]:
    """alpha's habit with beta's syscalls (in the vocabulary, never in alpha's windows) at the end."""
    names = [*TRACES[0].syscalls[:model.n - 2], "socket", "connect"]
    windows, programs, _ = encode_traces([Trace(program=ALPHA, syscalls=tuple(names))], model.vocabulary,
                                         model.sidecar.programs, model.n)
    return windows[-2:], programs[-2:]


def test_a_trained_model_caps_each_position_at_the_cost_of_an_unseen_syscall(model_path: Path, tmp_path: Path
                                                                             ) -> None:
    capped = load_model(model_path)
    cap = capped.sidecar.nll_cap
    assert cap is not None and cap == capped.sidecar.unk_cost
    windows, programs = out_of_place(capped)
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    del side["nll_cap"]
    dst.with_suffix(".json").write_text(json.dumps(side))
    uncapped = load_model(dst)
    assert uncapped.sidecar.nll_cap is None
    raw = uncapped.score(windows, programs)
    assert raw.max() > cap  # a known syscall out of place costs more than an unseen one, uncapped ...
    nll = capped.score(windows, programs)
    assert nll.max() == pytest.approx(cap) and (nll <= cap + 1e-6).all()  # ... and no more, capped
    assert np.allclose(nll, np.minimum(raw, cap))


@pytest.mark.parametrize("cap", [0, -1.0, "2", True])
def test_a_bad_nll_cap_is_refused_naming_the_sidecar(model_path: Path, tmp_path: Path, cap: object) -> None:
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    side["nll_cap"] = cap
    dst.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ModelError, match="nll_cap must be a finite positive number") as err:
        load_model(dst)
    assert str(dst.with_suffix(".json")) in str(err.value)


def test_without_the_cap_option_the_sidecar_has_none(tmp_path: Path) -> None:
    out = tmp_path / "uncapped.onnx"
    train_model(TRACES, out, replace(CFG, cap_nll=False, epochs=1), progress=False)
    model = load_model(out)
    assert model.sidecar.nll_cap is None and "nll_cap" not in model.sidecar.raw


@pytest.mark.parametrize("name", ["", ".", "..", "../tiny.known.npz", "/etc/tiny.known.npz"])
def test_a_known_windows_file_is_only_ever_a_file_next_to_the_model(model_path: Path, tmp_path: Path,
                                                                    name: str) -> None:
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    side["known_windows"]["file"] = name
    dst.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ModelError, match="must be"):
        load_model(dst)


def test_a_model_renamed_as_a_whole_still_finds_its_known_windows(model_path: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.onnx"
    shutil.copy(model_path, renamed)
    shutil.copy(model_path.with_suffix(".json"), renamed.with_suffix(".json"))
    shutil.copy(known_path(model_path), known_path(renamed))
    assert len(load_model(renamed).known_keys) == len(load_model(model_path).known_keys) > 0
    known_path(renamed).unlink()
    with pytest.raises(ModelError, match=r"copy tiny\.known\.npz with the model"):
        load_model(renamed)


def test_held_out_windows_with_an_unseen_syscall_are_not_known(tmp_path: Path) -> None:
    """<unk> stands for every syscall the vocabulary lacks: a held-out window holding one must not make
    every unseen syscall in that context known."""
    out = tmp_path / "unk.onnx"
    rng = np.random.default_rng(4)
    held = [Trace(program=ALPHA, syscalls=tuple(habit_trace(HABITS[ALPHA], 40, rng) + ["ptrace"] * 3
                                                + habit_trace(HABITS[ALPHA], 40, rng)))] * 2
    train_model(TRACES, out, replace(CFG, epochs=1), progress=False, holdout=held)
    model = load_model(out)
    assert "ptrace" not in model.vocabulary
    with np.load(known_path(out)) as data:
        rows = data["rows"].astype(np.int64)
    assert not np.isin(rows[:, 1:], (1, 2)).any()  # no <unk>, no <mask>
    odd = Trace(program=ALPHA, syscalls=(*held[0].syscalls[:40], "kexec_load"))
    windows, programs, _ = encode_traces([odd], model.vocabulary, model.sidecar.programs, model.n)
    assert not model.is_known(window_keys(windows[-1:], programs[-1:])).any()
    assert trace_window_scores(model, [odd])[0][-1] > 0


def test_thresholds_are_calibrated_on_the_network_alone(tmp_path: Path) -> None:
    """Known windows only lower scores at runtime: calibration must not see them, or held-out traces
    (whose windows are mostly known) would set near-zero thresholds."""
    made = {}
    for known in (True, False):
        out = tmp_path / f"m{known}.onnx"
        train_model(TRACES, out, replace(CFG, epochs=1, known_windows=known), progress=False)
        made[known] = json.loads(out.with_suffix(".json").read_text())["thresholds"]
    assert made[True] == made[False]


def test_the_known_set_holds_every_window_not_the_training_sample(tmp_path: Path) -> None:
    out = tmp_path / "sampled.onnx"
    held = synthetic_traces(4, seed=9)
    train_model(TRACES, out, replace(CFG, epochs=1, max_windows=3000), progress=False, holdout=held)
    model = load_model(out)
    assert json.loads(out.with_suffix(".json").read_text())["training_data"]["windows"] == 3000
    with np.load(known_path(out)) as data:
        shipped = {tuple(row) for row in data["rows"].astype(np.int64).tolist()}
    assert shipped == distinct_pairs(model, TRACES + held) and len(shipped) > 3000 // 8

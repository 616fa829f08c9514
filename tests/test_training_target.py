"""One-pass target models (score only the newest syscall) and the sidecar's optional score_positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from agent.errors import ModelError
from agent.model import PAD, UNK, load_model, parse_sidecar
from training.net import MaskedWindowAE, NetConfig, TargetScoringGraph
from training.synthetic import synthetic_traces
from training.train import TrainConfig, export_onnx, train_model

TINY = {"hidden": 32, "bottleneck": 16, "dim": 8}


def test_target_graph_scores_only_its_position_and_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = MaskedWindowAE(NetConfig(vocab_size=20, n=8, programs=2, target=7, **TINY)).eval()
    rng = np.random.default_rng(1)
    windows = rng.integers(3, 20, size=(200, 8)).astype(np.int64)
    windows[:5, :3] = PAD  # a thread's first windows
    programs = rng.integers(0, 2, size=200).astype(np.int64)
    assert export_onnx(net, tmp_path / "t.onnx", windows, programs) < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["nll"], {"tokens": windows[:9], "program": programs[:9]})
    assert got.shape == (9, 8)
    assert np.all(got[:, :7] == 0) and np.all(got[:, 7] > 0)
    # the target's own token is hidden: changing it changes its NLL but not what the net predicts from
    with torch.no_grad():
        graph = TargetScoringGraph(net)
        a = torch.from_numpy(windows[:1].copy())
        b = a.clone()
        b[0, 7] = 3 if int(a[0, 7]) != 3 else 4
        logp_a, logp_b = graph(a, torch.zeros(1, dtype=torch.long)), graph(b, torch.zeros(1, dtype=torch.long))
    assert float(logp_a[0, 7]) != float(logp_b[0, 7])


def test_trained_target_model_scores_one_position_per_window(tmp_path: Path) -> None:
    traces = synthetic_traces(16, seed=3, length=200)
    cfg = TrainConfig(n=8, epochs=3, threads=1, min_program_syscalls=500, net={**TINY, "target": 7})
    train_model(traces, tmp_path / "t.onnx", cfg, progress=False)
    side = json.loads((tmp_path / "t.json").read_text())
    assert side["passes"] == 1 and side["score_positions"] == [7]
    model = load_model(tmp_path / "t.onnx")
    assert model.sidecar.score_positions == (7,)
    tokens = model.tokens_of_names(list(traces[0].syscalls[:8]))[None, :]
    nll = model.score(tokens, np.zeros(1, dtype=np.int64))
    assert float(model.window_scores(nll, tokens)[0]) == pytest.approx(float(nll[0, 7]))
    # an unseen syscall at the target costs the sidecar's capped unk_cost, not the net's guess
    odd = tokens.copy()
    odd[0, 7] = UNK
    score = model.window_scores(model.score(odd, np.zeros(1, dtype=np.int64)), odd)[0]
    assert score == pytest.approx(model.sidecar.unk_cost)
    assert 0 < model.sidecar.unk_cost <= np.log(model.sidecar.vocab_size)


def test_sidecar_rejects_bad_score_positions(tmp_path: Path) -> None:
    traces = synthetic_traces(10, seed=5, length=120)
    cfg = TrainConfig(n=8, epochs=1, threads=1, min_program_syscalls=500, net={**TINY, "target": 7})
    train_model(traces, tmp_path / "t.onnx", cfg, progress=False)
    raw = json.loads((tmp_path / "t.json").read_text())
    for bad in ([8], [], "7", [True], [-1]):
        with pytest.raises(ModelError, match="score_positions"):
            parse_sidecar({**raw, "score_positions": bad}, "m.json")
    assert parse_sidecar({**raw, "score_positions": None}, "m.json").score_positions is None


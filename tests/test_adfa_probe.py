"""The ADFA-LD probes' building blocks, checked against brute force on small random data."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from training.adfa_probe import SuffixAutomaton, cover_scores, nearest_by_composition
from training.datasets import Trace


def _longest_known_suffix(known: list[list[str]], probe: list[str], end: int) -> int:
    best = 0
    for length in range(1, end + 2):
        piece = probe[end - length + 1:end + 1]
        if any(piece == seq[i:i + length] for seq in known for i in range(len(seq) - length + 1)):
            best = length
    return best


def test_matching_lengths_equal_brute_force() -> None:
    rnd = random.Random(7)
    alphabet = "abcd"
    for _ in range(30):
        known = [[rnd.choice(alphabet) for _ in range(rnd.randint(1, 12))] for _ in range(rnd.randint(1, 4))]
        probe = [rnd.choice(alphabet + "z") for _ in range(rnd.randint(1, 15))]
        sam = SuffixAutomaton()
        for seq in known:
            sam.add(seq)
        got = sam.matching_lengths(probe).tolist()
        assert got == [_longest_known_suffix(known, probe, j) for j in range(len(probe))], (known, probe)


def test_cover_counts_pieces_per_syscall() -> None:
    train = [Trace("*", ("open", "read", "close")), Trace("*", ("mmap", "brk"))]
    seen = Trace("*", ("open", "read", "close"))
    spliced = Trace("*", ("open", "read", "brk", "mmap"))  # pieces: open read | brk | mmap
    novel = Trace("*", ("ptrace",))
    scores = cover_scores(train, [seen, spliced, novel])
    assert np.allclose(scores, [1 / 3, 3 / 4, 1.0])


def test_composition_finds_the_nearest_trace() -> None:
    train = [Trace("*", ("open", "read")), Trace("*", ("socket", "connect", "read"))]
    tests = [Trace("*", ("read", "open", "read")), Trace("*", ("socket", "connect")), Trace("*", ("ptrace",))]
    nearest, novelty = nearest_by_composition(train, tests)
    assert nearest[:2].tolist() == [0, 1]
    assert np.allclose(novelty, [0.0, 1 - 2 / 3, 1.0])


def test_standardised_sum_weighs_each_detector_by_its_calibration_spread() -> None:
    from training.adfa_probe import standardised_sum

    calibration = {"a": np.array([0.0, 2.0]), "b": np.array([10.0, 30.0])}  # mean 1, std 1; mean 20, std 10
    scores = {"a": np.array([1.0, 3.0]), "b": np.array([40.0, 20.0])}
    assert standardised_sum(calibration, scores, ["a"]).tolist() == [0.0, 2.0]
    assert standardised_sum(calibration, scores, ["a", "b"]).tolist() == [2.0, 2.0]
    # a detector whose calibration scores are all equal is taken unscaled, not divided by zero
    flat = standardised_sum({"a": np.array([1.0, 1.0])}, {"a": np.array([3.0])}, ["a"])
    assert flat.tolist() == [2.0]


def test_oracle_bounds_fusion_by_weights_fitted_on_the_labels() -> None:
    """Two detectors that each half-separate the classes but together separate them completely: the oracle
    finds the weighting (AUC 1), and neither alone comes near it."""
    from training.adfa_probe import fusion, oracle

    rng = np.random.default_rng(0)
    n = 400
    # normal traces lie on the line a + b = 1 (a in [0, 1]); attacks lie above it, anywhere in a, so
    # neither a nor b alone tells them apart well, while a + b does exactly
    a_normal, a_attack = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    scores = {
        "normal": {"a": a_normal, "b": 1.0 - a_normal},
        "attack": {"a": a_attack, "b": 1.5 - a_attack},
        "calibration": {"a": (cal := rng.uniform(0, 1, 50)), "b": 1.0 - cal},  # equal spreads
    }
    bounds = oracle(scores)
    assert set(bounds) == {"oracle a", "oracle b", "oracle a+b"}
    assert bounds["oracle a+b"]["auc"] == 1.0
    assert bounds["oracle a+b"]["far_at_dr90"] == 0.0
    assert bounds["oracle a"]["auc"] < 0.9 and bounds["oracle b"]["auc"] < 0.9
    # with equal calibration spreads the fixed standardised sum is a + b too: the bound is reached
    fused = fusion(scores)
    assert set(fused) == {"a", "b", "a+b"}
    assert fused["a+b"]["auc"] == 1.0 and fused["a"]["auc"] < 0.9


def test_fusion_calibration_traces_are_not_scored_against_their_own_known_windows(tmp_path: Path) -> None:
    """The model ships its held-out traces' windows as known; the probe's calibration traces are those
    traces, so they must be judged against the rest of the training data, or every score is 0."""
    from training.adfa_probe import _split, detector_scores
    from training.synthetic import write_adfa_tree

    train, normal, attack = _split(str(write_adfa_tree(tmp_path / "adfa", train=24, validation=6, attacks=2)))
    scores = detector_scores(train, normal, attack, progress=False, model_median=True)
    assert len(scores["calibration"]["model"]) >= 2
    for group in ("calibration", "normal", "attack"):  # the median rides along, one per trace
        assert len(scores[group]["model_median"]) == len(scores[group]["model"])
    assert not np.array_equal(scores["attack"]["model_median"], scores["attack"]["model"])
    assert scores["calibration"]["model"].std() > 0 and (scores["calibration"]["model"] > 0).all()
    assert scores["attack"]["model"].mean() > scores["normal"]["model"].mean()


def test_fixed_rules_fuse_by_sum_min_and_max_of_standardised_scores() -> None:
    """Attacks that only one of two detectors sees: the maximum catches every one, the minimum none, and
    the rates differ by rule; the calibration scores set each detector's scale."""
    from training.adfa_probe import fixed_rules

    rng = np.random.default_rng(1)
    n = 300
    quiet = rng.normal(0.0, 1.0, (n, 2))
    # each attack is loud (+6) on one detector only, which one alternating; detector b is on a 10x scale
    loud = rng.normal(0.0, 1.0, (n, 2))
    loud[np.arange(n) % 2 == 0, 0] += 6.0
    loud[np.arange(n) % 2 == 1, 1] += 6.0
    cal = rng.normal(0.0, 1.0, (200, 2))
    scale = np.array([1.0, 10.0])
    scores = {
        "normal": {"a": quiet[:, 0], "b": quiet[:, 1] * 10.0},
        "attack": {"a": loud[:, 0], "b": loud[:, 1] * 10.0},
        "calibration": {"a": cal[:, 0] * scale[0], "b": cal[:, 1] * scale[1]},
    }
    fused = fixed_rules(scores)
    assert set(fused) == {"sum a+b", "min a+b", "max a+b"}
    assert fused["max a+b"]["auc"] > 0.99 and fused["max a+b"]["far_at_dr90"] < 0.01
    assert fused["min a+b"]["auc"] < 0.75
    assert fused["min a+b"]["auc"] < fused["sum a+b"]["auc"] < fused["max a+b"]["auc"]
    # unscaled, b's tenfold spread would swamp a in the maximum: half the attacks (loud on a) hide
    unscaled = {**scores, "calibration": {"a": cal[:, 0], "b": cal[:, 1]}}
    assert fixed_rules(unscaled)["max a+b"]["auc"] < fused["max a+b"]["auc"] - 0.1

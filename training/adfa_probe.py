"""Alternative detectors on the ADFA-LD standard split, for comparison with ``sysgram eval adfa``.

Not the shipped model: these are the probes behind the "Configurations tried" table in docs/model.md, kept so
that every figure there can be reproduced. Same protocol as the eval (train on Training_Data_Master only,
score Validation (normal) vs Attack, one score per trace, higher = more anomalous):

* ``cover``: sequence cover. A generalized suffix automaton of the training traces gives, at every position of
  a test trace, the longest substring ending there that occurs in training; the trace is covered right to
  left by such maximal pieces, and its score is pieces per syscall (few long familiar pieces = normal).
* ``composition``: 1 - the highest Jaccard similarity between the trace's set of syscalls and the set of any
  one training trace (a nearest-neighbour novelty of what the trace uses, ignoring order).
* ``lm``: a GRU language model over whole traces (mean NLL per syscall), optionally conditioned on a
  pseudo-program: ADFA-LD names no programs, so training traces are clustered by the Jaccard distance of
  their syscall sets (average linkage, cut at ``--cut``) and a test trace takes its nearest training
  trace's cluster. ``--with-composition`` also reports the product of the LM score and the composition
  novelty (a geometric fusion, no weights).

* ``fusion``: the detectors above that need no extra training (composition, cover), STIDE and the eval's own
  model (trained exactly as ``sysgram eval adfa`` trains it), fused with a rule fixed in advance: each score
  standardised by its mean and standard deviation over the model's held-out *training* traces (scored
  against the training traces minus those, so out of sample), then summed. Every subset of two or more is
  reported, so no subset is picked on the test results.
* ``oracle``: the same four detectors, fused by weights fitted on the test labels (logistic regression over
  each score and its log): roughly where linear fusions of them top out (the fit maximises likelihood, not
  AUC, so not a strict bound). Not a detector.
* ``rules``: the four detectors plus the model's per-trace *median* window score, each standardised as in
  ``fusion``, fused by three fixed rules over every subset of two or more: the sum, the minimum (a trace is
  as normal as its most forgiving detector says: "accumulating highly normal" traces) and the maximum (as
  anomalous as its harshest). Nonlinear fusions that need no labels, against the oracle's fitted ones.

Usage: ``python -m training.adfa_probe DIR {cover,composition,lm,fusion,oracle,rules} [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from training.datasets import Trace, adfa_traces
from training.evaluate import rates


def _split(root: str) -> tuple[list[Trace], list[Trace], list[Trace]]:
    return adfa_traces(root, "train"), adfa_traces(root, "validation"), adfa_traces(root, "attack")


class SuffixAutomaton:
    """Generalized suffix automaton of several sequences (each added from the root)."""

    def __init__(self) -> None:
        self.next: list[dict[str, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]

    def _state(self, length: int, link: int = -1, edges: dict[str, int] | None = None) -> int:
        self.next.append(dict(edges) if edges else {})
        self.link.append(link)
        self.length.append(length)
        return len(self.next) - 1

    def _split_edge(self, p: int, c: str, q: int, length: int) -> int:
        clone = self._state(length, self.link[q], self.next[q])
        while p != -1 and self.next[p].get(c) == q:
            self.next[p][c] = clone
            p = self.link[p]
        self.link[q] = clone
        return clone

    def add(self, sequence: Sequence[str]) -> None:
        last = 0
        for c in sequence:
            q = self.next[last].get(c)
            if q is not None:  # the extended string already exists (generalized automaton)
                last = q if self.length[q] == self.length[last] + 1 else \
                    self._split_edge(last, c, q, self.length[last] + 1)
                continue
            cur = self._state(self.length[last] + 1)
            p = last
            while p != -1 and c not in self.next[p]:
                self.next[p][c] = cur
                p = self.link[p]
            if p == -1:
                self.link[cur] = 0
            else:
                q = self.next[p][c]
                self.link[cur] = q if self.length[p] + 1 == self.length[q] else \
                    self._split_edge(p, c, q, self.length[p] + 1)
            last = cur

    def matching_lengths(self, sequence: Sequence[str]) -> np.ndarray:
        """Length of the longest substring ending at each position that occurs in the automaton."""
        state, length = 0, 0
        out = np.empty(len(sequence), dtype=np.int64)
        for i, c in enumerate(sequence):
            while state and c not in self.next[state]:
                state = self.link[state]
                length = self.length[state]
            if c in self.next[state]:
                state, length = self.next[state][c], length + 1
            else:
                state, length = 0, 0
            out[i] = length
        return out


def cover_scores(train: Sequence[Trace], tests: Sequence[Trace]) -> np.ndarray:
    sam = SuffixAutomaton()
    for t in train:
        sam.add(t.syscalls)
    out = np.empty(len(tests))
    for i, t in enumerate(tests):
        lengths = sam.matching_lengths(t.syscalls)
        j, pieces = len(lengths) - 1, 0
        while j >= 0:
            pieces += 1
            j -= max(int(lengths[j]), 1)
        out[i] = pieces / max(len(lengths), 1)
    return out


def _syscall_sets(traces: Sequence[Trace], names: dict[str, int]) -> np.ndarray:
    sets = np.zeros((len(traces), len(names)), dtype=np.float32)
    for i, t in enumerate(traces):
        sets[i, [names[s] for s in set(t.syscalls)]] = 1.0
    return sets


def nearest_by_composition(train: Sequence[Trace], tests: Sequence[Trace]) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest training trace, 1 - its Jaccard similarity) for each test trace."""
    names = {s: i for i, s in enumerate(sorted({s for t in [*train, *tests] for s in t.syscalls}))}
    known, probe = _syscall_sets(train, names), _syscall_sets(tests, names)
    both = probe @ known.T
    jaccard = both / (probe.sum(1)[:, None] + known.sum(1)[None, :] - both)
    return jaccard.argmax(1), 1.0 - jaccard.max(1)


def pseudo_programs(train: Sequence[Trace], cut: float) -> np.ndarray:
    """Cluster id of each training trace (average linkage on the Jaccard distance of syscall sets)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    names = {s: i for i, s in enumerate(sorted({s for t in train for s in t.syscalls}))}
    sets = _syscall_sets(train, names).astype(bool)
    return fcluster(linkage(pdist(sets, "jaccard"), "average"), cut, "distance").astype(np.int64) - 1


def lm_scores(train: Sequence[Trace], tests: Sequence[Sequence[Trace]], *, cut: float, epochs: int, hidden: int,
              seed: int, progress: bool) -> list[np.ndarray]:
    """Mean NLL per syscall of each test trace under a GRU language model (see the module docstring)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.set_num_threads(2)
    vocabulary = {s: i + 2 for i, s in enumerate(sorted({s for t in train for s in t.syscalls}))}  # 0 start, 1 unk
    size = len(vocabulary) + 2
    clusters = pseudo_programs(train, cut) if cut > 0 else np.zeros(len(train), dtype=np.int64)
    generic = int(clusters.max()) + 1

    def encode(t: Trace) -> np.ndarray:
        return np.array([vocabulary.get(s, 1) for s in t.syscalls], dtype=np.int64)

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Embedding(size, 32)
            self.program = nn.Embedding(generic + 1, 16)
            self.rnn = nn.GRU(48, hidden, batch_first=True)
            self.out = nn.Linear(hidden, size)

        def forward(self, x: torch.Tensor, program: torch.Tensor) -> torch.Tensor:
            e = self.token(x)
            p = self.program(program)[:, None, :].expand(-1, e.shape[1], -1)
            y, _ = self.rnn(torch.cat([e, p], -1))
            return self.out(y)

    def batches(seqs: list[np.ndarray], programs: np.ndarray, size_: int, shuffle: bool) -> Any:
        order = np.argsort([len(s) for s in seqs], kind="stable")
        groups = [order[i:i + size_] for i in range(0, len(order), size_)]
        if shuffle:
            rng.shuffle(groups)
        for g in groups:
            width = max(len(seqs[i]) for i in g)
            x = np.zeros((len(g), width), dtype=np.int64)  # position 0 is the start token
            y = np.full((len(g), width), -100, dtype=np.int64)
            for row, i in enumerate(g):
                s = seqs[i]
                x[row, 1:len(s)] = s[:-1]
                y[row, :len(s)] = s
            yield g, torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(programs[g])

    train_seqs = [encode(t) for t in train]
    net = LanguageModel()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_of = nn.CrossEntropyLoss(ignore_index=-100)
    started = time.monotonic()
    for epoch in range(epochs):
        net.train()
        for _, x, y, prog in batches(train_seqs, clusters, 16, True):
            prog = torch.where(torch.rand(len(prog)) < 0.1, torch.full_like(prog, generic), prog)
            x = torch.where((torch.rand(x.shape) < 0.01) & (x > 0), torch.ones_like(x), x)  # unseen-syscall noise
            loss = loss_of(net(x, prog).reshape(-1, size), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        if progress:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} {time.monotonic() - started:.0f}s",
                  file=sys.stderr, flush=True)
    net.eval()
    nearest_train = [nearest_by_composition(train, group)[0] for group in tests]
    per_position: list[list[np.ndarray]] = []
    with torch.no_grad():
        for group, nearest in zip(tests, nearest_train, strict=True):
            seqs = [encode(t) for t in group]
            programs = clusters[nearest] if cut > 0 else np.zeros(len(group), dtype=np.int64)
            out: list[np.ndarray] = [np.empty(0)] * len(seqs)
            for g, x, y, prog in batches(seqs, programs, 64, False):
                nll = -torch.log_softmax(net(x, prog), -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                for row, i in enumerate(g):
                    values = nll[row, :len(seqs[i])].numpy().astype(np.float64)
                    values[seqs[i] == 1] = np.nan  # unseen syscall: costed below
                    out[i] = values
            per_position.append(out)
    seen = np.concatenate([v[~np.isnan(v)] for v in per_position[0]])
    unk_cost = float(np.quantile(seen, 0.99))  # as the shipped model: an unseen syscall costs a rare known one
    return [np.array([np.nan_to_num(v, nan=unk_cost).mean() for v in group]) for group in per_position]


def standardised_sum(calibration: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                     names: Sequence[str]) -> np.ndarray:
    """Sum over ``names`` of each detector's scores standardised by its calibration scores' mean and std."""
    total = np.zeros(len(next(iter(scores.values()))))
    for name in names:
        cal = calibration[name]
        total += (scores[name] - cal.mean()) / (cal.std() or 1.0)
    return total


def detector_scores(train: list[Trace], normal: list[Trace], attack: list[Trace], *, progress: bool,
                    model_median: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{"calibration" | "normal" | "attack": {detector: one score per trace}} for the eval's model,
    composition, cover and STIDE (calibration: the model's held-out training traces, see the docstring);
    with ``model_median`` also "model_median", the median of each trace's window scores."""
    import tempfile
    from pathlib import Path

    from agent.model import hash_known, known_rows, load_model
    from agent.model.commands import ADFA_EPOCHS
    from training.evaluate import stide_scores
    from training.train import (
        DEFAULT_N,
        TrainConfig,
        aggregate,
        encode_traces,
        split_holdout,
        trace_window_scores,
        train_model,
    )

    cfg = TrainConfig(n=DEFAULT_N, epochs=ADFA_EPOCHS)  # the eval's configuration
    rest, held = split_holdout(train, cfg.holdout, cfg.seed)  # the same split train_model makes
    groups = {"calibration": held, "normal": normal, "attack": attack}
    scores: dict[str, dict[str, np.ndarray]] = {g: {} for g in groups}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "adfa.onnx")
        train_model(train, out, cfg, progress=progress, how="adfa_probe fusion")
        model = load_model(out, threads=cfg.threads)
        every = model.known_keys
        # held-out training traces are judged as the other detectors judge them, against the rest only: with
        # the model's known windows (which hold them) every one of their windows would score 0
        windows, programs, _ = encode_traces(rest, model.vocabulary, model.sidecar.programs, model.n)
        of_rest = hash_known(known_rows(programs, windows))
        for g, traces in groups.items():
            model.known_keys = of_rest if g == "calibration" else every
            windows_scored = trace_window_scores(model, traces)
            scores[g]["model"] = np.array([aggregate(s, "mean") for s in windows_scored])
            if model_median:
                scores[g]["model_median"] = np.array([aggregate(s, "median") for s in windows_scored])
    for g, traces in groups.items():
        reference = rest if g == "calibration" else train
        scores[g]["composition"] = nearest_by_composition(reference, traces)[1]
        scores[g]["cover"] = cover_scores(reference, traces)
        scores[g]["stide"] = stide_scores(reference, traces)
    return scores


def fusion(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Rates of each detector and of every fused subset (see the module's docstring)."""
    import itertools

    names = list(scores["normal"])
    results = {name: rates(scores["normal"][name], scores["attack"][name]) for name in names}
    for r in range(2, len(names) + 1):
        for subset in itertools.combinations(names, r):
            results["+".join(subset)] = rates(standardised_sum(scores["calibration"], scores["normal"], subset),
                                              standardised_sum(scores["calibration"], scores["attack"], subset))
    return results


def fixed_rules(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Rates of every subset of two or more detectors fused by the sum, the minimum and the maximum of their
    standardised scores (``rules`` in the module's docstring): fixed rules, no weights, no labels."""
    import itertools

    names = list(scores["normal"])
    cal = scores["calibration"]

    def standardised(group: str, subset: Sequence[str]) -> np.ndarray:
        return np.stack([(scores[group][n] - cal[n].mean()) / (cal[n].std() or 1.0) for n in subset], 1)

    results: dict[str, dict[str, Any]] = {}
    for r in range(2, len(names) + 1):
        for subset in itertools.combinations(names, r):
            normal, attack = standardised("normal", subset), standardised("attack", subset)
            for rule in ("sum", "min", "max"):
                fuse = getattr(np, rule)
                results[f"{rule} " + "+".join(subset)] = rates(fuse(normal, 1), fuse(attack, 1))
    return results


def oracle(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """A weighted sum of the detectors' scores and their logs, the weights fitted by logistic regression on
    the test labels themselves: roughly where fusing these detectors linearly tops out (not a strict bound:
    the fit maximises likelihood, not AUC or FAR@DR90), and not a detector. Every subset, so each
    detector's share shows."""
    import itertools

    from sklearn.linear_model import LogisticRegression

    names = list(scores["normal"])
    labels = np.r_[np.zeros(len(scores["normal"][names[0]])), np.ones(len(scores["attack"][names[0]]))]
    results: dict[str, dict[str, Any]] = {}
    for r in range(1, len(names) + 1):
        for subset in itertools.combinations(names, r):
            raw = np.stack([np.r_[scores["normal"][n], scores["attack"][n]] for n in subset], 1)
            features = np.c_[raw, np.log(np.abs(raw) + 1e-3)]
            features = (features - features.mean(0)) / (features.std(0) + 1e-12)
            fitted = LogisticRegression(C=10.0, max_iter=10_000).fit(features, labels)
            fused = fitted.decision_function(features)
            results["oracle " + "+".join(subset)] = rates(fused[labels == 0], fused[labels == 1])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.adfa_probe", description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("probe", choices=("cover", "composition", "lm", "fusion", "oracle", "rules"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cut", type=float, default=0.3, help="lm: pseudo-program cut (0 = unconditioned)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-composition", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    train, normal, attack = _split(args.directory)
    results: dict[str, dict[str, Any]] = {}
    if args.probe == "cover":
        results["cover"] = rates(cover_scores(train, normal), cover_scores(train, attack))
    elif args.probe == "composition":
        results["composition"] = rates(nearest_by_composition(train, normal)[1],
                                       nearest_by_composition(train, attack)[1])
    elif args.probe in ("fusion", "oracle"):
        scores = detector_scores(train, normal, attack, progress=not args.json)
        results = fusion(scores) if args.probe == "fusion" else oracle(scores)
    elif args.probe == "rules":
        scores = detector_scores(train, normal, attack, progress=not args.json, model_median=True)
        results = {name: rates(scores["normal"][name], scores["attack"][name]) for name in scores["normal"]}
        results.update(fixed_rules(scores))
    else:
        normal_s, attack_s = lm_scores(train, [normal, attack], cut=args.cut, epochs=args.epochs,
                                       hidden=args.hidden, seed=args.seed, progress=not args.json)
        results["lm"] = rates(normal_s, attack_s)
        if args.with_composition:
            novelty = [nearest_by_composition(train, g)[1] for g in (normal, attack)]
            results["lm_x_composition"] = rates(np.log(normal_s) + np.log(novelty[0] + 1e-3),
                                                np.log(attack_s) + np.log(novelty[1] + 1e-3))
    seconds = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps({"probe": args.probe, "results": results, "seconds": seconds, "args": vars(args)}))
    else:
        for name, r in results.items():
            print(f"{name}: AUC {r['auc']:.4f}  FAR@DR90 {r['far_at_dr90']:.2%}  "
                  f"DR@FAR1 {r['dr_at_far1']:.2%}  DR@FAR5 {r['dr_at_far5']:.2%}  ({seconds}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

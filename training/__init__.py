"""Offline training of the anomaly model (the only place torch is imported).

``train_from_recordings`` is what ``sysgram train`` and ``sysgram learn`` call; torch is imported lazily so
that importing this package stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.train import TrainReport


def train_from_recordings(paths: Sequence[str], out: str, *, exes: Sequence[str] = (), epochs: int = 8,
                          seed: int = 0, progress: bool = True) -> TrainReport:
    """Train a model (``out``, .onnx + .json sidecar) from sysgram recordings; see training.train."""
    from training.train import train_from_recordings as _train

    return _train(paths, out, exes=exes, epochs=epochs, seed=seed, progress=progress)


__all__ = ["train_from_recordings"]

"""Command-line values checked the same way by several rooms' subcommands: argparse types (each refuses a
bad value in argparse's one line) and checks made before any work (a ConfigError line)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable

from agent.errors import ConfigError


def positive_seconds(text: str) -> float:
    """A finite number of seconds more than 0 (NaN and infinity included among the refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds more than 0, got {text!r}")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}: {value}")
        return value

    return parse


epochs = bounded_int(1, 100_000)
seed = bounded_int(0, 2**32 - 1)  # numpy and torch seeds


def check_model_file(path: str) -> None:
    """A model path a training can write to: ``.onnx``, not a directory (said before any work)."""
    if not path.endswith(".onnx") or os.path.isdir(path):
        raise ConfigError("the model file must end in .onnx (a file, not a directory)", path=path)


def check_absolute_exes(exes: Iterable[str]) -> None:
    """``--exe`` values: processes are named by /proc/PID/exe, an absolute path; a relative one matches nothing."""
    relative = [exe for exe in exes if not os.path.isabs(exe)]
    if relative:
        raise ConfigError(f"--exe takes the executable's absolute path (as /proc/PID/exe names it), not "
                          f"{relative[0]!r}")

"""An input given as a FIFO (or another file that is not a regular one) is one clear error at once: open() of
a FIFO waits for a writer for good, and the agent hung with no word."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import SysgramError


def _loaders() -> dict[str, Callable[[str], object]]:
    from agent.capture.recording import read_recording
    from agent.config import load_config
    from agent.falco import load_rules
    from agent.model._sidecar import read_sidecar
    from agent.seccomp._profile import load_profile

    return {
        "config": load_config,
        "rules": lambda p: load_rules([p]),
        "profile": load_profile,
        "recording": read_recording,
        "sidecar": lambda p: read_sidecar(p.removesuffix(".json") + ".onnx"),
    }


@pytest.mark.parametrize("kind", ["config", "rules", "profile", "recording", "sidecar"])
def test_a_fifo_is_refused_at_once_in_one_line(tmp_path: Path, kind: str) -> None:
    fifo = tmp_path / ("input.json" if kind == "sidecar" else "input")
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            _loaders()[kind](str(fifo))
            outcome.append(None)
        except BaseException as err:  # the test wants to see whatever came out
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock it before failing: a writer lets the open go on
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail(f"loading a FIFO as a {kind} blocked")
    (err,) = outcome
    assert isinstance(err, SysgramError), repr(err)
    assert "not a regular file" in str(err) and str(fifo) in str(err) and "\n" not in str(err)

"""Training data: per-program syscall traces from sysgram recordings or from the ADFA-LD layout."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.capture.names import syscall_name
from agent.capture.recording import iter_thread_traces, read_recording
from agent.errors import ConfigError
from agent.model import GENERIC_PROGRAM

ADFA_SPLITS = {"train": "Training_Data_Master", "validation": "Validation_Data_Master",
               "attack": "Attack_Data_Master"}
_ATTACK_DIR = re.compile(r"^(?P<cls>.+)_(?P<run>\d+)$")


@dataclass(frozen=True, slots=True)
class Trace:
    """One thread's syscalls while running one program; ``label`` is the attack class (ADFA) or ""."""

    program: str
    syscalls: tuple[str, ...]
    source: str = ""
    label: str = ""
    # leading syscalls that are only context: no window ends on them (the held-out second half of a long
    # trace cut in two starts with the n-1 syscalls before the cut, so its first window sees what the runtime
    # would, not a process start)
    context: int = 0
    # False: the thread was already running when the recording began, so there is no start to pad; its
    # first n-1 syscalls are context only, as the runtime treats a thread it first sees mid-life
    from_start: bool = True

    @property
    def starts_a_process(self) -> bool:
        """Its first window is a process start (what start-up thresholds are calibrated on)."""
        return self.from_start and not self.context


def traces_from_recordings(paths: Sequence[str], exes: Sequence[str] = ()) -> list[Trace]:
    """Per thread and program traces of each recording (RecordingError naming a bad file)."""
    traces: list[Trace] = []
    for path in paths:
        rec = read_recording(path)
        for t in iter_thread_traces(rec, exes):
            if t.syscalls:
                # a relative exec path names no program (ProcessInfo.program): the generic slot
                program = t.exe if t.exe.startswith("/") else ""
                traces.append(Trace(program=program or GENERIC_PROGRAM, syscalls=t.syscalls,
                                    source=f"{path}:{t.tid}", from_start=t.from_start))
    return traces


def _read_adfa_file(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read ADFA trace: {err}", path=str(path)) from None
    words = text.split()
    if all(word.isascii() and word.isdigit() for word in words):  # not "²", which int() refuses
        return tuple(syscall_name(int(word), compat=True) for word in words)  # ADFA-LD numbers are i386
    for line_no, line in enumerate(text.splitlines(), 1):  # the first bad word, by line and column
        for match in re.finditer(r"\S+", line):
            if not (match.group().isascii() and match.group().isdigit()):
                raise ConfigError(f"ADFA trace holds {match.group()[:20]!r}, not a syscall number", path=str(path),
                                  line=line_no, col=match.start() + 1)
    raise ConfigError("ADFA trace holds something that is not a syscall number", path=str(path))


def adfa_traces(root: str | Path, split: str, *, limit: int | None = None) -> list[Trace]:
    """Traces of one ADFA-LD split ("train", "validation", "attack"), sorted by file name for reproducibility.

    ``limit`` keeps an evenly spread subset (attack: per class folder order), for quick runs.
    """
    base = Path(root) / ADFA_SPLITS[split]
    if not base.is_dir():
        raise ConfigError(f"not an ADFA-LD directory (no {ADFA_SPLITS[split]}/)", path=str(root))
    if split == "attack":
        files: list[tuple[str, Path]] = []
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            m = _ATTACK_DIR.match(folder.name)
            label = m.group("cls") if m else folder.name
            files.extend((label, f) for f in sorted(folder.glob("*.txt")))
    else:
        files = [("", f) for f in sorted(base.glob("*.txt"))]
    if not files:
        raise ConfigError(f"no traces (*.txt) under {ADFA_SPLITS[split]}/", path=str(root))
    if limit is not None and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    out = []
    for label, f in files:
        names = _read_adfa_file(f)
        if names:
            out.append(Trace(program=GENERIC_PROGRAM, syscalls=names, source=str(f), label=label))
    return out


def data_hash(traces: Iterable[Trace]) -> str:
    digest = hashlib.sha256()
    for t in traces:
        digest.update(t.program.encode())
        digest.update(b"\0")
        digest.update(" ".join(t.syscalls).encode())
        digest.update(b"\n")
    return digest.hexdigest()

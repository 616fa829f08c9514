"""Small synthetic data for tests and smoke runs: programs with their own habits, and an ADFA-LD-shaped tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.capture.names import syscall_number
from agent.capture.recording import RecordingWriter
from agent.events import SYSCALL_DTYPE, ProcEvent
from training.datasets import Trace

HABITS = {
    "/usr/bin/alpha": ["openat", "read", "read", "close", "write", "mmap", "munmap", "futex"],
    "/usr/bin/beta": ["socket", "connect", "sendto", "recvfrom", "close", "epoll_wait", "getpid", "brk"],
}
ATTACK = ["execve", "setuid", "chmod", "unlink", "ptrace", "kill", "mprotect", "dup2"]


def habit_trace(habit: list[str], length: int, rng: np.random.Generator, noise: float = 0.05) -> list[str]:
    """A loop over ``habit`` that sometimes skips or repeats a step (normal variation)."""
    out: list[str] = []
    i = 0
    while len(out) < length:
        out.append(habit[i % len(habit)])
        r = rng.random()
        i += 2 if r < noise else (0 if r < 2 * noise else 1)
    return out


def attack_trace(habit: list[str], length: int, rng: np.random.Generator) -> list[str]:
    """A normal-looking start, then the syscalls of the attack mixed in."""
    trace = habit_trace(habit, length, rng)
    for k in range(length // 3, length, 3):
        trace[k] = ATTACK[int(rng.integers(len(ATTACK)))]
    return trace


def synthetic_traces(count: int, seed: int = 0, length: int = 300) -> list[Trace]:
    rng = np.random.default_rng(seed)
    programs = list(HABITS)
    return [Trace(program=p, syscalls=tuple(habit_trace(HABITS[p], length, rng)))
            for i in range(count) for p in [programs[i % len(programs)]]]


def write_adfa_tree(root: Path, seed: int = 0, train: int = 30, validation: int = 40, attacks: int = 4) -> Path:
    """An ADFA-LD-shaped directory (i386 numbers) of synthetic traces."""
    rng = np.random.default_rng(seed)
    habit = HABITS["/usr/bin/alpha"]

    def dump(path: Path, names: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(" ".join(str(syscall_number(nm, compat=True)) for nm in names) + "\n")

    for i in range(train):
        dump(root / "Training_Data_Master" / f"UTD-{i:04d}.txt", habit_trace(habit, 200, rng))
    for i in range(validation):
        dump(root / "Validation_Data_Master" / f"UVD-{i:04d}.txt", habit_trace(habit, 200, rng))
    for cls in ("Adduser", "Web_Shell"):
        for run in range(1, 3):
            for i in range(attacks):
                dump(root / "Attack_Data_Master" / f"{cls}_{run}" / f"UAD-{cls}-{run}-{i}.txt",
                     attack_trace(habit, 200, rng))
    return root


def write_recording(path: Path, seed: int = 0, threads_per_program: int = 6, length: int = 400) -> Path:
    """A sysgram recording made with RecordingWriter: each program's threads exec'd then looping on habits."""
    rng = np.random.default_rng(seed)
    writer = RecordingWriter(str(path))
    ts = 1_000
    pid = 2000
    for exe, habit in HABITS.items():
        for _ in range(threads_per_program):
            pid += 1
            writer.add_event(ProcEvent("fork", ts, pid, pid, ppid=1, comm="init"))
            writer.add_event(ProcEvent("exec", ts + 1, pid, pid, comm=Path(exe).name, filename=exe))
            names = habit_trace(habit, length, rng)
            batch = np.zeros(len(names), dtype=SYSCALL_DTYPE)
            batch["ts"] = ts + 2 + np.arange(len(names))
            batch["tgid"] = pid
            batch["tid"] = pid
            batch["nr"] = [syscall_number(nm) for nm in names]
            writer.add_syscalls(batch)
            ts += 10 + len(names)
            writer.add_event(ProcEvent("exit", ts, pid, pid, comm=Path(exe).name))
    writer.close({})
    return path

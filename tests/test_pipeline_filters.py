"""A filtered recording keeps the processes asked for and their descendants, born while it records."""

from __future__ import annotations

import numpy as np

from agent.events import SYSCALL_DTYPE, ProcEvent
from agent.pipeline import Filters, Pipeline
from agent.proc import ProcessTable
from agent.proc.info import ProcessInfo

PARENT, CHILD, GRANDCHILD, STRANGER = 5_000_101, 5_000_102, 5_000_103, 5_000_104  # above any pid_max


class KeptRows:
    """Stands in for the RecordingWriter: what the pipeline asks it to keep."""

    def __init__(self) -> None:
        self.tgids: list[int] = []
        self.events: list[int] = []

    def add_syscalls(self, batch: np.ndarray) -> None:
        self.tgids += batch["tgid"].tolist()

    def add_event(self, event: object) -> None:
        self.events.append(getattr(event, "pid", -1))

    def add_process(self, info: ProcessInfo) -> None:
        pass


def rows(*tgids: int) -> np.ndarray:
    out = np.zeros(len(tgids), SYSCALL_DTYPE)
    out["tgid"] = out["tid"] = tgids
    out["ts"] = np.arange(len(tgids)) + 10_000
    return out


def test_descendants_of_a_filtered_pid_are_recorded_and_strangers_are_not() -> None:
    table = ProcessTable()
    table.add(ProcessInfo(pid=PARENT, ppid=1, comm="parent", exe="/usr/bin/parent"))
    table.add(ProcessInfo(pid=STRANGER, ppid=1, comm="stranger", exe="/usr/bin/stranger"))
    kept = KeptRows()
    pipeline = Pipeline(table=table, recorder=kept, filters=Filters(pids=frozenset({PARENT})))  # type: ignore[arg-type]
    pipeline.handle([rows(PARENT)])  # matched (live, the seed at start matches it first)
    pipeline.handle([ProcEvent("fork", 1_000, CHILD, CHILD, ppid=PARENT),
                     ProcEvent("fork", 2_000, GRANDCHILD, GRANDCHILD, ppid=CHILD),
                     ProcEvent("fork", 3_000, STRANGER + 10, STRANGER + 10, ppid=STRANGER)])
    pipeline.handle([rows(PARENT, CHILD, GRANDCHILD, STRANGER, STRANGER + 10)])
    assert kept.tgids == [PARENT, PARENT, CHILD, GRANDCHILD]
    assert kept.events == [CHILD, GRANDCHILD]

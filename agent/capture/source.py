"""Event sources: live capture from the kernel, and replay of a recording. Both yield the same chunks.

A chunk is either a numpy array of :data:`agent.events.SYSCALL_DTYPE` rows (the compact stream) or a
:class:`DetailEvent` / :class:`ProcEvent` (the detail stream, in kernel order).
"""

from __future__ import annotations

import collections
import ctypes
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.capture import _layout as L
from agent.capture._batches import BatchOrderer
from agent.capture._decode import decode_detail, decode_exec_args, decode_kernel_signal, decode_proc
from agent.capture._loader import Tracer
from agent.events import DetailEvent, KernelSignal, ProcEvent

Chunk = np.ndarray | DetailEvent | ProcEvent | KernelSignal


class EventSource(Protocol):
    def start(self) -> None: ...
    def chunks(self) -> Iterator[list[Chunk]]: ...
    def stop(self) -> None: ...
    def drops(self) -> dict[str, int]: ...


@dataclass
class ReplaySource:
    """A recording, fed through the same path as live capture."""

    path: str
    batch_rows: int = 65536
    _stopped: bool = field(default=False, init=False)

    def start(self) -> None:
        from agent.capture.recording import read_recording  # pyarrow: only when replaying

        self.recording = read_recording(self.path)

    def chunks(self) -> Iterator[list[Chunk]]:
        group: list[Chunk] = []
        for chunk in self.recording.chunks():
            if self._stopped:
                return
            if isinstance(chunk, np.ndarray):
                for i in range(0, len(chunk), self.batch_rows):
                    group.append(chunk[i : i + self.batch_rows])
                    yield group
                    group = []
            else:
                group.append(chunk)
        if group:
            yield group

    def stop(self) -> None:
        self._stopped = True

    def drops(self) -> dict[str, int]:
        return dict(self.recording.drops)


READ_INTERVAL_MS = 5  # the reader drains the rings at least this often
# Detail records the reader decodes per turn (~7 us each here). libbpf keeps consuming a ring while records
# keep coming, so a flood of details (an unprivileged open() loop makes >1 M/s) held the reader in one turn
# that never ended: nothing was handed over and the agent's /healthz saw it stalled. Past the budget the
# rest waits in the ring for the next turn (and what the ring cannot hold is counted as lost).
DETAIL_TURN_BUDGET = 4096
FINAL_DRAIN_S = 1.0  # the reader's last reads at stop (LiveSource.stop waits 2 s for it)


def _hdr_offset(field: str) -> int:
    fields = L.DETAIL_HDR.fields
    assert fields is not None
    return int(fields[field][1])


# detail_hdr fields every detail record starts with, read without decoding the record
_HDR_AUX, _HDR_AUX_AT = struct.Struct("<I"), _hdr_offset("aux")
_HDR_TS, _HDR_TS_AT = struct.Struct("<Q"), _hdr_offset("ts")


class LiveSource:
    """Every syscall on the host, from the BPF tracer.

    A reader thread drains both ring buffers into a bounded queue (so a slow consumer never stalls the
    kernel side); a ticker thread visits each CPU every ``flush_interval`` s so that partly filled batches
    are sent (bounding latency on quiet CPUs). Losses are counted per stage: kernel (ring buffer full,
    failed reservations, pending map full) and userspace (queue overflow).
    """

    def __init__(
        self,
        *,
        detail_syscalls: set[str],
        enforce: bool = False,
        flush_interval: float = 0.02,
        queue_max_events: int = 2_000_000,
        queue_max_details: int = 20_000,
        compact_rb_pages: int | None = None,
        detail_rb_pages: int | None = None,
        compat_details: str = "auto",
    ) -> None:
        self.detail_syscalls = detail_syscalls
        self.compat_details = compat_details
        self.enforce = enforce
        self.flush_interval = flush_interval
        self.queue_max_events = queue_max_events
        # Decoded syscall details are Python objects of ~1-2 KB: an exec storm the pipeline cannot keep up
        # with must not grow memory without bound (process events are always kept: the table needs them).
        self.queue_max_details = queue_max_details
        self._queued_details = 0
        self.detail_queue_overflow = 0
        self._rb_pages = {
            k: v
            for k, v in (("compact_rb_pages", compact_rb_pages), ("detail_rb_pages", detail_rb_pages))
            if v is not None
        }
        self.tracer: Tracer | None = None
        self._queue: collections.deque[list[Chunk]] = collections.deque()
        self._queued_events = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._raw_batches: list[bytes] = []
        self._orderer = BatchOrderer()
        self._tickers = [_CpuTicker(cpu) for cpu in sorted(os.sched_getaffinity(0))]
        self._details: list[Chunk] = []
        self._exec_args: dict[int, tuple[str, tuple[str, ...]]] = {}
        self.queue_overflow = 0
        self._threads: list[threading.Thread] = []
        self.last_turn = time.monotonic()  # the reader thread's last turn (the agent's /healthz watches it)
        self._turn_details = 0
        self._turn_latest_ts = 0  # the latest time stamp among this turn's detail records
        self._details_cut_at: int | None = None  # that, when the turn's budget ran out before the ring did

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.tracer = Tracer(
            self_tgid=os.getpid(), detail_syscalls=self.detail_syscalls, enforce=self.enforce,
            compat_details=self.compat_details, **self._rb_pages,
        )
        self.tracer.open_ring_buffers(self._on_compact, self._on_detail)
        for ticker in self._tickers:
            thread = threading.Thread(
                target=ticker.run, args=(self._stop, self.flush_interval), name=f"sysgram-tick{ticker.cpu}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        reader = threading.Thread(target=self._read_loop, name="sysgram-reader", daemon=True)
        self.last_turn = time.monotonic()
        reader.start()
        self._threads.append(reader)

    def stop(self) -> None:
        self._stop.set()
        for ticker in self._tickers:
            ticker.kick.set()
        for thread in self._threads:
            thread.join(timeout=2)
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self.stop()
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None

    def drops(self) -> dict[str, int]:
        stats = self.tracer.kernel_stats() if self.tracer else {}
        return {
            "ringbuf_full": stats.get("compact_lost", 0),
            "detail_reserve_failed": stats.get("detail_lost", 0)
            + stats.get("exec_args_lost", 0)
            + stats.get("proc_lost", 0),
            "pending_full": stats.get("pending_full", 0),
            "userspace_queue_overflow": self.queue_overflow,
            "detail_queue_overflow": self.detail_queue_overflow,
        }

    def kernel_stats(self) -> dict[str, int]:
        return self.tracer.kernel_stats() if self.tracer else {}

    # -- consumer side -------------------------------------------------------------------------------
    def chunks(self) -> Iterator[list[Chunk]]:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.1)
                if not self._queue:
                    return
                group = self._queue.popleft()
                self._dequeued(group)
            yield group

    def get(self, timeout: float) -> list[Chunk] | None:
        """One queued group, or None after ``timeout`` s with nothing queued."""
        with self._cond:
            if not self._queue:
                self._cond.wait(timeout)
            if not self._queue:
                return None
            group = self._queue.popleft()
            self._dequeued(group)
            return group

    def _dequeued(self, group: list[Chunk]) -> None:
        self._queued_events -= _count(group)
        self._queued_details -= sum(1 for c in group if _is_syscall_detail(c))

    # -- reader thread ---------------------------------------------------------------------------------
    def _on_compact(self, _ctx: object, data: int, size: int) -> int:
        self._raw_batches.append(ctypes.string_at(data, size))
        return 0

    def _on_detail(self, _ctx: object, data: int, size: int) -> int:
        """One detail record; -1 (libbpf stops this ring's consumption, this record taken) once the turn's
        budget is spent."""
        raw = ctypes.string_at(data, size)
        self._take_detail(raw)
        self._turn_details += 1
        # its stamp: a syscall's entry time, else the time the record was made
        self._turn_latest_ts = max(self._turn_latest_ts, _HDR_TS.unpack_from(raw, _HDR_TS_AT)[0])
        if self._turn_details < DETAIL_TURN_BUDGET:
            return 0
        self._details_cut_at = self._turn_latest_ts
        return -1

    def _take_detail(self, raw: bytes) -> None:
        kind = raw[0]
        if kind == L.K_SYSCALL:
            event = decode_detail(raw)
            if event.syscall in ("execve", "execveat"):
                filename, argv = self._exec_args.pop(event.tid, ("", ()))
                event = DetailEvent(
                    event.ts,
                    event.tgid,
                    event.tid,
                    event.syscall,
                    event.nr,
                    event.res,
                    {**event.args, "filename": event.args.get("filename") or filename, "argv": list(argv)},
                    compat=event.compat,
                    raw_args=event.raw_args,
                )
            self._details.append(event)
        elif kind == L.K_EXEC_ARGS:
            tid, filename, argv = decode_exec_args(raw)
            self._exec_args[tid] = (filename, argv)
            if len(self._exec_args) > 65536:  # entries whose exit never came (killed mid-exec)
                self._exec_args.pop(next(iter(self._exec_args)))
        elif kind in (L.K_FORK, L.K_EXEC, L.K_EXIT):
            proc = decode_proc(raw)
            if proc.kind == "exec":
                self._exec_args_at_exec(proc, _HDR_AUX.unpack_from(raw, _HDR_AUX_AT)[0])
            if proc.kind == "exit" and proc.is_thread and proc.tid == proc.pid:
                return  # the leader thread left early; the process lives on in its other threads
            if proc.kind == "exit" and not proc.is_thread:
                proc = ProcEvent("exit", proc.ts, proc.pid, proc.pid, comm=proc.comm)
            self._details.append(proc)
        elif kind == L.K_ENFORCED:
            self._details.append(decode_kernel_signal(raw))

    def _exec_args_at_exec(self, proc: ProcEvent, old_tid: int) -> None:
        """The argv record of the execve that made exec event ``proc`` (from the thread ``old_tid``), made
        ready for that execve's record."""
        if old_tid != proc.tid and old_tid in self._exec_args:
            # a thread other than the leader exec'd and took the leader's id (de_thread): its execve's record
            # comes under that id
            self._exec_args[proc.tid] = self._exec_args.pop(old_tid)
        entry = self._exec_args.get(proc.tid)
        if entry is not None and not entry[0]:
            # the entry could not read the path (its page not yet faulted in): the kernel's copy
            self._exec_args[proc.tid] = (proc.filename, entry[1])

    def _read_loop(self) -> None:
        # Compact batches wake nobody (see bpf/sysgram.bpf.c): wait for detail records or a short
        # timeout, then drain both rings.
        assert self.tracer is not None
        while not self._stop.is_set():
            self._new_turn()
            self.tracer.poll(READ_INTERVAL_MS)
            self.tracer.consume()
            self._hand_over()
            self.last_turn = time.monotonic()
        for ticker in self._tickers:  # every CPU's last flush, then the last read
            ticker.finished.wait(2.0)
        # The last reads, a budget at a time while the programs still run: under a flood of details the
        # ring never empties, so they stop at a deadline (what is left then is not read) well before
        # stop() gives up on this thread and the rings are freed.
        deadline = time.monotonic() + FINAL_DRAIN_S
        while True:
            self._new_turn()
            self.tracer.consume()
            if self._turn_details < DETAIL_TURN_BUDGET or time.monotonic() > deadline:
                break
            self._hand_over()
        self._hand_over(final=True)  # releases every row held, the cut's included

    def _new_turn(self) -> None:
        self._turn_details = 0
        self._turn_latest_ts = 0
        self._details_cut_at = None

    def _hand_over(self, final: bool = False) -> None:
        if not self._raw_batches and not self._details and not final:
            return
        syscalls = self._orderer.add(self._raw_batches, hold_after=self._details_cut_at)
        if final:
            syscalls = np.concatenate((syscalls, self._orderer.drain()))
        group: list[Chunk] = list(self._details)
        if len(syscalls):
            group.append(syscalls)
        self._raw_batches, self._details = [], []
        if not group:
            return
        with self._cond:
            if self._queued_events + _count(group) > self.queue_max_events:
                self.queue_overflow += len(syscalls)
                group = [c for c in group if not isinstance(c, np.ndarray)]  # keep the detail stream
            details = sum(1 for c in group if _is_syscall_detail(c))
            if details and self._queued_details + details > self.queue_max_details:
                self.detail_queue_overflow += details
                group = [c for c in group if not _is_syscall_detail(c)]
                details = 0
            self._queue.append(group)
            self._queued_events += _count(group)
            self._queued_details += details
            self._cond.notify()

    def flush_all(self) -> None:
        """Make every CPU send its batch now (even an empty one: it tells the orderer nothing older waits)."""
        for ticker in self._tickers:
            ticker.done.clear()
            ticker.kick.set()
        for ticker in self._tickers:
            ticker.done.wait(1.0)


class _CpuTicker:
    """A thread pinned to one CPU that makes the agent's FLUSH_SYSCALL there every flush interval, so the
    BPF program sends that CPU's batch: latency stays bounded on quiet CPUs.

    One pinned thread per CPU, not one thread hopping between CPUs: moving a thread onto a busy CPU waits
    for that CPU inside sched_setaffinity, with the GIL held, which stalled every other thread of the agent.
    """

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.kick = threading.Event()
        self.done = threading.Event()  # a requested flush happened
        self.finished = threading.Event()  # the last flush, at stop, happened

    def run(self, stop: threading.Event, interval: float) -> None:
        try:
            os.sched_setaffinity(0, {self.cpu})  # this thread only
        except OSError:  # an offline or forbidden CPU: nothing to flush from here
            self.done.set()
            self.finished.set()
            return
        while True:
            self.kick.wait(interval)
            self.kick.clear()
            os.getppid()  # the BPF program sees the agent's FLUSH_SYSCALL here and sends this CPU's batch
            self.done.set()
            if stop.is_set():
                break
        self.finished.set()


def _is_syscall_detail(chunk: Chunk) -> bool:
    """A decoded syscall: what the detail bound drops under overload (never a process or kernel-signal event)."""
    return isinstance(chunk, DetailEvent)


def _count(group: list[Chunk]) -> int:
    return sum(len(c) if isinstance(c, np.ndarray) else 1 for c in group)


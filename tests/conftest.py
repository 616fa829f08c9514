"""Shared fixtures. BPF tests need root and a kernel that loads BPF: they skip, saying why, elsewhere."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def bpf_unavailable() -> str:
    if os.geteuid() != 0:
        return "BPF tests need root"
    if not os.path.exists("/sys/kernel/btf/vmlinux") and not os.path.isdir("/sys/kernel/tracing/events"):
        return "no tracefs/BTF on this kernel"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "python3-bpfcc is not installed"
    from agent.capture._loader import nested_pid_namespace

    return nested_pid_namespace()  # the tracer refuses to run there (it would name the wrong processes)


requires_bpf = pytest.mark.skipif(bool(bpf_unavailable()), reason=bpf_unavailable() or "bpf")


@contextmanager
def docker_named_cgroup() -> Iterator[tuple[str, Path] | None]:
    """A fresh cgroup v2 directory named as docker's systemd driver names a container's: (container id,
    path), removed once its processes are reaped; None where no cgroup v2 hierarchy is writable."""
    from agent.proc._procfs import cgroup2_mount

    root = cgroup2_mount()
    if root is None:
        yield None
        return
    container_id = secrets.token_hex(32)
    cgroup = Path(root) / f"docker-{container_id}.scope"
    try:
        cgroup.mkdir()
    except OSError:
        yield None
        return
    try:
        yield container_id, cgroup
    finally:
        for _ in range(50):  # the cgroup empties once its last process is reaped
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def build_c(source: Path, out: Path, *flags: str) -> Path:
    """``source`` compiled to ``out`` (-O1 and ``flags``); the test is skipped where no C compiler is."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    subprocess.run([cc, "-O1", *flags, "-o", str(out), str(source)], check=True)
    return out


@pytest.fixture(scope="session")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled tests/workload.c: `workload N PATH` makes N getppid calls, then opens PATH."""
    return build_c(ROOT / "tests" / "workload.c", tmp_path_factory.mktemp("bin") / "sysgram-workload")


def sysgram(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT, **kw
    )  # type: ignore[call-overload]


def start_sysgram(*args: str, ready_timeout: float = 120.0) -> subprocess.Popen[str]:
    """``sysgram ARGS`` in the background, returned once it printed ``sysgram: ready`` (stderr is a pipe the
    caller reads at the end, e.g. with communicate()); fails the test with its stderr if it died first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "sysgram: ready" in line or (not line and proc.poll() is not None):
            break
    if proc.poll() is not None:
        raise AssertionError(f"sysgram {' '.join(args)} did not start: {proc.stderr.read()[-2000:]}")
    return proc


@contextmanager
def enforcing_capture(config_path: Path, on_chunk: Callable[[Any], None], queue_max_events: int) -> Iterator[Any]:
    """A live capture with enforcement compiled in, every chunk handed to ``on_chunk`` on a reader thread,
    and an Enforcer over its maps with ``config_path``'s enforce section; yields (enforcer, tracer)."""
    import threading

    from agent.capture.source import LiveSource
    from agent.config import load_config
    from agent.enforce import Enforcer
    from agent.proc import read_process

    source = LiveSource(detail_syscalls=set(), enforce=True, queue_max_events=queue_max_events)
    source.start()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            for chunk in source.get(0.1) or ():
                on_chunk(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert source.tracer is not None
        config = load_config(str(config_path)).enforce
        yield Enforcer(source.tracer.bpf, config, read_process), source.tracer
    finally:
        stop.set()
        reader.join(5)
        source.stop()
        source.close()

"""After compiling its BPF program the agent gives the compiler's memory back, and can still compile again."""

from __future__ import annotations

import json
import subprocess
import sys

from agent.memory import Mapping, droppable, mappings
from tests.conftest import ROOT, requires_bpf

_PROBE = """
import json, os
from agent.capture._loader import Tracer
from agent.memory import mappings, droppable, _COMPILER_LIBRARY

def compiler_text_kb():
    return sum(m.rss_kb for m in mappings() if _COMPILER_LIBRARY.search(m.path) and 'x' in m.perms)

first = Tracer(self_tgid=os.getpid(), detail_syscalls={"openat", "execve"})
after_first = compiler_text_kb()
first.close()
second = Tracer(self_tgid=os.getpid(), detail_syscalls={"openat"})  # LLVM's code is read back in to compile
second.bpf["compact_rb"].open_ring_buffer(lambda ctx, data, size: 0)
second.poll(10)
print(json.dumps({"released_kb": first.compiler_kb_released, "text_kb_after": after_first,
                  "second_released_kb": second.compiler_kb_released}))
second.close()
"""


@requires_bpf
def test_compiler_memory_is_released_and_compiling_still_works() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["released_kb"] > 20_000  # clang + LLVM code touched by a compile: tens of MB
    assert got["text_kb_after"] < 4_000  # what stays resident of it
    assert got["second_released_kb"] > 20_000  # the second compile faulted the code back in, and ran


def test_only_clean_compiler_text_is_dropped() -> None:
    llvm = "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1"
    assert droppable(Mapping(0, 4096, "r-xp", llvm, rss_kb=100, anonymous_kb=0))
    assert not droppable(Mapping(0, 4096, "r--p", llvm, rss_kb=100, anonymous_kb=8))  # relocated data
    assert not droppable(Mapping(0, 4096, "rw-p", llvm, rss_kb=100, anonymous_kb=0))
    assert not droppable(Mapping(0, 4096, "r-xp", "/usr/lib/x86_64-linux-gnu/libc.so.6", rss_kb=100))
    assert not droppable(Mapping(0, 4096, "r-xp", llvm, rss_kb=0))


def test_mappings_reads_sizes() -> None:
    maps = mappings()
    assert maps and all(m.end > m.start for m in maps)
    python = [m for m in maps if "x" in m.perms and "python" in m.path]
    assert python and max(m.rss_kb for m in python) > 0

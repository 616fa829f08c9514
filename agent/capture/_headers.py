"""Kernel headers for bcc, and tracefs.

bcc compiles against /lib/modules/$(uname -r)/build. When no headers package matches the running kernel,
Debian's nearest headers work for tracepoint-only programs once its split trees (``-common`` and the arch
tree) are merged into one directory. We build that tree in our cache directory (never in /lib/modules)
and point ``BCC_KERNEL_SOURCE`` at it.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
from pathlib import Path

from agent.errors import CaptureError

TRACEFS = "/sys/kernel/tracing"


def default_cache_dir() -> Path:
    """$SYSGRAM_CACHE_DIR, else /var/cache/sysgram (the agent runs as root)."""
    return Path(os.environ.get("SYSGRAM_CACHE_DIR", "/var/cache/sysgram"))


def ensure_tracefs() -> None:
    """Mount tracefs if it is not mounted (needs root)."""
    if os.path.isdir(os.path.join(TRACEFS, "events")):
        return
    result = subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS], capture_output=True, text=True)
    if result.returncode != 0:
        raise CaptureError(
            f"tracefs is not mounted and mounting it failed: {result.stderr.strip()}", path=TRACEFS
        )


def ensure_kernel_headers(cache_dir: Path | None = None) -> str | None:
    """Return the header tree bcc should use (also exported as BCC_KERNEL_SOURCE), or None for bcc's default."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return os.environ["BCC_KERNEL_SOURCE"]
    release = platform.release()
    if os.path.isdir(f"/lib/modules/{release}/build/include"):
        return None
    arch_trees = sorted(glob.glob("/usr/src/linux-headers-*-amd64"))
    if not arch_trees:
        raise CaptureError(
            f"no kernel headers for {release}: install linux-headers-{release} or linux-headers-cloud-amd64 "
            "(make install does)",
            path="/usr/src",
        )
    arch_tree = Path(arch_trees[-1])
    version = arch_tree.name.removeprefix("linux-headers-").rsplit("-", 2)[0]  # e.g. 6.1.0-56
    common_tree = Path(f"/usr/src/linux-headers-{version}-common")
    if not common_tree.is_dir():
        raise CaptureError(f"{arch_tree} has no matching -common tree", path=str(common_tree))
    target = (cache_dir or default_cache_dir()) / "kernel-src" / arch_tree.name
    stamp = target / ".sysgram-merged"
    if not stamp.exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # -common first, then the arch tree over it: the arch tree's generated headers and .config win.
        for tree in (common_tree, arch_tree):
            subprocess.run(["cp", "-a", "--remove-destination", f"{tree}/.", str(tmp)], check=True)
        (tmp / ".sysgram-merged").write_text(f"{common_tree}\n{arch_tree}\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    os.environ["BCC_KERNEL_SOURCE"] = str(target)
    return str(target)

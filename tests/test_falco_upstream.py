"""The upstream Falco rule sets load, and ten+ stable rules fire (and stay quiet) on hand-built events."""

from __future__ import annotations

import os
import socket

import pytest

from agent.falco import AnomalyFields, ContainerInfo, load_rules
from tests._falco_helpers import (
    CAP_DAC_OVERRIDE,
    CAP_SYS_ADMIN,
    CAP_SYS_MODULE,
    INCUBATING,
    O_CLOEXEC,
    O_RDONLY,
    O_TRUNC,
    O_WRONLY,
    SANDBOX,
    STABLE,
    World,
    proc,
    ruleset_from,
)

pytestmark = pytest.mark.skipif(not os.path.exists(STABLE), reason="../shared/falco-rules not present")
OURS = os.path.join(os.path.dirname(__file__), "..", "rules", "sysgram_rules.yaml")


@pytest.fixture(scope="module")
def stable():
    return load_rules([STABLE])[0]


def test_stable_loads_with_no_error_and_no_unsupported_field(stable) -> None:
    assert stable.errors == [] and stable.warnings == []
    assert len(stable.rules) == 25


def test_incubating_and_sandbox_load_after_stable_with_no_error() -> None:
    rs, diags = load_rules([STABLE, INCUBATING, SANDBOX, OURS])
    assert [d.to_text() for d in diags if d.is_error] == []
    # Every warning names the field and the rule.
    for d in rs.warnings:
        assert d.item_kind == "rule" and d.item_name and "'" in d.message
    names = {r.name for r in rs.rules}
    assert "Anomalous process spawned a shell" in names and "Block anomalous kernel module load" not in names


HOST = [
    proc(1, 0, "systemd", "/usr/lib/systemd/systemd", uid=0, user="root"),
    proc(100, 1, "httpd", "/usr/sbin/httpd", "-k", "start", uid=33, user="www-data"),
    proc(101, 100, "bash", "/usr/bin/bash", "-c", "id", uid=33, user="www-data"),
    proc(102, 1, "cat", "/usr/bin/cat", "/etc/shadow", uid=0, user="root"),
    proc(103, 1, "ln", "/usr/bin/ln", "-s", "/etc/shadow", "/tmp/x", uid=1000),
    proc(104, 1, "evil", "/dev/shm/evil", uid=1000, cwd="/dev/shm/"),
    proc(105, 1, "3", "memfd:payload", uid=1000, exe_from_memfd=True),
    proc(106, 1, "grep", "/usr/bin/grep", "-r", "BEGIN RSA PRIVATE", "/home", uid=1000),
    proc(107, 1, "truncate", "/usr/bin/truncate", uid=0, user="root"),
    proc(108, 1, "gdb", "/usr/bin/gdb", "-p", "100", uid=0, user="root"),
    proc(109, 1, "ls", "/usr/bin/ls", uid=1000),
    proc(110, 1, "ssh", "/usr/bin/ssh", "-p", "443", "attacker.example", uid=1000),
    proc(111, 1, "python3", "/usr/bin/python3", uid=1000),
    # in a container
    proc(200, 1, "containerd-shim", "/usr/bin/containerd-shim", uid=0, user="root"),
    proc(201, 200, "insmod", "/usr/sbin/insmod", "rootkit.ko", uid=0, user="root", container_id="abc123",
         cap_effective=CAP_SYS_MODULE | CAP_SYS_ADMIN),
    proc(202, 200, "sh", "/bin/sh", "-i", uid=0, user="root", container_id="abc123"),
    proc(203, 200, "bash", "/bin/bash", uid=0, user="root", container_id="abc123", tty=34816),
    proc(204, 200, "sh", "/bin/sh", uid=0, user="root", container_id="abc123",
         cap_effective=CAP_SYS_ADMIN | CAP_DAC_OVERRIDE),
]
CONTAINERS = {"abc123": ContainerInfo("abc123", name="web", image="nginx:1.25", repository="nginx", tag="1.25",
                                      privileged=False)}


@pytest.fixture()
def world(stable):
    return World(stable, HOST, containers=CONTAINERS)


def opened(w: World, pid: int, path: str, flags: int = O_RDONLY, res: int = 3) -> list[str]:
    return w.names(pid, "openat", res, dirfd=-100, name=path, flags=flags, mode=0)


def exec_(w: World, pid: int) -> list[str]:
    p = w.table[pid]
    return w.names(pid, "execve", 0, filename=p.exe, argv=list(p.args))


def test_read_sensitive_file_untrusted(world: World) -> None:
    assert opened(world, 102, "/etc/shadow") == ["Read sensitive file untrusted"]
    assert opened(world, 102, "/etc/hosts") == []
    assert opened(world, 102, "/etc/shadow", O_WRONLY) == []
    assert opened(world, 102, "/etc/shadow", res=-13) == []  # failed open: fd.num is -1


def test_relative_path_is_resolved_against_cwd_and_dirfd(world: World) -> None:
    world.names(102, "chdir", 0, path="/etc")
    assert opened(world, 102, "shadow") == ["Read sensitive file untrusted"]
    world.names(109, "openat", 7, dirfd=-100, name="/etc", flags=os.O_DIRECTORY | O_RDONLY)
    assert world.names(109, "openat", 8, dirfd=7, name="sudoers", flags=O_RDONLY) == ["Read sensitive file untrusted"]


def test_directory_traversal(world: World) -> None:
    world.names(111, "chdir", 0, path="/var/www/html")
    assert "Directory traversal monitored file read" in opened(world, 111, "../../../etc/passwd")


def test_run_shell_untrusted(world: World) -> None:
    assert exec_(world, 101) == ["Run shell untrusted"]
    assert exec_(world, 109) == []


def test_create_symlink_over_sensitive_files(world: World) -> None:
    assert world.names(103, "symlink", 0, target="/etc/shadow", linkpath="/tmp/x") == [
        "Create Symlink Over Sensitive Files"]
    assert world.names(103, "symlinkat", 0, target="/etc/motd", linkdirfd=-100, linkpath="/tmp/x") == []
    assert world.names(103, "link", 0, oldpath="/etc/shadow", newpath="/tmp/y") == ["Create Hardlink Over Sensitive Files"]


def test_execution_from_dev_shm_and_memfd(world: World) -> None:
    assert exec_(world, 104) == ["Execution from /dev/shm"]
    assert exec_(world, 105) == ["Fileless execution via memfd_create"]


def test_runcs_memfd_re_exec_matches_the_upstream_exception(world: World) -> None:
    """/proc reads a memfd's exe as ``/memfd:NAME (deleted)``; Falco shows ``memfd:NAME``, and the upstream
    rule excepts runc's own re-exec by that form: every container start would be a Critical alert else."""
    world.table[120] = proc(120, 1, "runc", "/memfd:runc_cloned:/proc/self/exe (deleted)", "init", uid=0,
                            user="root", exe_from_memfd=True)
    world.table[121] = proc(121, 1, "x", "/memfd:payload (deleted)", uid=1000, exe_from_memfd=True)
    assert exec_(world, 120) == []
    hits = world.ev(121, "execve", 0, filename="/memfd:payload (deleted)", argv=["x"])
    assert [h.rule for h in hits] == ["Fileless execution via memfd_create"]
    assert hits[0].output_fields["proc.exepath"] == "memfd:payload"


def test_search_private_keys(world: World) -> None:
    assert exec_(world, 106) == ["Search Private Keys or Passwords"]


def test_clear_log_activities(world: World) -> None:
    assert opened(world, 107, "/var/log/auth.log", O_WRONLY | O_TRUNC) == ["Clear Log Activities"]
    assert opened(world, 107, "/var/log/auth.log", O_WRONLY | os.O_APPEND) == []


def test_ptrace_attach_and_kernel_module_in_container(world: World) -> None:
    assert world.names(108, "ptrace", 0, request=16, pid=100) == ["PTRACE attached to process"]
    assert world.names(108, "ptrace", 0, request=0, pid=0) == ["PTRACE anti-debug attempt"]
    assert world.names(108, "ptrace", 0, request=2, pid=100) == []  # PEEKDATA
    assert world.names(201, "init_module", 0, len=4096, uargs="") == ["Linux Kernel Module Injection Detected"]
    assert world.names(108, "init_module", 0, len=4096, uargs="") == []  # on the host, not in a container


def test_redirect_stdin_to_network_in_container(world: World) -> None:
    assert world.names(202, "socket", 3, domain=socket.AF_INET, type=socket.SOCK_STREAM, proto=0) == []
    world.names(202, "connect", 0, fd=3, family=socket.AF_INET, addr="203.0.113.9", port=4444)
    hits = world.ev(202, "dup2", 0, oldfd=3, newfd=0)
    assert [m.rule for m in hits] == ["Redirect STDOUT/STDIN to Network Connection in Container"]
    assert hits[0].output_fields["fd.name"] == "0.0.0.0:0->203.0.113.9:4444"
    assert hits[0].output_fields["fd.rport"] == 4444
    world.names(202, "openat", 5, dirfd=-100, name="/tmp/f", flags=O_RDONLY | O_CLOEXEC)
    assert world.names(202, "dup2", 1, oldfd=5, newfd=1) == []  # a file, not a socket


def test_terminal_shell_and_release_agent_in_container(world: World) -> None:
    assert exec_(world, 203) == ["Terminal shell in container"]
    assert opened(world, 204, "/sys/fs/cgroup/x/release_agent", O_WRONLY) == [
        "Detect release_agent File Container Escapes"]


def test_ssh_to_non_standard_port(world: World) -> None:
    world.names(110, "socket", 4, domain=socket.AF_INET, type=socket.SOCK_STREAM, proto=0)
    assert world.names(110, "connect", 0, fd=4, family=socket.AF_INET, addr="198.51.100.7", port=443) == [
        "Disallowed SSH Connection Non Standard Port"]
    world.names(110, "socket", 5, domain=socket.AF_INET, type=socket.SOCK_STREAM, proto=0)
    assert world.names(110, "connect", 0, fd=5, family=socket.AF_INET, addr="10.1.1.1", port=443) == []


def test_alert_names_rule_priority_and_output_like_falco(world: World) -> None:
    [m] = world.ev(102, "openat", 3, dirfd=-100, name="/etc/shadow", flags=O_RDONLY)
    assert m.rule == "Read sensitive file untrusted" and m.priority == "Warning"
    assert ": Warning Sensitive file opened for reading by non-trusted program | file=/etc/shadow" in m.output
    assert "maturity_stable" in m.tags and m.tid == 102


def test_fork_copies_fd_table_and_exit_drops_it(world: World) -> None:
    from agent.events import ProcEvent

    world.names(202, "socket", 6, domain=socket.AF_INET, type=socket.SOCK_STREAM, proto=0)
    world.names(202, "connect", 0, fd=6, family=socket.AF_INET, addr="203.0.113.9", port=80)
    world.table[205] = proc(205, 202, "sh", "/bin/sh", uid=0, container_id="abc123")
    world.engine.on_proc_event(ProcEvent("fork", world.ts, 205, 205, ppid=202))
    assert world.names(205, "dup2", 2, oldfd=6, newfd=2) == ["Redirect STDOUT/STDIN to Network Connection in Container"]
    world.engine.on_proc_event(ProcEvent("exit", world.ts, 205, 205))
    assert world.names(205, "dup2", 2, oldfd=6, newfd=2) == []


def test_sysgram_rules_use_anomaly_state() -> None:
    rs, diags = load_rules([STABLE, OURS])
    assert not [d for d in diags if d.is_error]
    anomalies = {111: AnomalyFields(0.97, 0.8, "openat read close", True, new_syscalls="socket connect"),
                 109: AnomalyFields(0.1, 0.8, "", False)}
    w = World(rs, HOST, anomalies=anomalies)
    hits = w.ev(111, "openat", 3, dirfd=-100, name="/etc/shadow", flags=O_RDONLY)
    assert {m.rule for m in hits} == {"Read sensitive file untrusted", "Anomalous process read sensitive file"}
    ours = next(m for m in hits if m.rule.startswith("Anomalous"))
    assert ours.output_fields["sysgram.anomaly.score"] == 0.97 and "sysgram" in ours.tags
    assert ours.output_fields["sysgram.anomaly.new_syscalls"] == "socket connect"  # the model's plain evidence
    assert [m.rule for m in w.ev(109, "openat", 3, dirfd=-100, name="/etc/shadow", flags=O_RDONLY)] == [
        "Read sensitive file untrusted"]
    w.names(111, "socket", 4, domain=socket.AF_INET, type=socket.SOCK_STREAM, proto=0)
    assert w.names(111, "connect", 0, fd=4, family=socket.AF_INET, addr="198.51.100.7", port=443) == [
        "Anomalous process connected out"]


def test_a_shell_is_judged_by_what_spawned_it_not_by_its_own_fresh_state() -> None:
    rs, _ = load_rules([OURS])
    shell = "Anomalous process spawned a shell"
    procs = [*HOST, proc(400, 1, "python3", "/usr/bin/python3", uid=1000), proc(401, 400, "sh", "/bin/sh", "-c", "id"),
             proc(402, 1, "sh", "/bin/sh", uid=1000), proc(403, 100, "sh", "/bin/sh", uid=33)]
    fresh = AnomalyFields(0.0, 0.8, "", False)  # a shell just exec'd: nothing judged yet
    odd_python = AnomalyFields(1.2, 0.3, "socket connect sendto", True, new_syscalls="socket connect")
    # fork, then exec: the parent (python3, 400) is anomalous
    w = World(rs, procs, anomalies={400: odd_python, 401: fresh, 403: fresh, 100: AnomalyFields(0.1, 0.8)})
    hits = w.ev(401, "execve", 0, filename="/bin/sh", argv=["sh", "-c", "id"])
    assert [m.rule for m in hits] == [shell]
    assert hits[0].output_fields["sysgram.anomaly.spawner.score"] == 1.2
    assert hits[0].output_fields["sysgram.anomaly.spawner.new_syscalls"] == "socket connect"
    assert w.names(403, "execve", 0, filename="/bin/sh", argv=["sh"]) == []  # httpd, its parent, is normal
    # exec in place (402 was an anomalous python3 until it exec'd /bin/sh): the state from before the exec
    origins = {402: odd_python}
    w.engine.exec_origin_lookup = origins.get
    assert w.names(402, "execve", 0, filename="/bin/sh", argv=["sh"]) == [shell]
    origins.clear()
    assert w.names(402, "execve", 0, filename="/bin/sh", argv=["sh"]) == []  # its parent, systemd, has no state


def test_a_connect_on_an_fd_number_last_seen_as_a_file_is_a_socket() -> None:
    """Our rules need no close, so fd 3 stayed the file opened through it long after: the connect on the new
    fd 3 read as a file (fd.typechar f, no fd.rport) and *Anomalous process connected out* could not fire."""
    rs, _ = load_rules([OURS])
    w = World(rs, HOST, anomalies={111: AnomalyFields(0.97, 0.8, "socket connect", True)})
    w.names(111, "openat", 3, dirfd=-100, name="/etc/hosts", flags=O_RDONLY)
    hits = w.ev(111, "connect", 0, fd=3, family=socket.AF_INET, addr="198.51.100.7", port=443)
    assert [m.rule for m in hits] == ["Anomalous process connected out"]
    assert hits[0].output_fields["fd.rport"] == 443


def test_a_connect_keeps_a_socket_of_another_family() -> None:
    """An AF_INET6 UDP socket may connect to an AF_INET address: it stays a UDP socket (only a file or a
    directory entry is taken for stale)."""
    rs = ruleset_from("""
- rule: udp out
  desc: test
  condition: evt.type = connect and fd.l4proto = udp
  output: udp %fd.name
  priority: NOTICE
""")
    w = World(rs, HOST)
    w.names(111, "socket", 4, domain=socket.AF_INET6, type=socket.SOCK_DGRAM, proto=0)
    assert w.names(111, "connect", 0, fd=4, family=socket.AF_INET, addr="198.51.100.7", port=53) == ["udp out"]


def test_sysgram_proc_is_32bit_tells_a_32_bit_program() -> None:
    rs = ruleset_from("""
- rule: 32-bit reader
  desc: test
  condition: evt.type in (open, openat) and sysgram.proc.is_32bit = true
  output: 32-bit %proc.exepath read %fd.name
  priority: NOTICE
""")
    w = World(rs, [*HOST, proc(500, 100, "tool32", "/opt/tool32", compat=True), proc(501, 100, "tool64", "/opt/tool64")])
    assert w.names(500, "open", 3, name="/etc/shadow", flags=O_RDONLY, mode=0) == ["32-bit reader"]
    assert w.names(501, "openat", 3, dirfd=-100, name="/etc/shadow", flags=O_RDONLY, mode=0) == []


def test_exec_through_a_memfd_is_fileless_even_before_proc_says_so(world: World) -> None:
    from agent.events import ProcEvent

    # 111 makes a close-on-exec memfd, forks 112, which runs it with fexecve; the table never saw the
    # process alive (it still shows the parent's image), only the kernel's "/dev/fd/N" name of the exec.
    assert world.names(111, "memfd_create", 5, name="payload", flags=1) == []
    world.table[112] = proc(112, 111, "5", "/dev/fd/5", uid=1000)
    world.engine.on_proc_event(ProcEvent("fork", world.ts, 112, 112, ppid=111))
    world.engine.on_proc_event(ProcEvent("exec", world.ts, 112, 112, comm="5", filename="/dev/fd/5"))
    fileless = world.ev(112, "execveat", 0, dirfd=5, filename="", flags=0x1000)
    assert [m.rule for m in fileless] == ["Fileless execution via memfd_create"]
    assert fileless[0].output_fields["evt.arg.flags"] == "EXE_FROM_MEMFD"  # the exit's exe flags, not AT_*
    # The next exec of the same process is an ordinary one; a plain file's fd is not a memfd.
    assert world.names(112, "execve", 0, filename="/bin/ls", argv=["ls"]) == []
    world.names(111, "openat", 6, dirfd=-100, name="/usr/bin/id", flags=O_RDONLY)
    world.table[113] = proc(113, 111, "6", "/dev/fd/6", uid=1000)
    world.engine.on_proc_event(ProcEvent("fork", world.ts, 113, 113, ppid=111))
    world.engine.on_proc_event(ProcEvent("exec", world.ts, 113, 113, comm="6", filename="/dev/fd/6"))
    assert world.names(113, "execveat", 0, dirfd=6, filename="", flags=0x1000) == []


def test_rules_that_exec_also_capture_memfd_create(stable) -> None:
    assert {"execve", "memfd_create"} <= stable.interesting_syscalls()
    no_exec = ruleset_from("- rule: r\n  desc: d\n  condition: evt.type = openat\n  output: o\n  priority: INFO\n")
    assert "memfd_create" not in no_exec.interesting_syscalls()


def test_container_id_is_the_short_id_and_full_id_all_of_it() -> None:
    full = "ab" * 32
    rs = ruleset_from("- rule: r\n  desc: d\n  condition: evt.type = openat and container.id != host\n"
                      "  output: id=%container.id full=%container.full_id\n  priority: INFO\n")
    w = World(rs, [proc(300, 1, "sh", "/bin/sh", container_id=full), proc(301, 1, "sh", "/bin/sh")])
    matches = w.ev(300, "openat", 3, dirfd=-100, name="/etc/hosts", flags=O_RDONLY)
    assert [m.output_fields for m in matches] == [{"container.id": full[:12], "container.full_id": full}]
    assert w.ev(301, "openat", 3, dirfd=-100, name="/etc/hosts", flags=O_RDONLY) == []


def test_a_rule_can_ask_which_syscalls_are_new_for_the_program() -> None:
    rs = ruleset_from("- rule: r\n  desc: d\n  condition: evt.type = openat and sysgram.anomaly.new_syscalls contains"
                      " socket\n  output: new=%sysgram.anomaly.new_syscalls\n  priority: INFO\n")
    anomalies = {111: AnomalyFields(0.97, 0.8, "", True, new_syscalls="epoll_create1 socket connect"),
                 109: AnomalyFields(0.97, 0.8, "", True, new_syscalls="getdents64")}
    w = World(rs, HOST, anomalies=anomalies)
    hits = w.ev(111, "openat", 3, dirfd=-100, name="/etc/shadow", flags=O_RDONLY)
    assert [m.output_fields for m in hits] == [{"sysgram.anomaly.new_syscalls": "epoll_create1 socket connect"}]
    assert w.ev(109, "openat", 3, dirfd=-100, name="/etc/shadow", flags=O_RDONLY) == []


def test_rmdir_below_a_binary_dir_is_seen() -> None:
    """rmdir had no decoder in the capture: "Modify binary dirs" loaded clean and its rmdir branch never
    matched. Its one argument is Falco's evt.arg.path."""
    from agent.capture._decode import SPECS

    assert "rmdir" in SPECS
    rs, _ = load_rules([STABLE, INCUBATING, SANDBOX])
    w = World(rs, HOST)
    assert "Modify binary dirs" in w.names(109, "rmdir", 0, path="/usr/bin/x")
    assert "Modify binary dirs" not in w.names(109, "rmdir", 0, path="/home/u/x")


def test_thread_cap_permitted_is_read_not_missing() -> None:
    """It was treated as missing: `not thread.cap_permitted contains CAP_SYS_ADMIN` was true of everyone."""
    import os as _os

    from agent.proc import read_process

    rs = ruleset_from("- rule: Unshare without admin\n  desc: d\n  condition: evt.type = unshare and not "
                      "thread.cap_permitted contains CAP_SYS_ADMIN\n  output: caps %thread.cap_permitted\n"
                      "  priority: WARNING\n")
    w = World(rs, [proc(300, 1, "unshare", "/usr/bin/unshare", cap_permitted=CAP_SYS_ADMIN),
                   proc(301, 1, "unshare", "/usr/bin/unshare", cap_permitted=0)])
    assert w.names(300, "unshare", 0, flags=0x20000) == []
    hits = w.ev(301, "unshare", 0, flags=0x20000)
    assert [h.rule for h in hits] == ["Unshare without admin"]
    me = read_process(_os.getpid())  # /proc's CapPrm, live: root holds CAP_SYS_ADMIN (bit 21)
    assert me is not None and (me.cap_permitted >> 21) & 1 == (1 if _os.geteuid() == 0 else 0)

"""Edge cases of reading /proc, on a fake proc tree built in tmp_path (and the builder other tests use)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from agent.proc import HOST_CONTAINER_ID, elf_is_i386, read_process
from agent.proc._procfs import ProcReader, parse_stat, root_overlay_upperdir

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def make_proc(
    root: Path,
    pid: int,
    *,
    comm: str = "tool",
    ppid: int = 1,
    tgid: int | None = None,
    start_ticks: int = 1000,
    state: str = "S",
    flags: int = 0x400000,
    uid: int = 0,
    gid: int = 0,
    cap_eff: int = 0,
    seccomp: int = 0,
    argv: tuple[str, ...] = ("tool",),
    cwd: str = "/",
    exe: str | None = "/usr/bin/tool",
    cgroup: str = "0::/\n",
    loginuid: int = 4294967295,
    tty: int = 0,
    sid: int = 1,
    pgid: int = 1,
) -> Path:
    """Write /proc/PID as the kernel would (stat, status, cmdline, cgroup, loginuid, exe and cwd links)."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    for name in ("exe", "cwd"):
        if (d / name).is_symlink():
            (d / name).unlink()
    rest = [state, ppid, pgid, sid, tty, -1, flags] + [0] * 12 + [start_ticks] + [0] * 30
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(str(x) for x in rest) + "\n")
    (d / "status").write_text(
        f"Name:\t{comm[:15]}\nState:\t{state}\nTgid:\t{tgid if tgid is not None else pid}\n"
        f"Pid:\t{pid}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\n"
        f"Groups:\t\nCapEff:\t{cap_eff:016x}\nSeccomp:\t{seccomp}\n"
    )
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "cgroup").write_text(cgroup)
    (d / "loginuid").write_text(str(loginuid))
    if exe is not None:
        os.symlink(exe, d / "exe")
    os.symlink(cwd, d / "cwd")
    return d


def test_fake_process_is_read_field_by_field(tmp_path: Path) -> None:
    make_proc(
        tmp_path, 4242, comm="we ird) (x", ppid=77, start_ticks=5000, uid=0, gid=0, cap_eff=0x1fffeffff,
        seccomp=2, argv=("tool", "--flag", "a b"), cwd="/srv", loginuid=0, tty=34816, sid=70, pgid=71,
        cgroup="0::/system.slice/docker-" + "ab" * 32 + ".scope\n",
    )
    reader = ProcReader(str(tmp_path))
    info = reader.read(4242)
    assert info is not None
    assert (info.pid, info.ppid, info.comm) == (4242, 77, "we ird) (x")
    assert info.args == ("tool", "--flag", "a b")
    assert info.exe == "/usr/bin/tool" and info.cwd == "/srv"
    assert (info.uid, info.user, info.gid, info.group) == (0, "root", 0, "root")
    assert (info.loginuid, info.loginname) == (0, "root")
    assert (info.tty, info.sid, info.pgid) == (34816, 70, 71)
    assert info.cap_effective == 0x1FFFEFFFF and info.seccomp_mode == 2
    assert info.container_id == "ab" * 32
    assert info.start_ns == 5000 * TICK_NS - reader.boot_offset_ns
    assert info.cmdline == "we ird) (x --flag a b"


def test_unset_loginuid_and_unknown_user(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, uid=54321, gid=54321, loginuid=4294967295)
    info = read_process(10, str(tmp_path))
    assert info is not None
    assert (info.uid, info.user, info.group) == (54321, "", "")
    assert (info.loginuid, info.loginname) == (-1, "")
    assert info.container_id == HOST_CONTAINER_ID


def test_kernel_thread_has_no_exe_and_parent_kthreadd(tmp_path: Path) -> None:
    make_proc(tmp_path, 55, comm="kworker/0:1", ppid=2, flags=0x00208040, argv=(), exe=None)
    info = read_process(55, str(tmp_path))
    assert info is not None
    assert info.exe == "" and info.args == () and info.ppid == 2
    assert info.cmdline == "kworker/0:1"


def test_zombie_without_exe_link_is_still_read(tmp_path: Path) -> None:
    make_proc(tmp_path, 56, state="Z", argv=(), exe=None)
    info = read_process(56, str(tmp_path))
    assert info is not None and info.exe == "" and info.args == ()


def test_vanished_or_garbled_process_reads_as_none(tmp_path: Path) -> None:
    reader = ProcReader(str(tmp_path))
    assert reader.read(999) is None
    make_proc(tmp_path, 57)
    (tmp_path / "57" / "stat").write_text("57 (truncated")
    assert reader.read(57) is None
    make_proc(tmp_path, 58)
    (tmp_path / "58" / "status").unlink()
    assert reader.read(58) is None
    assert reader.failures == 3 and reader.reads == 3


def test_thread_directory_reads_as_its_process(tmp_path: Path) -> None:
    make_proc(tmp_path, 300, comm="server", argv=("server",))
    make_proc(tmp_path, 301, comm="worker", tgid=300)
    info = read_process(301, str(tmp_path))
    assert info is not None and info.pid == 300 and info.comm == "server"


def test_memfd_executable_is_flagged(tmp_path: Path) -> None:
    make_proc(tmp_path, 60, exe="/memfd:payload (deleted)")
    info = read_process(60, str(tmp_path))
    assert info is not None and info.exe_from_memfd and info.exe.startswith("/memfd:")


def test_writable_exe_depends_on_owner_mode_and_capability(tmp_path: Path) -> None:
    binary = tmp_path / "bin" / "tool"
    binary.parent.mkdir()
    binary.write_bytes(b"\x7fELF" + b"\0" * 60)
    os.chown(binary, 1000, 1000)
    root = tmp_path / "proc"
    reader = ProcReader(str(root))
    binary.chmod(0o755)
    make_proc(root, 70, uid=1000, gid=1000, exe=str(binary))
    make_proc(root, 71, uid=2000, gid=2000, exe=str(binary))
    make_proc(root, 72, uid=2000, gid=2000, cap_eff=1 << 1, exe=str(binary))  # CAP_DAC_OVERRIDE
    assert [reader.read(p).exe_writable for p in (70, 71, 72)] == [True, False, True]  # type: ignore[union-attr]
    binary.chmod(0o757)
    assert reader.read(71).exe_writable  # type: ignore[union-attr]


def _elf_header(elf_class: int, machine: int, big_endian: bool = False) -> bytes:
    order = ">" if big_endian else "<"
    ident = b"\x7fELF" + bytes([elf_class, 2 if big_endian else 1, 1]) + b"\0" * 9
    return ident + struct.pack(order + "HHI", 2, machine, 1) + b"\0" * 40


def test_elf_header_detector() -> None:
    assert elf_is_i386(_elf_header(1, 3))
    assert not elf_is_i386(_elf_header(2, 62))  # x86_64
    assert not elf_is_i386(_elf_header(1, 40))  # 32-bit ARM
    assert not elf_is_i386(_elf_header(1, 3, big_endian=True)[:18] + b"\x03\x00")  # wrong byte order
    assert not elf_is_i386(b"#!/bin/sh\n" + b"\0" * 20)
    assert not elf_is_i386(b"\x7fELF\x01")


def test_crafted_32bit_exe_marks_process_compat(tmp_path: Path) -> None:
    i386 = tmp_path / "i386-tool"
    i386.write_bytes(_elf_header(1, 3))
    amd64 = tmp_path / "amd64-tool"
    amd64.write_bytes(_elf_header(2, 62))
    root = tmp_path / "proc"
    make_proc(root, 80, exe=str(i386))
    make_proc(root, 81, exe=str(amd64))
    reader = ProcReader(str(root))
    assert reader.read(80).compat and not reader.read(81).compat  # type: ignore[union-attr]


def test_stat_parser_rejects_short_lines() -> None:
    assert parse_stat("1 (init) S 0") is None
    assert parse_stat("no parens at all") is None


def test_overlay_upperdir_from_mountinfo() -> None:
    text = (
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "600 500 0:88 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l1:/l2,"
        "upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work\n"
    )
    assert root_overlay_upperdir(text) == "/var/lib/docker/overlay2/abc/diff"
    assert root_overlay_upperdir("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n") == ""
    escaped = "1 0 0:1 / / rw - overlay overlay rw,upperdir=/a\\040b/up,workdir=/w\n"
    assert root_overlay_upperdir(escaped) == "/a b/up"


@pytest.mark.parametrize("in_upper", [True, False])
def test_exe_in_overlay_upper_layer(tmp_path: Path, in_upper: bool) -> None:
    binary = tmp_path / "merged" / "usr" / "bin" / "dropper"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(_elf_header(2, 62))
    upper = tmp_path / "upper"
    if in_upper:  # the file was written inside the container: it lives in the upper dir
        copy = Path(str(upper) + str(binary))
        copy.parent.mkdir(parents=True)
        copy.write_bytes(binary.read_bytes())
    root = tmp_path / "proc"
    d = make_proc(root, 90, exe=str(binary))
    (d / "ns").mkdir()
    (d / "ns" / "mnt").write_text("")
    mount = f"1 0 0:1 / / rw - overlay overlay rw,lowerdir=/x,upperdir={upper},workdir=/w\n"
    (d / "mountinfo").write_text(mount)
    info = ProcReader(str(root)).read(90)
    assert info is not None and info.exe_upper_layer is in_upper


@pytest.mark.parametrize("in_upper", [True, False])
def test_exe_in_upper_layer_of_a_chroot_reachable_from_ours(tmp_path: Path, in_upper: bool) -> None:
    # A chroot (or a runtime that keeps the old root): our view of its exe runs through its root, while
    # its overlay's upper dir holds paths relative to that root.
    merged = tmp_path / "merged"
    binary = merged / "tmp" / "dropper"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(_elf_header(2, 62))
    upper = tmp_path / "upper"
    if in_upper:
        (upper / "tmp").mkdir(parents=True)
        (upper / "tmp" / "dropper").write_bytes(binary.read_bytes())
    root = tmp_path / "proc"
    d = make_proc(root, 91, exe=str(binary))
    os.symlink(merged, d / "root")
    (d / "ns").mkdir()
    (d / "ns" / "mnt").write_text("")
    (d / "mountinfo").write_text(f"1 0 0:1 / / rw - overlay overlay rw,lowerdir=/,upperdir={upper},workdir=/w\n")
    info = ProcReader(str(root)).read(91)
    assert info is not None and info.exe_upper_layer is in_upper


def test_upper_layer_is_seen_after_the_process_pivots_into_the_overlay(tmp_path: Path) -> None:
    # Same mount namespace, read before and after the rootfs is mounted and entered: not a stale "no overlay".
    merged, upper = tmp_path / "merged", tmp_path / "upper"
    (merged / "tmp").mkdir(parents=True)
    (upper / "tmp").mkdir(parents=True)
    for d in (merged, upper):
        (d / "tmp" / "dropper").write_bytes(_elf_header(2, 62))
    root = tmp_path / "proc"
    (tmp_path / "mnt-ns").write_text("")  # one namespace: both ns/mnt links are the same inode
    for pid, exe, proc_root, mounts in (
        (92, "/usr/bin/runc", "/", "1 0 254:0 / / rw - ext4 /dev/vda rw\n"),
        (93, f"{merged}/tmp/dropper", str(merged),
         f"1 0 0:1 / / rw - overlay overlay rw,lowerdir=/,upperdir={upper},workdir=/w\n"),
    ):
        d = make_proc(root, pid, exe=exe)
        os.symlink(proc_root, d / "root")
        (d / "ns").mkdir()
        os.link(tmp_path / "mnt-ns", d / "ns" / "mnt")
        (d / "mountinfo").write_text(mounts)
    reader = ProcReader(str(root))
    assert reader.read(92).exe_upper_layer is False  # type: ignore[union-attr]
    assert reader.read(93).exe_upper_layer is True  # type: ignore[union-attr]


def test_cgroup2_mount_is_found_past_the_optional_fields_and_unescaped(tmp_path: Path) -> None:
    from agent.proc._procfs import cgroup2_mount

    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
        "30 22 0:26 / /sys/fs/cgroup ro,nosuid shared:9 master:2 - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/my\\040cgroup rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"
        "32 30 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n"
    )
    assert cgroup2_mount(str(info)) == "/sys/fs/my cgroup"
    info.write_text("32 30 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\nbroken line\n")
    assert cgroup2_mount(str(info)) is None  # a v1-only host
    assert cgroup2_mount(str(tmp_path / "missing")) is None

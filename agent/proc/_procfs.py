"""Reading one process from /proc, cheaply and without mixing two processes.

Every file is read relative to one open descriptor of ``/proc/PID``: that descriptor stays bound to the
process it was opened for, so if the pid dies and is reused mid-read the reads fail (ESRCH) instead of
returning the newcomer's data. Each file is opened once and parsed minimally.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import os
import pwd
import stat as stat_mod
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.proc._cache import BoundedCache
from agent.proc._container import parse_container_id
from agent.proc.info import HOST_CONTAINER_ID, ProcessInfo

_PF_KTHREAD = 0x00200000  # task flags (stat field 9): a kernel thread, which has no exe, argv or cwd
_UNSET_LOGINUID = 4294967295
_CAP_DAC_OVERRIDE = 1 << 1
_ST_RDONLY = 1
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32 = 1
_EM_386 = 3
_DELETED = " (deleted)"


def elf_is_i386(header: bytes) -> bool:
    """True when ``header`` (the first 20 bytes of a file) is a 32-bit x86 (i386) ELF."""
    if len(header) < 20 or header[:4] != _ELF_MAGIC or header[4] != _ELFCLASS32:
        return False
    machine = int.from_bytes(header[18:20], "big" if header[5] == 2 else "little")
    return machine == _EM_386


def _unescape_mount_field(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def root_overlay_upperdir(mountinfo: str) -> str:
    """The upper directory of the overlayfs mounted at ``/`` in a mountinfo text, or ``""``."""
    upper = ""
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or fields[4] != "/":
            continue
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        # The last mount on "/" is the one the process sees.
        upper = ""
        if fields[sep + 1] == "overlay":
            for option in fields[sep + 3].split(","):
                if option.startswith("upperdir="):
                    upper = _unescape_mount_field(option[len("upperdir=") :])
    return upper


@dataclass(frozen=True, slots=True)
class StatLine:
    """The fields of /proc/PID/stat the table uses."""

    comm: str
    state: str
    ppid: int
    pgid: int
    sid: int
    tty: int
    flags: int
    start_ticks: int


def parse_stat(text: str) -> StatLine | None:
    # comm may hold spaces and parentheses: it ends at the last ')'.
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    rest = text[close_paren + 2 :].split(" ")
    if len(rest) < 20:
        return None
    try:
        return StatLine(
            comm=text[open_paren + 1 : close_paren],
            state=rest[0],
            ppid=int(rest[1]),
            pgid=int(rest[2]),
            sid=int(rest[3]),
            tty=int(rest[4]),
            flags=int(rest[6]),
            start_ticks=int(rest[19]),
        )
    except ValueError:
        return None


_STATUS_KEYS = ("Tgid", "PPid", "Uid", "Gid", "Groups", "CapPrm", "CapEff", "Seccomp")  # never the first line


def parse_status(text: str) -> dict[str, str]:
    """The few /proc/PID/status lines the table uses, by key (found directly, not line by line)."""
    found: dict[str, str] = {}
    for key in _STATUS_KEYS:
        at = text.find(f"\n{key}:")
        if at < 0:
            continue
        at += len(key) + 2
        end = text.find("\n", at)
        found[key] = text[at : end if end >= 0 else len(text)].strip()
    return found


def _second_or_first(value: str) -> int:
    # "Uid: real effective saved fs": the effective id is what permission checks (and Falco) use.
    parts = value.split()
    if not parts:
        return -1
    return int(parts[1] if len(parts) > 1 else parts[0])


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunk = os.read(fd, 65536)
        if len(chunk) < 65536:
            return chunk
        chunks = [chunk]
        while chunk:
            chunk = os.read(fd, 1 << 20)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _readlink_at(dir_fd: int, name: str) -> str:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except (FileNotFoundError, PermissionError):
        return ""


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _boot_offset_ns() -> int:
    # /proc stat start times count from boot including suspend (CLOCK_BOOTTIME); BPF uses CLOCK_MONOTONIC.
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return boot - (before + after) // 2


CGROUP_RESCAN_NS = 1_000_000_000  # without file handles: the hierarchy is walked at most once a second
_CGROUP_PATHS_MAX = 65536


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted, or None (a v1-only host, or no mountinfo)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                fields = line.split()
                # optional fields end at " - "; the filesystem type follows it
                dash = fields.index("-", 6) if "-" in fields[6:] else len(fields)
                if dash + 1 < len(fields) and fields[dash + 1] == "cgroup2":
                    return _unescape_mount_field(fields[4])
    except OSError:
        pass
    return None


_LIBC = ctypes.CDLL(None, use_errno=True)
_FILEID_KERNFS = 0xFE  # the file handle type of a kernfs node: its 64-bit id, which is a cgroup's id


def _cgroup_dir_by_id(mount_fd: int, cgroup_id: int) -> str | None:
    """The path of cgroup ``cgroup_id`` by open_by_handle_at(2) on the cgroup2 mount (needs
    CAP_DAC_READ_SEARCH). None when no such cgroup exists (removed); OSError when the kernel or our
    privileges do not allow handles."""
    handle = ctypes.create_string_buffer(struct.pack("=IiQ", 8, _FILEID_KERNFS, cgroup_id), 16)
    fd = _LIBC.open_by_handle_at(mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ESTALE, errno.ENOENT):
            return None
        raise OSError(err, os.strerror(err))
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)



class ProcReader:
    """Reads processes under one proc root, with bounded caches of what is costly to look up.

    ``cgroup_root``: the cgroup v2 mount, to name the container of a cgroup id: by open_by_handle_at(2)
    (a cgroup's id is its kernfs file handle), else by walking the mount (a cgroup v2 directory's inode
    number is its id). None: found from mountinfo for the live /proc, none for any other proc root.
    (``sysgram replay`` reads the live /proc too, but recordings carry no cgroup ids.)"""

    def __init__(self, proc_root: str = "/proc", cache_size: int = 4096, cgroup_root: str | None = None) -> None:
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root if cgroup_root is not None else (
            cgroup2_mount() if proc_root == "/proc" else None
        )
        # cgroup id (directory inode) -> path under the mount
        self._cgroup_paths: BoundedCache[int, str] = BoundedCache(_CGROUP_PATHS_MAX)
        self._cgroup_mount_fd: int | None = None
        self._handles_work: bool | None = None  # open_by_handle_at on the mount: unknown until tried
        self._cgroup_scanned_ns = -CGROUP_RESCAN_NS
        self.cgroup_scans = 0
        hz = os.sysconf("SC_CLK_TCK")
        self.tick_ns = 1_000_000_000 // hz
        self.boot_offset_ns = _boot_offset_ns()
        self.reads = 0
        self.failures = 0
        self.mismatches = 0
        self._users: BoundedCache[int, str] = BoundedCache(cache_size)
        self._groups: BoundedCache[int, str] = BoundedCache(cache_size)
        self._containers: BoundedCache[str, str] = BoundedCache(cache_size)
        # (st_dev, st_ino, st_mtime_ns) of an executable -> is an i386 ELF
        self._elf: BoundedCache[tuple[int, int, int], bool] = BoundedCache(cache_size)
        self._readonly_dev: BoundedCache[int, bool] = BoundedCache(256)
        # mount namespace inode -> the overlay upper dir of its root ("" when the root is not overlay)
        self._upperdir: BoundedCache[tuple[int, int, int, int], str] = BoundedCache(1024)

    def start_ns(self, start_ticks: int) -> int:
        return start_ticks * self.tick_ns - self.boot_offset_ns

    def cache_sizes(self) -> dict[str, int]:
        return {
            "users_cached": len(self._users) + len(self._groups),
            "cgroups_cached": len(self._containers),
            "elf_cached": len(self._elf),
        }

    def user_name(self, uid: int) -> str:
        return _cached_name(self._users, uid, lambda i: pwd.getpwuid(i).pw_name)

    def group_name(self, gid: int) -> str:
        return _cached_name(self._groups, gid, lambda i: grp.getgrgid(i).gr_name)

    def container_id(self, cgroup_text: str) -> str:
        cid = self._containers.get(cgroup_text)
        if cid is None:
            cid = parse_container_id(cgroup_text)
            self._containers.put(cgroup_text, cid)
        return cid

    def container_of_cgroup(self, cgroup_id: int) -> str | None:
        """The container id of a cgroup v2 id (``"host"`` for a host cgroup), or None when unknown: no
        cgroup v2 mount, or no such cgroup (removed already; without file handles, also one made since
        a walk less than a second ago)."""
        if not cgroup_id or not self.cgroup_root:
            return None
        path = self._cgroup_paths.get(cgroup_id) or self._cgroup_by_handle(cgroup_id)
        if path is None and self._handles_work is False:
            now = time.monotonic_ns()
            if now - self._cgroup_scanned_ns < CGROUP_RESCAN_NS:
                return None
            self._cgroup_scanned_ns = now
            self._scan_cgroups()
            path = self._cgroup_paths.get(cgroup_id)
        if path is None:
            return None
        return self.container_id(f"0::{path}\n")

    def _cgroup_by_handle(self, cgroup_id: int) -> str | None:
        """The exact lookup (no walk), while the kernel allows it; its answers are cached."""
        if self._handles_work is False or self.cgroup_root is None:
            return None
        root = self.cgroup_root.rstrip("/")
        try:
            if self._cgroup_mount_fd is None:
                self._cgroup_mount_fd = os.open(root or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if self._handles_work is None:  # first use: the mount's own id must lead back to the mount
                own = os.fstat(self._cgroup_mount_fd).st_ino
                self._handles_work = _cgroup_dir_by_id(self._cgroup_mount_fd, own) == (root or "/")
                if not self._handles_work:
                    return None
            full = _cgroup_dir_by_id(self._cgroup_mount_fd, cgroup_id)
        except (OSError, AttributeError):  # no handles here (privileges, kernel, libc): walk instead
            self._handles_work = False
            return None
        if full is None or not (full == root or full.startswith(root + "/")):
            return None
        path = full[len(root):] or "/"
        self._cgroup_paths.put(cgroup_id, path)
        return path

    def _scan_cgroups(self) -> None:
        """Map every cgroup directory's inode to its path (a full rescan drops removed cgroups)."""
        assert self.cgroup_root is not None
        self.cgroup_scans += 1
        found: BoundedCache[int, str] = BoundedCache(_CGROUP_PATHS_MAX)
        root = self.cgroup_root.rstrip("/")
        with contextlib.suppress(OSError):
            found.put(os.stat(root).st_ino, "/")
        for top, dirs, _files in os.walk(root, onerror=lambda _err: None):
            for name in dirs:
                full = os.path.join(top, name)
                with contextlib.suppress(OSError):
                    found.put(os.stat(full, follow_symlinks=False).st_ino, full[len(root):])
        self._cgroup_paths = found

    def read_start_ns(self, pid: int) -> int | None:
        """The start time of ``pid`` now (None when it is gone): one open, used to verify identity."""
        try:
            with open(f"{self.proc_root}/{pid}/stat", "rb") as fh:
                line = parse_stat(_decode(fh.read()))
        except OSError:
            return None
        return None if line is None else self.start_ns(line.start_ticks)

    def same_start(self, a_ns: int, b_ns: int) -> bool:
        # /proc counts start time in clock ticks; events in ns. Two ticks absorb the rounding.
        return abs(a_ns - b_ns) <= 2 * self.tick_ns

    def read(self, pid: int, inherit: ProcessInfo | None = None) -> ProcessInfo | None:
        """Read ``pid``'s thread group; None when it is gone or unreadable.

        The result's ``pid`` is the tgid: asking for a thread id yields its process. With ``inherit``
        (an exec of a known process) the login uid is taken from it, not re-read (the cgroup is re-read),
        and the read is refused (None, counted in ``mismatches``) unless the start times match: then
        it is another process under the same pid.
        """
        self.reads += 1
        for _attempt in range(2):
            try:
                dir_fd = os.open(f"{self.proc_root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                break
            try:
                status = parse_status(_decode(_read_at(dir_fd, "status")))
                tgid = int(status.get("Tgid", pid))
                if tgid != pid:
                    pid = tgid  # a thread's directory: read its process instead
                    continue
                line = parse_stat(_decode(_read_at(dir_fd, "stat")))
                if line is None:
                    break
                known_start = inherit.start_ns if inherit is not None else 0
                if known_start and not self.same_start(self.start_ns(line.start_ticks), known_start):
                    self.mismatches += 1
                    return None
                return self._assemble(dir_fd, pid, line, status, inherit)
            except (OSError, ValueError):
                break
            finally:
                os.close(dir_fd)
        self.failures += 1
        return None

    def refresh_clock(self) -> None:
        """Re-measure the boot/monotonic offset (it grows when the host suspends)."""
        self.boot_offset_ns = _boot_offset_ns()

    def _assemble(
        self, dir_fd: int, pid: int, line: StatLine, status: dict[str, str], inherit: ProcessInfo | None
    ) -> ProcessInfo:
        uid = _second_or_first(status.get("Uid", ""))
        gid = _second_or_first(status.get("Gid", ""))
        cap_eff = int(status.get("CapEff", "0") or "0", 16)
        cap_prm = int(status.get("CapPrm", "0") or "0", 16)
        kernel_thread = bool(line.flags & _PF_KTHREAD)
        exe = cwd = ""
        args: tuple[str, ...] = ()
        compat = writable = upper = False
        if not kernel_thread:
            argv = _read_at(dir_fd, "cmdline")
            if argv:
                args = tuple(_decode(a) for a in argv.rstrip(b"\0").split(b"\0"))
            cwd = _readlink_at(dir_fd, "cwd")
            exe = _readlink_at(dir_fd, "exe")
            if exe:
                groups = {int(g) for g in status.get("Groups", "").split()}
                groups.add(gid)
                compat, writable, upper = self._exe_facts(dir_fd, pid, exe, uid, groups, cap_eff)
        # The login uid is set once per session: an exec keeps it. The cgroup is re-read on exec as Falco
        # does: container runtimes move the forked child into the container's cgroup, then exec.
        loginuid = inherit.loginuid if inherit is not None else self._loginuid(dir_fd)
        container = inherit.container_id if inherit is not None else HOST_CONTAINER_ID
        with contextlib.suppress(OSError):
            container = self.container_id(_decode(_read_at(dir_fd, "cgroup")))
        return ProcessInfo(
            pid=pid,
            ppid=int(status.get("PPid", line.ppid)),
            comm=line.comm,
            exe=exe,
            args=args,
            cwd=cwd,
            uid=uid,
            gid=gid,
            user=self.user_name(uid),
            group=self.group_name(gid),
            loginuid=loginuid,
            loginname=self.user_name(loginuid),
            tty=line.tty,
            sid=line.sid,
            pgid=line.pgid,
            # An exec keeps the start time: keep the exact one the table has (a fork event's timestamp).
            start_ns=inherit.start_ns if inherit and inherit.start_ns else self.start_ns(line.start_ticks),
            container_id=container,
            cap_effective=cap_eff,
            cap_permitted=cap_prm,
            exe_from_memfd=exe.startswith("/memfd:"),
            exe_writable=writable,
            exe_upper_layer=upper,
            compat=compat,
            seccomp_mode=int(status.get("Seccomp", "0") or "0"),
        )

    def _loginuid(self, dir_fd: int) -> int:
        try:
            value = int(_read_at(dir_fd, "loginuid") or b"-1")
        except (OSError, ValueError):
            return -1
        return -1 if value == _UNSET_LOGINUID else value

    def _exe_facts(
        self, dir_fd: int, pid: int, exe: str, uid: int, groups: set[int], cap_eff: int
    ) -> tuple[bool, bool, bool]:
        """(compat, writable, upper layer) of the process's executable."""
        try:
            st = os.stat("exe", dir_fd=dir_fd)
        except OSError:
            return False, False, False
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        compat = self._elf.get(key)
        if compat is None:
            try:
                compat = elf_is_i386(_read_at_most(dir_fd, "exe", 20))
            except OSError:
                compat = False
            self._elf.put(key, compat)
        writable = self._writable(st, pid, uid, groups, cap_eff)
        upper = self._in_upper_layer(dir_fd, exe)
        return compat, writable, upper

    def path_is_i386(self, path: str) -> bool | None:
        """Whether the file at ``path`` (in the agent's own mount namespace) is a 32-bit x86 ELF: the class of
        a program whose process was gone before /proc could be read. None: no such file to read."""
        if not path.startswith("/") or path.startswith(("/dev/fd/", "/proc/")):
            return None  # relative, or a descriptor of the process (fexecve): nothing the agent can open
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        compat = self._elf.get(key)
        if compat is None:
            try:
                with open(path, "rb") as f:
                    header = f.read(20)
            except OSError:
                return None
            if header[:4] != _ELF_MAGIC:
                return None  # a script: its interpreter's class, which this does not tell
            compat = elf_is_i386(header)
            self._elf.put(key, compat)
        return compat

    def _writable(self, st: os.stat_result, pid: int, uid: int, groups: set[int], cap_eff: int) -> bool:
        # What the kernel's permission check would say for this process's credentials.
        readonly = self._readonly_dev.get(st.st_dev)
        if readonly is None:
            try:
                readonly = bool(os.statvfs(f"{self.proc_root}/{pid}/exe").f_flag & _ST_RDONLY)
            except OSError:
                readonly = False
            self._readonly_dev.put(st.st_dev, readonly)
        if readonly:
            return False
        mode = st.st_mode
        if cap_eff & _CAP_DAC_OVERRIDE:
            return True
        if st.st_uid == uid:
            return bool(mode & stat_mod.S_IWUSR)
        if st.st_gid in groups:
            return bool(mode & stat_mod.S_IWGRP)
        return bool(mode & stat_mod.S_IWOTH)

    def _in_upper_layer(self, dir_fd: int, exe: str) -> bool:
        if exe.endswith(_DELETED) or not exe.startswith("/"):
            return False
        try:
            ns = os.stat("ns/mnt", dir_fd=dir_fd)
        except OSError:
            return False
        try:
            top = os.stat("root", dir_fd=dir_fd)
            root_id = (top.st_dev, top.st_ino)
        except OSError:
            root_id = (0, 0)
        # Per mount namespace and root: a runtime execs in the new namespace before it mounts the rootfs
        # and pivots (or chroots) into it, so the namespace alone would keep the view from before.
        key = (ns.st_dev, ns.st_ino, *root_id)
        upperdir = self._upperdir.get(key)
        if upperdir is None:
            try:
                upperdir = root_overlay_upperdir(_decode(_read_at(dir_fd, "mountinfo")))
            except OSError:
                upperdir = ""
            self._upperdir.put(key, upperdir)
        if not upperdir:
            return False
        # exe is the path as we see it; when the process's root is reachable from ours (a chroot, a runtime
        # that keeps the old root) that path runs through its root: make it relative to that root.
        try:
            root = _readlink_at(dir_fd, "root")
        except OSError:
            root = "/"
        if root not in ("", "/") and exe.startswith(root + "/"):
            exe = exe[len(root) :]
        # A file present in the upper dir shadows the lower layers: it was written in the container.
        return os.path.isfile(upperdir + exe)


def _read_at_most(dir_fd: int, name: str, size: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _cached_name(cache: BoundedCache[int, str], ident: int, lookup: Callable[[int], str]) -> str:
    """A user or group name by id, through ``cache``; "" for an unset (negative) or unknown id."""
    if ident < 0:
        return ""
    name = cache.get(ident)
    if name is None:
        try:
            name = lookup(ident)
        except KeyError:
            name = ""
        cache.put(ident, name)
    return name

"""Reading OCI / Docker / Podman seccomp profiles (JSON) into frozen dataclasses.

Every mistake becomes one :class:`ProfileError` naming the file and the JSON place (``syscalls[3].action``);
things runc would merely skip (syscall names libseccomp does not know) become warnings on the profile.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import json
import os
import platform
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import seccomp

from agent._files import read_regular
from agent.errors import ProfileError

U64 = (1 << 64) - 1


class Action(StrEnum):
    ALLOW = "ALLOW"
    ERRNO = "ERRNO"
    KILL_PROCESS = "KILL_PROCESS"
    KILL_THREAD = "KILL_THREAD"
    KILL = "KILL"  # libseccomp's SCMP_ACT_KILL: the kernel kills the thread, as KILL_THREAD
    TRAP = "TRAP"
    LOG = "LOG"
    TRACE = "TRACE"
    NOTIFY = "NOTIFY"

    @property
    def scmp_name(self) -> str:
        return f"SCMP_ACT_{self.value}"


ACTIONS = {a.scmp_name: a for a in Action}
# Actions that carry a number: ERRNO's errno and TRACE's message to the tracer (runc's default: EPERM).
NUMBERED_ACTIONS = (Action.ERRNO, Action.TRACE)

OPS = (
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
)
OP_SYMBOLS = {
    "SCMP_CMP_NE": "!=",
    "SCMP_CMP_LT": "<",
    "SCMP_CMP_LE": "<=",
    "SCMP_CMP_EQ": "==",
    "SCMP_CMP_GE": ">=",
    "SCMP_CMP_GT": ">",
}

# The SCMP_ARCH_* names of the OCI runtime spec.
ARCHES = (
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K",
    "SCMP_ARCH_SH",
    "SCMP_ARCH_SHEB",
)
FILTER_FLAGS = (
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
)

# Linux capability numbers (include/uapi/linux/capability.h), in bit order.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
CAP_BITS = {name: 1 << bit for bit, name in enumerate(CAPABILITIES)}
ALL_CAPS = (1 << len(CAPABILITIES)) - 1

# platform.machine() -> (the host's SCMP_ARCH, Go's GOARCH: what Docker's includes/excludes "arches" name)
_HOST_ARCHES = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "i686": ("SCMP_ARCH_X86", "386"),
    "armv7l": ("SCMP_ARCH_ARM", "arm"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
    "loongarch64": ("SCMP_ARCH_LOONGARCH64", "loong64"),
}


def caps_mask(names: Any) -> int:
    """A capability bit mask from names (``CAP_SYS_ADMIN`` or ``sys_admin``)."""
    mask = 0
    for name in names:
        key = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
        if key not in CAP_BITS:
            raise ProfileError(f"unknown capability {name!r}")
        mask |= CAP_BITS[key]
    return mask


@dataclass(frozen=True, slots=True)
class Host:
    """What Docker/runc resolve includes/excludes against: the host's arch and kernel."""

    scmp_arch: str
    go_arch: str
    kernel: tuple[int, ...]

    @staticmethod
    @functools.cache
    def current() -> Host:
        scmp_arch, go_arch = _HOST_ARCHES.get(platform.machine(), ("SCMP_ARCH_X86_64", "amd64"))
        return Host(scmp_arch, go_arch, parse_kernel(platform.release()) or (0,))


def parse_kernel(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return tuple(int(g) for g in match.groups() if g is not None)


@dataclass(frozen=True, slots=True)
class ArgCondition:
    """One ``args[]`` entry: compare the syscall's argument ``index`` (as a u64) with ``value``."""

    index: int
    op: str
    value: int
    value_two: int = 0

    def matches(self, args: tuple[int, ...]) -> bool:
        arg = (args[self.index] if self.index < len(args) else 0) & U64
        op = self.op
        if op == "SCMP_CMP_EQ":
            return arg == self.value
        if op == "SCMP_CMP_NE":
            return arg != self.value
        if op == "SCMP_CMP_MASKED_EQ":
            return arg & self.value == self.value_two
        if op == "SCMP_CMP_LT":
            return arg < self.value
        if op == "SCMP_CMP_LE":
            return arg <= self.value
        if op == "SCMP_CMP_GE":
            return arg >= self.value
        return arg > self.value

    def describe(self) -> str:
        if self.op == "SCMP_CMP_MASKED_EQ":
            return f"arg{self.index} & {self.value:#x} == {self.value_two:#x}"
        return f"arg{self.index} {OP_SYMBOLS[self.op]} {self.value:#x}"


@dataclass(frozen=True, slots=True)
class Gate:
    """A rule's ``includes`` or ``excludes`` (Docker's): capabilities, Go arch names, a minimum kernel."""

    caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    min_kernel: tuple[int, ...] | None = None

    @property
    def empty(self) -> bool:
        return not self.caps and not self.arches and self.min_kernel is None


@dataclass(frozen=True, slots=True)
class SyscallRule:
    """One ``syscalls[]`` entry. ``errno`` is the resolved number for ERRNO/TRACE (else None)."""

    index: int
    names: tuple[str, ...]
    action: Action
    errno: int | None = None
    args: tuple[ArgCondition, ...] = ()
    includes: Gate = field(default_factory=Gate)
    excludes: Gate = field(default_factory=Gate)
    comment: str = ""

    def applies(self, caps: int, host: Host) -> bool:
        """Docker's reading of includes/excludes: an excluded cap held or an included one missing drops it."""
        inc, exc = self.includes, self.excludes
        if exc.arches and host.go_arch in exc.arches:
            return False
        if any(caps & CAP_BITS.get(c, 0) for c in exc.caps):
            return False
        if exc.min_kernel is not None and host.kernel >= exc.min_kernel:
            return False
        if inc.arches and host.go_arch not in inc.arches:
            return False
        if any(not caps & CAP_BITS.get(c, 0) for c in inc.caps):
            return False
        return not (inc.min_kernel is not None and host.kernel < inc.min_kernel)

    def matches(self, args: tuple[int, ...]) -> bool:
        return all(cond.matches(args) for cond in self.args)  # conditions of one rule are ANDed

    def describe(self, syscall: str = "") -> str:
        shown = syscall if syscall in self.names else self.names[0]
        more = f", +{len(self.names) - 1} more" if len(self.names) > 1 else ""
        text = f"syscalls[{self.index}] (names [{shown}{more}]"
        if self.args:
            text += ", args " + " && ".join(c.describe() for c in self.args)
        gates = [
            f"{kind} {', '.join(g)}"
            for kind, g in (("caps", self.includes.caps), ("without", self.excludes.caps))
            if g
        ]
        if gates:
            text += ", " + "; ".join(gates)
        return text + f") -> {action_text(self.action, self.errno)}"


def action_text(action: Action, number: int | None) -> str:
    return f"{action.scmp_name}({number})" if action in NUMBERED_ACTIONS else action.scmp_name


@dataclass(frozen=True, slots=True)
class Profile:
    """A loaded profile; ``architectures`` is resolved for the host (archMap/architectures; empty: native)."""

    path: str
    default_action: Action
    default_errno: int | None
    architectures: tuple[str, ...]
    rules: tuple[SyscallRule, ...]
    flags: tuple[str, ...] = ()
    listener_path: str = ""
    listener_metadata: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def arches_for_host(self, host: Host) -> tuple[str, ...]:
        return self.architectures or (host.scmp_arch,)


@functools.cache
def known_to_libseccomp(name: str) -> bool:
    """True when libseccomp knows the name on some architecture (-1 is its "no such name"; a syscall absent
    from x86_64 but present elsewhere gets a pseudo number below -10000)."""
    try:
        return int(seccomp.resolve_syscall(seccomp.Arch.X86_64, name)) != -1
    except ValueError:
        return False


def load_profile(path: str) -> Profile:
    """Read and validate a profile file; any mistake is one ProfileError naming the file and place."""
    try:
        raw = read_regular(path)
    except OSError as err:
        raise ProfileError(f"cannot read profile: {err.strerror}", path=path) from None
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise ProfileError("not UTF-8 text", path=path) from None
    except json.JSONDecodeError as err:
        raise ProfileError(f"invalid JSON: {err.msg}", path=path, line=err.lineno, col=err.colno) from None
    except RecursionError:
        raise ProfileError("JSON nested too deeply", path=path) from None
    return parse_profile(doc, path)


def parse_profile(doc: Any, path: str, host: Host | None = None) -> Profile:
    return _Parser(path, host or Host.current()).profile(doc)


class _Parser:
    def __init__(self, path: str, host: Host) -> None:
        self.path = path
        self.host = host
        self.warnings: list[str] = []

    def fail(self, where: str, message: str) -> ProfileError:
        return ProfileError(f"{where}: {message}" if where else message, path=self.path)

    def profile(self, doc: Any) -> Profile:
        if not isinstance(doc, dict):
            raise self.fail("", f"a profile is a JSON object, not {_kind(doc)}")
        self._unknown_keys(
            doc,
            "",
            {
                "defaultAction",
                "defaultErrnoRet",
                "defaultErrno",
                "architectures",
                "archMap",
                "syscalls",
                "flags",
                "listenerPath",
                "listenerMetadata",
                "_note",
                "comment",
            },
        )
        if "defaultAction" not in doc:
            raise self.fail("defaultAction", "missing (every profile needs one)")
        default_action = self._action(doc["defaultAction"], "defaultAction")
        default_errno = self._errno(doc, "defaultErrnoRet", "defaultErrno", "", default_action)
        listener_path = self._str(doc.get("listenerPath", ""), "listenerPath")
        listener_meta = self._str(doc.get("listenerMetadata", ""), "listenerMetadata")
        flags = self._strings(doc.get("flags"), "flags")
        for i, flag in enumerate(flags):
            if flag not in FILTER_FLAGS:
                raise self.fail(f"flags[{i}]", f"unknown flag {flag!r} (one of {', '.join(FILTER_FLAGS)})")
        if default_action is Action.NOTIFY:
            raise self.fail("defaultAction", "SCMP_ACT_NOTIFY cannot be the default action (runc refuses it)")
        rules = self._rules(doc.get("syscalls"))
        if any(r.action is Action.NOTIFY for r in rules) and not listener_path:
            raise self.fail("listenerPath", "required when a rule uses SCMP_ACT_NOTIFY")
        return Profile(
            self.path,
            default_action,
            default_errno,
            self._arches(doc),
            tuple(rules),
            tuple(flags),
            listener_path,
            listener_meta,
            tuple(self.warnings),
        )

    def _arches(self, doc: dict[str, Any]) -> tuple[str, ...]:
        arches = self._strings(doc.get("architectures"), "architectures")
        arch_map = doc.get("archMap")
        if arches and arch_map:
            raise self.fail("archMap", "use either 'architectures' or 'archMap', not both")
        for i, arch in enumerate(arches):
            self._arch_name(arch, f"architectures[{i}]")
        if arch_map is None:
            return tuple(arches)
        if not isinstance(arch_map, list):
            raise self.fail("archMap", f"must be a list, not {_kind(arch_map)}")
        resolved: list[str] = []
        for i, entry in enumerate(arch_map):
            where = f"archMap[{i}]"
            if not isinstance(entry, dict):
                raise self.fail(where, f"must be an object, not {_kind(entry)}")
            self._unknown_keys(entry, where, {"architecture", "subArchitectures"})
            arch = self._arch_name(entry.get("architecture"), f"{where}.architecture")
            subs = self._strings(entry.get("subArchitectures"), f"{where}.subArchitectures")
            for j, sub in enumerate(subs):
                self._arch_name(sub, f"{where}.subArchitectures[{j}]")
            if arch == self.host.scmp_arch:  # as moby: only the host's entry counts
                resolved = [arch, *subs]
        return tuple(resolved)

    def _arch_name(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {_kind(value)}")
        if value not in ARCHES:
            raise self.fail(where, f"unknown architecture {value!r}")
        return value

    def _rules(self, syscalls: Any) -> list[SyscallRule]:
        if syscalls is None:
            return []
        if not isinstance(syscalls, list):
            raise self.fail("syscalls", f"must be a list, not {_kind(syscalls)}")
        return [self._rule(i, entry) for i, entry in enumerate(syscalls)]

    def _rule(self, i: int, entry: Any) -> SyscallRule:
        where = f"syscalls[{i}]"
        if not isinstance(entry, dict):
            raise self.fail(where, f"must be an object, not {_kind(entry)}")
        self._unknown_keys(
            entry,
            where,
            {"names", "name", "action", "args", "errnoRet", "errno", "includes", "excludes", "comment"},
        )
        names = self._strings(entry.get("names"), f"{where}.names")
        if "name" in entry:  # Docker's older single-name form
            names.append(self._str(entry["name"], f"{where}.name"))
        if not names:
            raise self.fail(f"{where}.names", "missing or empty (a rule names at least one syscall)")
        for j, name in enumerate(names):
            if not name:
                raise self.fail(f"{where}.names[{j}]", "empty syscall name")
            if not known_to_libseccomp(name):
                self.warnings.append(
                    f"{where}.names[{j}]: unknown syscall {name!r} (libseccomp does not know "
                    "it; ignored, as runc does)"
                )
        if "action" not in entry:
            raise self.fail(f"{where}.action", "missing")
        action = self._action(entry["action"], f"{where}.action")
        if action is Action.NOTIFY and "write" in names:
            raise self.fail(f"{where}.action", "SCMP_ACT_NOTIFY cannot be used for 'write' (runc refuses it)")
        if ("errnoRet" in entry or "errno" in entry) and action not in NUMBERED_ACTIONS:
            self.warnings.append(f"{where}.errnoRet: ignored for {action.scmp_name}")
        number = self._errno(entry, "errnoRet", "errno", where, action)
        args = entry.get("args")
        if args is not None and not isinstance(args, list):
            raise self.fail(f"{where}.args", f"must be a list, not {_kind(args)}")
        conditions = tuple(self._arg(arg, f"{where}.args[{j}]") for j, arg in enumerate(args or ()))
        return SyscallRule(
            i,
            tuple(names),
            action,
            number,
            conditions,
            self._gate(entry.get("includes"), f"{where}.includes"),
            self._gate(entry.get("excludes"), f"{where}.excludes"),
            self._str(entry.get("comment", ""), f"{where}.comment"),
        )

    def _arg(self, arg: Any, where: str) -> ArgCondition:
        if not isinstance(arg, dict):
            raise self.fail(where, f"must be an object, not {_kind(arg)}")
        self._unknown_keys(arg, where, {"index", "value", "valueTwo", "op"})
        for key in ("index", "value", "op"):
            if key not in arg:
                raise self.fail(f"{where}.{key}", "missing")
        index = self._int(arg["index"], f"{where}.index", 0, 5)
        value = self._int(arg["value"], f"{where}.value", 0, U64)
        value_two = self._int(arg.get("valueTwo", 0), f"{where}.valueTwo", 0, U64)
        op = arg["op"]
        if not isinstance(op, str):
            raise self.fail(f"{where}.op", f"must be a string, not {_kind(op)}")
        if op not in OPS:
            raise self.fail(f"{where}.op", f"unknown operator {op!r} (one of {', '.join(OPS)})")
        return ArgCondition(index, op, value, value_two)

    def _gate(self, gate: Any, where: str) -> Gate:
        if gate is None:
            return Gate()
        if not isinstance(gate, dict):
            raise self.fail(where, f"must be an object, not {_kind(gate)}")
        self._unknown_keys(gate, where, {"caps", "arches", "minKernel"})
        caps = self._strings(gate.get("caps"), f"{where}.caps")
        for j, cap in enumerate(caps):
            if cap not in CAP_BITS:
                self.warnings.append(f"{where}.caps[{j}]: unknown capability {cap!r}")
        min_kernel = None
        if gate.get("minKernel") is not None:
            text = self._str(gate["minKernel"], f"{where}.minKernel")
            min_kernel = parse_kernel(text)
            if min_kernel is None:
                raise self.fail(f"{where}.minKernel", f"not a kernel version like '4.8': {text!r}")
        return Gate(tuple(caps), tuple(self._strings(gate.get("arches"), f"{where}.arches")), min_kernel)

    def _action(self, value: Any, where: str) -> Action:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {_kind(value)}")
        if value not in ACTIONS:
            raise self.fail(where, f"unknown action {value!r} (one of {', '.join(ACTIONS)})")
        return ACTIONS[value]

    def _errno(
        self, doc: dict[str, Any], num_key: str, name_key: str, where: str, action: Action
    ) -> int | None:
        """errnoRet (a number) wins over Podman's legacy errno name; runc's default is EPERM."""
        prefix = f"{where}." if where else ""
        number: int | None = None
        if doc.get(num_key) is not None:
            number = self._int(doc[num_key], prefix + num_key, 0, 0xFFFF)
        elif doc.get(name_key) is not None:
            name = self._str(doc[name_key], prefix + name_key)
            if not hasattr(errno_mod, name) or not name.startswith("E"):
                raise self.fail(prefix + name_key, f"unknown errno name {name!r}")
            number = int(getattr(errno_mod, name))
        if action not in NUMBERED_ACTIONS:
            return None
        return errno_mod.EPERM if number is None else number

    def _int(self, value: Any, where: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, not {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(where, f"{value} is out of range ({low}..{high})")
        return value

    def _str(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {_kind(value)}")
        return value

    def _strings(self, value: Any, where: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list of strings, not {_kind(value)}")
        return [self._str(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def _unknown_keys(self, doc: dict[str, Any], where: str, known: set[str]) -> None:
        for key in doc:
            if key not in known:
                place = f"{where}.{key}" if where else key
                self.warnings.append(f"{place}: unknown key (ignored)")


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)

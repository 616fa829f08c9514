"""The profile as the kernel sees it: a libseccomp filter, its classic BPF, and a BPF interpreter.

Compiling with libseccomp is how ``exec`` enforces a profile and how ``check``/``generate`` prove one valid.
The interpreter runs the compiled program on a ``seccomp_data`` so evaluation can defer to libseccomp's own
decision tree where rules of different actions overlap on one syscall.
"""

from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass

import seccomp

from agent.errors import ProfileError
from agent.seccomp._profile import ALL_CAPS, U64, Action, Host, Profile, SyscallRule, known_to_libseccomp

# Kernel return values (include/uapi/linux/seccomp.h).
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF

_ACTION_OF_RET = {
    RET_KILL_PROCESS: Action.KILL_PROCESS,
    RET_KILL_THREAD: Action.KILL_THREAD,
    RET_TRAP: Action.TRAP,
    RET_ERRNO: Action.ERRNO,
    RET_USER_NOTIF: Action.NOTIFY,
    RET_TRACE: Action.TRACE,
    RET_LOG: Action.LOG,
    RET_ALLOW: Action.ALLOW,
}

_OPS = {
    "SCMP_CMP_NE": seccomp.NE,
    "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE,
    "SCMP_CMP_EQ": seccomp.EQ,
    "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_GT": seccomp.GT,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}


def libseccomp_action(action: Action, number: int | None) -> int:
    if action is Action.ERRNO:
        return int(seccomp.ERRNO(number if number is not None else 1))
    if action is Action.TRACE:
        return int(seccomp.TRACE(number or 0))
    return int(
        {
            Action.ALLOW: seccomp.ALLOW,
            Action.KILL_PROCESS: seccomp.KILL_PROCESS,
            Action.KILL_THREAD: seccomp.KILL,
            Action.KILL: seccomp.KILL,
            Action.TRAP: seccomp.TRAP,
            Action.LOG: seccomp.LOG,
            Action.NOTIFY: seccomp.NOTIFY,
        }[action]
    )


def decode_ret(ret: int) -> tuple[Action, int | None]:
    """A filter's return value -> (action, errno or TRACE data)."""
    action = _ACTION_OF_RET.get(ret & RET_ACTION_FULL, Action.KILL_PROCESS)  # unknown: the kernel kills
    return action, (ret & RET_DATA) if action in (Action.ERRNO, Action.TRACE) else None


def arch_token(scmp_arch: str) -> int:
    """The AUDIT_ARCH_* value libseccomp uses for an SCMP_ARCH_* name (0 when this libseccomp lacks it)."""
    arch = getattr(seccomp.Arch, scmp_arch.removeprefix("SCMP_ARCH_"), None)
    return int(arch) & 0xFFFFFFFF if arch is not None else 0


@dataclass(frozen=True, slots=True)
class Compiled:
    """A profile compiled for one capability set: the filter to load and what was skipped on the way."""

    filter: seccomp.SyscallFilter
    skipped: tuple[str, ...]


def build_filter(
    profile: Profile,
    caps: int = 0,
    host: Host | None = None,
    rules: tuple[SyscallRule, ...] | None = None,
    arches: tuple[str, ...] | None = None,
) -> Compiled:
    """Compile the rules that apply under ``caps`` as runc would (rules equal to the default are skipped)."""
    host = host or Host.current()
    default = libseccomp_action(profile.default_action, profile.default_errno)
    filt = seccomp.SyscallFilter(default)
    filt.set_attr(seccomp.Attr.CTL_NNP, 1)
    skipped: list[str] = []
    wanted = arches if arches is not None else profile.arches_for_host(host)
    known = [getattr(seccomp.Arch, a.removeprefix("SCMP_ARCH_"), None) for a in wanted]
    skipped.extend(
        f"architecture {a}: unknown to this libseccomp"
        for a, k in zip(wanted, known, strict=True)
        if k is None
    )
    arch_values = [int(k) for k in known if k is not None]
    for arch in arch_values:
        if not filt.exist_arch(arch):
            filt.add_arch(arch)
    native = int(seccomp.Arch.NATIVE) or int(seccomp.system_arch())
    native_signed = native - (1 << 32) if native >= 1 << 31 else native
    if arch_values and native_signed not in arch_values:
        filt.remove_arch(native_signed)
    for rule in rules if rules is not None else profile.rules:
        if not rule.applies(caps, host):
            continue
        action = libseccomp_action(rule.action, rule.errno)
        if action == default:
            continue  # libseccomp refuses a rule equal to the default; runc skips it
        conditions = [seccomp.Arg(c.index, _OPS[c.op], c.value, c.value_two) for c in rule.args]
        for name in rule.names:
            if not known_to_libseccomp(name):
                continue  # the profile already warned; runc skips it too
            try:
                filt.add_rule(action, name, *conditions)
            except (RuntimeError, ValueError, OverflowError) as err:
                if "-17" in str(err):  # EEXIST: an earlier, wider rule already decides this syscall
                    skipped.append(f"syscalls[{rule.index}]: {name}: shadowed by an earlier rule")
                    continue
                raise ProfileError(
                    f"syscalls[{rule.index}]: libseccomp refuses {name}: {err}", path=profile.path
                ) from None
    return Compiled(filt, tuple(skipped))


def check_compiles(profile: Profile, host: Host | None = None) -> list[str]:
    """Compile with no capabilities and with all of them (the two ends runc may meet); the skip notes."""
    notes: list[str] = []
    for caps in (0, ALL_CAPS):
        compiled = build_filter(profile, caps, host)
        export_bpf(compiled.filter)
        notes.extend(n for n in compiled.skipped if n not in notes)
    return notes


def export_bpf(filt: seccomp.SyscallFilter) -> tuple[tuple[int, int, int, int], ...]:
    """The classic BPF program as (code, jt, jf, k) instructions."""
    with tempfile.TemporaryFile() as fh:
        filt.export_bpf(fh)
        fh.seek(0)
        raw = fh.read()
    return tuple(struct.iter_unpack("<HBBI", raw))


def run_bpf(program: tuple[tuple[int, int, int, int], ...], nr: int, arch: int, args: tuple[int, ...]) -> int:
    """Run a seccomp classic-BPF program on one seccomp_data (nr, arch, ip=0, args) -> its return value."""
    padded = (tuple(a & U64 for a in args) + (0,) * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch & 0xFFFFFFFF, 0, *padded)
    acc = index = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode = code & 0xE0
            acc = struct.unpack_from("<I", data, k)[0] if mode == 0x20 else mem[k] if mode == 0x60 else k
        elif cls == 0x01:  # LDX
            index = mem[k] if code & 0xE0 == 0x60 else k
        elif cls == 0x02:  # ST
            mem[k] = acc
        elif cls == 0x03:  # STX
            mem[k] = index
        elif cls == 0x04:  # ALU
            acc = _alu(code & 0xF0, acc, index if code & 0x08 else k)
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            operand = index if code & 0x08 else k
            taken = (
                acc == operand
                if op == 0x10
                else acc > operand
                if op == 0x20
                else acc >= operand
                if op == 0x30
                else bool(acc & operand)
            )
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return k if code & 0x18 == 0 else acc
        else:  # MISC: TAX / TXA
            if code & 0x80:
                acc = index
            else:
                index = acc


def _alu(op: int, acc: int, operand: int) -> int:
    results = {
        0x00: acc + operand,
        0x10: acc - operand,
        0x20: acc * operand,
        0x40: acc | operand,
        0x50: acc & operand,
        0x60: acc << operand,
        0x70: acc >> operand,
        0x80: -acc,
        0xA0: acc ^ operand,
    }
    if op == 0x30:
        return acc // operand if operand else 0
    if op == 0x90:
        return acc % operand if operand else 0
    return results[op] & 0xFFFFFFFF

"""CLI: ``sysgram seccomp check|eval|generate|status`` and ``sysgram exec --seccomp PROFILE -- CMD``."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from agent.errors import ConfigError


def register(subparsers: Any) -> None:
    sec = subparsers.add_parser("seccomp", help="seccomp profiles: check, evaluate, generate from recordings")
    sub = sec.add_subparsers(dest="seccomp_command", metavar="SUBCOMMAND")
    sec.set_defaults(handler=lambda _args: _usage(sec))

    check = sub.add_parser(
        "check", help="validate profiles (and compile them with libseccomp); print a summary"
    )
    check.add_argument("profiles", nargs="+", metavar="PROFILE")
    check.set_defaults(handler=_check)

    ev = sub.add_parser("eval", help="what a profile does with one syscall")
    ev.add_argument("profile", metavar="PROFILE")
    ev.add_argument("syscall", metavar="SYSCALL")
    ev.add_argument("args", nargs="*", metavar="ARG", help="up to 6 integers (0x.. ok) or AF_*/SOCK_* names")
    ev.add_argument(
        "--caps", default="", help="the process's capabilities, comma separated (CAP_SYS_ADMIN,...)"
    )
    ev.add_argument(
        "--arch", default=None, help="the syscall's ABI, e.g. SCMP_ARCH_X86 (default: the host's)"
    )
    ev.set_defaults(handler=_eval)

    gen = sub.add_parser(
        "generate", help="a least-privilege profile for one program, learned from recordings"
    )
    gen.add_argument("--from", dest="recordings", nargs="+", required=True, metavar="REC")
    gen.add_argument("--exe", required=True, metavar="PATH", help="the program's resolved executable path")
    gen.add_argument("-o", "--output", required=True, help="the profile to write (JSON)")
    gen.add_argument(
        "--default-action",
        default="errno",
        choices=("errno", "kill", "log"),
        help="for syscalls not observed (default: errno, i.e. EPERM)",
    )
    gen.add_argument("--no-baseline", action="store_true", help="do not add the syscalls every exec needs")
    gen.set_defaults(handler=_generate)

    st = sub.add_parser("status", help="a process's own seccomp mode (/proc/PID/status)")
    st.add_argument("pid", nargs="?", default="self")
    st.set_defaults(handler=_status)

    ex = subparsers.add_parser("exec", help="run a program under a seccomp profile enforced by the kernel")
    ex.add_argument("--seccomp", required=True, metavar="PROFILE")
    ex.add_argument(
        "--caps", default=None, help="capabilities for includes/excludes (default: this process's)"
    )
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    ex.set_defaults(handler=_exec)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> int:
    from agent.seccomp import check_compiles, load_profile

    for path in args.profiles:
        profile = load_profile(path)
        notes = check_compiles(profile)
        names = sum(len(r.names) for r in profile.rules)
        conditional = sum(1 for r in profile.rules if r.args)
        gated = sum(1 for r in profile.rules if not (r.includes.empty and r.excludes.empty))
        default = profile.default_action.scmp_name + (
            f"({profile.default_errno})" if profile.default_errno is not None else ""
        )
        print(
            f"{path}: ok: default {default}, {len(profile.rules)} rules naming {names} syscalls "
            f"({conditional} with argument conditions, {gated} gated on caps/arch/kernel), "
            f"architectures {', '.join(profile.architectures) or 'native'}"
        )
        for warning in (*profile.warnings, *notes):
            print(f"{path}: warning: {warning}")
    return 0


def _caps(text: str | None) -> int | None:
    from agent.errors import ProfileError
    from agent.seccomp import caps_mask

    if text is None:
        return None
    try:
        return caps_mask(c.strip() for c in text.split(",") if c.strip())
    except ProfileError as err:
        raise ConfigError(f"--caps: {err.message}") from None


def _int_arg(text: str, position: int) -> int:
    if text.startswith(("AF_", "SOCK_", "PF_")) and isinstance(getattr(socket, text, None), int):
        return int(getattr(socket, text))
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"ARG {position}: {text!r} is not an integer") from None
    if not -(2**63) <= value < 2**64:  # a register: beyond 64 bits it would wrap and match another value
        raise ConfigError(f"ARG {position}: {text} does not fit in a 64-bit register")
    return value


def _arch(text: str | None) -> str | None:
    """``SCMP_ARCH_X86`` (or ``x86``, any case) -> the OCI name; None stays None (the host's)."""
    from agent.seccomp import ARCHES

    if text is None:
        return None
    name = text.upper()
    name = name if name.startswith("SCMP_ARCH_") else f"SCMP_ARCH_{name}"
    if name not in ARCHES:
        raise ConfigError(f"--arch: unknown architecture {text!r} (one of {', '.join(ARCHES)})")
    return name


def _eval(args: argparse.Namespace) -> int:
    from agent.capture.names import known_names
    from agent.seccomp import ProfileEvaluator, load_profile

    arch = _arch(args.arch)
    if len(args.args) > 6:
        raise ConfigError("a syscall has at most 6 arguments")
    if args.syscall not in known_names(False) | known_names(True):
        raise ConfigError(f"SYSCALL: unknown syscall {args.syscall!r}")
    values = tuple(_int_arg(a, i) for i, a in enumerate(args.args))
    profile = load_profile(args.profile)
    decision = ProfileEvaluator(profile).decide(args.syscall, values, _caps(args.caps) or 0, arch)
    print(decision.explanation)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from agent.seccomp import generate_profile

    for rec in args.recordings:  # the profile must not replace a recording it is made from
        if os.path.exists(args.output) and os.path.exists(rec) and os.path.samefile(args.output, rec):
            raise ConfigError("the output is one of the --from recordings; choose another path", path=args.output)
    generated = generate_profile(
        args.recordings, args.exe, args.default_action, baseline=not args.no_baseline
    )
    tmp = f"{args.output}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(generated.to_json())
        os.replace(tmp, args.output)
    except OSError as err:
        raise ConfigError(f"cannot write profile: {err.strerror}", path=args.output) from None
    allowed = generated.document["syscalls"][0]["names"]  # type: ignore[index]
    print(
        f"{args.output}: {len(allowed)} syscalls allowed ({len(generated.observed)} observed in "
        f"{generated.traces} thread traces); compiled with libseccomp"
    )
    if generated.unnamed:
        print(
            f"{args.output}: warning: left out numbers libseccomp cannot name: {', '.join(generated.unnamed)}"
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    from agent.seccomp import seccomp_status

    status = seccomp_status(args.pid)
    if status is None:
        raise ConfigError(f"no such process or no seccomp fields in its status: {args.pid}")
    print(
        json.dumps(
            {"pid": status.pid, "mode": status.mode, "mode_name": status.mode_name, "filters": status.filters}
        )
    )
    return 0


def _exec(args: argparse.Namespace) -> int:
    from agent.seccomp import load_profile, run_under_profile

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run_under_profile(load_profile(args.seccomp), command, _caps(args.caps))

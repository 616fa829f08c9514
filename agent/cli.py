"""The ``sysgram`` command line: the only place in Sysgram that exits.

Each room registers its own subcommands (``register(subparsers)`` in its ``commands`` module); a handler
returns an exit code or raises :class:`agent.errors.SysgramError`, which becomes one line on stderr and
that error's exit code (2 for bad input), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import SysgramError

# Modules that add subcommands. A room that has not landed yet is simply absent.
COMMAND_MODULES = (
    "agent.capture.commands",
    "agent.pipeline_commands",
    "agent.model.commands",
    "agent.falco.commands",
    "agent.seccomp.commands",
    "agent.respond.commands",
    "agent.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sysgram", description="Syscall anomaly-detection agent: eBPF capture, ONNX model, Falco rules."
    )
    parser.add_argument("--version", action="version", version=f"sysgram {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = handler(args)
    except SysgramError as err:
        print(f"sysgram: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

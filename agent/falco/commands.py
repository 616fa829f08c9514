"""`sysgram rules check FILE... [--json]`: load Falco-format rule files together and report every problem."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.falco import check_files
from agent.falco._diag import Diagnostic


def register(subparsers: Any) -> None:
    rules = subparsers.add_parser("rules", help="Falco-format rules: check files")
    sub = rules.add_subparsers(dest="rules_command", metavar="ACTION")
    check = sub.add_parser("check", help="load rule files together (in order) and report errors and warnings")
    check.add_argument("files", nargs="+", metavar="FILE", help="rule files, loaded in the order given")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=_check)
    rules.set_defaults(handler=lambda _args: (rules.print_help(sys.stderr), 2)[1])


def _check(args: argparse.Namespace) -> int:
    report = check_files(args.files)
    failed = any(f["errors"] for f in report["files"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if failed else 0
    for f in report["files"]:
        for d in (*f["errors"], *f["warnings"]):
            print(_diag_from_json(d).to_text())
    for f in report["files"]:
        print(f"{f['path']}: {f['rules']} rules, {f['macros']} macros, {f['lists']} lists, "
              f"{len(f['errors'])} error(s), {len(f['warnings'])} warning(s)")
    return 1 if failed else 0


def _diag_from_json(d: dict[str, Any]) -> Diagnostic:
    item = d.get("item") or {}
    return Diagnostic(d["severity"], d["file"], d["line"], d["col"], d["message"], item.get("kind", ""),
                      item.get("name", ""), d.get("code", ""), d.get("condition", ""), d.get("offset", -1))

"""Broken rule files: every problem is a diagnostic with file:line:col, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.errors import RulesError
from agent.falco import check_files, load_rules

RULE = """- rule: r
  desc: d
  condition: {cond}
  output: o %proc.name
  priority: {prio}
"""


def load(tmp_path: Path, text: str) -> list[Any]:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    _rs, diags = load_rules([str(path)])
    return [d for d in diags if d.is_error]


@pytest.mark.parametrize(("cond", "line", "col", "needle"), [
    ("evt.type = open and (proc.name = a", 3, 34, "never closed"),
    ("evt.type = open and proc.name = a)", 3, 47, "unbalanced"),
    ("evt.type = open and no_such_macro", 3, 34, "undefined macro"),
    ("evt.type = open and proc.nmae = a", 3, 34, "unknown field 'proc.nmae'"),
    ("evt.type = open and proc.name ~= a", 3, 44, "unknown operator"),
    ("evt.type = open and proc.pid = abc", 3, 45, "invalid int value"),
    ("evt.type = open and proc.name < a", 3, 34, "not supported"),
    ("evt.type = open and fd.name in (unknown_list", 3, 45, "never closed"),
])
def test_condition_errors_point_at_the_fault(tmp_path: Path, cond: str, line: int, col: int, needle: str) -> None:
    errors = load(tmp_path, RULE.format(cond=cond, prio="WARNING"))
    assert len(errors) == 1, [e.to_text() for e in errors]
    err = errors[0]
    assert (err.line, err.col) == (line, col), err.to_text()
    assert needle in err.message
    text = err.to_text().splitlines()
    assert text[0].startswith(f"{tmp_path / 'rules.yaml'}:{line}:{col}: error: rule 'r': ")
    assert text[1].strip() == cond and text[2].index("^") == text[1].index(cond) + (col - 14)


def test_multiline_condition_maps_to_the_right_line(tmp_path: Path) -> None:
    text = "- rule: r\n  desc: d\n  condition: >\n    evt.type = open\n    and proc.nope = 1\n  output: o\n  priority: INFO\n"
    [err] = load(tmp_path, text)
    assert (err.line, err.col) == (5, 9)


def test_bad_priority_and_yaml_error(tmp_path: Path) -> None:
    [err] = load(tmp_path, RULE.format(cond="evt.type = open", prio="LOUD"))
    assert (err.line, err.col) == (5, 13) and "invalid priority" in err.message
    [err] = load(tmp_path, "- rule: r\n  desc: [unclosed\n")
    assert err.code == "yaml" and err.line >= 2


def test_unknown_list_in_override_and_missing_keys(tmp_path: Path) -> None:
    text = "- list: nope\n  items: [a]\n  override:\n    items: append\n- rule: half\n  desc: d\n"
    errors = load(tmp_path, text)
    messages = " | ".join(e.message for e in errors)
    assert "list 'nope' does not exist" in messages
    assert "missing 'condition'" in messages
    assert [(e.line, e.col) for e in errors] == [(1, 3), (5, 3)]


def test_unknown_field_in_unused_macro_and_in_output(tmp_path: Path) -> None:
    text = "- macro: m\n  condition: proc.nope = 1\n" + RULE.format(cond="evt.type = open", prio="INFO").replace(
        "%proc.name", "%proc.nope")
    errors = load(tmp_path, text)
    assert {(e.item_kind, e.code) for e in errors} == {("macro", "unknown-field"), ("rule", "bad-output")}


def test_macro_cycle_is_an_error(tmp_path: Path) -> None:
    text = "- macro: a\n  condition: b\n- macro: b\n  condition: a\n" + RULE.format(cond="a", prio="INFO")
    [err] = load(tmp_path, text)
    assert "cycle" in err.message


def test_unreadable_file_raises_rules_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as info:
        load_rules([str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in str(info.value)


def test_check_report_shape(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(RULE.format(cond="evt.type = open", prio="INFO"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULE.format(cond="evt.type = open and (", prio="INFO").replace("rule: r", "rule: r2"))
    report = check_files([str(good), str(bad)])
    assert set(report) == {"files", "rules"}
    assert [set(f) for f in report["files"]] == [{"path", "rules", "macros", "lists", "errors", "warnings"}] * 2
    assert report["files"][0]["errors"] == [] and len(report["files"][1]["errors"]) == 1
    assert {r["name"]: r["status"] for r in report["rules"]} == {"r": "ok", "r2": "error"}
    assert all(set(r) == {"name", "file", "status", "reason"} for r in report["rules"])
    json.dumps(report)


@pytest.mark.parametrize("shape", ["not", "paren", "macros"])
def test_a_condition_nested_too_deeply_is_an_error_on_its_rule_not_a_traceback(tmp_path: Path, shape: str) -> None:
    # 200 nested `not`s were a SyntaxError from the generated code; 250 parentheses and a chain of 1,000 macros
    # a RecursionError
    depth = {"not": 200, "paren": 250, "macros": 1000}[shape]
    parts = []
    if shape == "not":
        cond = "not " * depth + "evt.type = openat"
    elif shape == "paren":
        cond = "(" * depth + "evt.type = openat" + ")" * depth
    else:
        parts.append("- macro: m0\n  condition: evt.type = openat\n")
        parts += [f"- macro: m{i}\n  condition: m{i - 1}\n" for i in range(1, depth)]
        cond = f"m{depth - 1}"
    parts.append(f"- rule: deep\n  desc: d\n  condition: {cond}\n  output: o\n  priority: INFO\n")
    parts.append("- rule: fine\n  desc: d\n  condition: evt.type = openat\n  output: o\n  priority: INFO\n")
    path = tmp_path / "deep.yaml"
    path.write_text("".join(parts))
    rs, diags = load_rules([str(path)])
    errors = [d for d in diags if d.is_error]
    assert [(d.item_name, d.code) for d in errors] == [("deep", "too-deep")]
    assert errors[0].file == str(path) and "nested too deeply" in errors[0].message
    assert [r.name for r in rs.rules if r.name == "fine"] == ["fine"]

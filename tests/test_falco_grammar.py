"""Golden tests of the condition grammar and operator semantics, evaluated on hand-built events."""

from __future__ import annotations

import base64

import pytest

from agent.falco import load_rules_text
from tests._falco_helpers import O_RDONLY, World, proc, ruleset_from

PROCS = [
    proc(1, 0, "systemd", "/usr/lib/systemd/systemd", uid=0, user="root"),
    proc(50, 1, "sshd", "/usr/sbin/sshd", "-D", uid=0, user="root"),
    proc(60, 50, "bash", "/usr/bin/bash", uid=1000),
    proc(70, 60, "Python3", "/usr/bin/python3.11", "-c", "import os; print('hello world')", cwd="/srv/app"),
]


def matches(condition: str, *, pid: int = 70, syscall: str = "openat", res: int = 3, extra: str = "",
            **args: object) -> bool:
    """Whether a one-rule file with ``condition`` fires on one event."""
    args = args or {"dirfd": -100, "name": "/etc/hosts", "flags": O_RDONLY, "mode": 0}
    text = extra + f"""
- rule: probe
  desc: probe
  condition: {condition!r}
  output: probe %proc.name
  priority: INFO
"""
    rs = ruleset_from(text)
    assert not rs.errors, [d.to_text() for d in rs.errors]
    return World(rs, PROCS).names(pid, syscall, res, **args) == ["probe"]


@pytest.mark.parametrize(("condition", "expected"), [
    # precedence: not > and > or
    ("proc.name = nope or proc.name = Python3 and fd.name = /etc/hosts", True),
    ("proc.name = Python3 or proc.name = nope and fd.name = /nope", True),
    ("(proc.name = Python3 or proc.name = nope) and fd.name = /nope", False),
    ("not proc.name = nope and fd.name = /etc/hosts", True),
    ("not (proc.name = Python3 and fd.name = /nope)", True),
    ("not not proc.name = Python3", True),
    ("not proc.name = Python3 or fd.name = /etc/hosts", True),
    ("not proc.name = Python3 and fd.name = /etc/hosts", False),
])
def test_precedence(condition: str, expected: bool) -> None:
    assert matches(condition) is expected


@pytest.mark.parametrize(("condition", "expected"), [
    ("proc.name = Python3", True), ("proc.name == Python3", True), ("proc.name != Python3", False),
    ("proc.pid < 71", True), ("proc.pid <= 70", True), ("proc.pid > 70", False), ("proc.pid >= 70", True),
    ("proc.cmdline contains \"import os\"", True), ("proc.name icontains python", True),
    ("proc.name contains python", False), ("fd.name startswith /etc/", True), ("fd.name endswith hosts", True),
    ("fd.name glob '/etc/h*s'", True), ("fd.name glob '/etc/?osts'", True), ("proc.name iglob 'python*'", True),
    ("proc.name glob 'python*'", False), ("fd.name regex '/etc/[a-z]+'", True), ("fd.name regex 'etc'", False),
    ("fd.name bcontains 686f737473", True), ("fd.name bstartswith 2f657463", True),
    ("fd.name bstartswith 686f", False), ("proc.name exists", True), ("proc.env exists", False),
    ("proc.name in (bash, Python3)", True), ("proc.name in (bash, sh)", False),
    ("proc.name intersects (Python3)", True), ("fd.name pmatch (/etc, /usr)", True),
    ("fd.name pmatch (/et, /usr)", False), ("fd.name pmatch (/e*)", True),
    ("evt.type in (open, openat)", True), ("evt.type = execve", False),
])
def test_operators(condition: str, expected: bool) -> None:
    assert matches(condition) is expected


@pytest.mark.parametrize(("condition", "expected"), [
    ("tolower(proc.name) = python3", True), ("toupper(proc.name) = PYTHON3", True),
    ("basename(fd.name) = hosts", True), ("len(proc.name) = 7", True), ("len(proc.name) > 7", False),
    ("b64(proc.args) contains secret", False), ("proc.pname = val(proc.aname[1])", True),
    ("proc.name = val(proc.pname)", False), ("tolower(proc.name) in (python3)", True),
])
def test_transformers_and_val(condition: str, expected: bool) -> None:
    assert matches(condition) is expected


def test_b64_transformer_decodes() -> None:
    secret = base64.b64encode(b"top secret").decode()
    args = {"filename": "/usr/bin/echo", "argv": ["echo", secret]}
    procs = [*PROCS, proc(80, 70, "echo", "/usr/bin/echo", secret)]
    rs = ruleset_from("""
- rule: b64
  desc: d
  condition: evt.type = execve and b64(proc.args) contains secret
  output: o
  priority: INFO
""")
    assert World(rs, procs).names(80, "execve", 0, **args) == ["b64"]


@pytest.mark.parametrize(("condition", "expected"), [
    ("proc.aname = sshd", True), ("proc.aname = Python3", False), ("proc.aname[0] = Python3", True),
    ("proc.aname[1] = bash", True), ("proc.aname[2] = sshd", True), ("proc.aname[3] = systemd", True),
    ("proc.aname[4] exists", False), ("proc.apid[2] = 50", True), ("proc.aexepath[1] = /usr/bin/bash", True),
    ("proc.aname in (sshd, nginx)", True),
])
def test_ancestor_fields(condition: str, expected: bool) -> None:
    assert matches(condition) is expected


def test_missing_value_makes_every_comparison_false() -> None:
    # proc.aname[9] does not exist: = and != are both false, and `not` of either is true.
    assert not matches("proc.aname[9] = x")
    assert not matches("proc.aname[9] != x")
    assert matches("not proc.aname[9] != x")
    assert not matches("container.image.repository startswith x")  # host: no image


def test_list_expansion_nested_and_quoted_items() -> None:
    extra = """
- list: inner
  items: [bash, '"Python3"']
- list: outer
  items: [inner, zsh]
"""
    assert matches("proc.name in (outer)", extra=extra)
    assert matches("proc.name in (nope, outer, sh)", extra=extra)
    assert matches("proc.name in outer", extra=extra)
    assert not matches("proc.name in (zsh, inner_not_a_list)", extra=extra)


def test_macro_visibility_before_definition_and_nesting() -> None:
    text = """
- rule: uses later macro
  desc: d
  condition: evt.type = openat and later_macro
  output: o
  priority: INFO
- macro: later_macro
  condition: inner_macro and fd.name startswith /etc
- macro: inner_macro
  condition: proc.name = Python3
"""
    rs = load_rules_text([("a.yaml", text)])
    assert not rs.errors
    assert World(rs, PROCS).names(70, "openat", 3, dirfd=-100, name="/etc/x", flags=0) == ["uses later macro"]


def test_macro_replaced_by_later_definition_and_appended() -> None:
    base = """
- macro: m
  condition: proc.name = nope
- rule: r
  desc: d
  condition: evt.type = openat and m
  output: o
  priority: INFO
"""
    later = """
- macro: m
  condition: proc.name = Python3
- macro: m
  condition: or proc.name = other
  append: true
"""
    rs = load_rules_text([("a.yaml", base), ("b.yaml", later)])
    assert not rs.errors
    w = World(rs, PROCS)
    assert w.names(70, "openat", 3, dirfd=-100, name="/x", flags=0) == ["r"]
    assert w.names(60, "openat", 3, dirfd=-100, name="/x", flags=0) == []

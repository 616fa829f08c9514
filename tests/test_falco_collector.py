"""Exceptions, overrides, appends, enabled, priorities, sources, rule_matching."""

from __future__ import annotations

from agent.falco import load_rules_text
from tests._falco_helpers import World, proc

PROCS = [proc(1, 0, "systemd", "/usr/lib/systemd/systemd"), proc(10, 1, "cat", "/usr/bin/cat"),
         proc(11, 1, "less", "/usr/bin/less"), proc(12, 1, "vim", "/usr/bin/vim")]

BASE = """
- list: watched
  items: [/etc/passwd]
- rule: Watched read
  desc: d
  condition: evt.type = openat and fd.name in (watched)
  output: read %fd.name by %proc.name
  priority: warning
  tags: [a]
  exceptions:
    - name: by_proc
      fields: [proc.name, fd.name]
      comps: [=, startswith]
      values:
        - [less, /etc/pass]
    - name: single
      fields: proc.name
      values: [vim]
"""


def fire(rs: object, pid: int, path: str = "/etc/passwd") -> list[str]:
    return World(rs, PROCS).names(pid, "openat", 3, dirfd=-100, name=path, flags=0)  # type: ignore[arg-type]


def test_exceptions_suppress_matching_tuples() -> None:
    rs = load_rules_text([("a.yaml", BASE)])
    assert not rs.errors
    assert fire(rs, 10) == ["Watched read"]
    assert fire(rs, 11) == []  # (less, /etc/pass*) excepted
    assert fire(rs, 12) == []  # single-field exception with implicit `in`


def test_exception_values_appended_and_list_override() -> None:
    more = """
- rule: Watched read
  exceptions:
    - name: single
      values: [cat]
  override:
    exceptions: append
- list: watched
  items: [/etc/group]
  override:
    items: append
"""
    rs = load_rules_text([("a.yaml", BASE), ("b.yaml", more)])
    assert not rs.errors, [d.to_text() for d in rs.errors]
    assert fire(rs, 10) == []
    assert fire(rs, 10, "/etc/group") == []
    rs2 = load_rules_text([("a.yaml", BASE), ("b.yaml", more.replace("items: append", "items: replace"))])
    assert World(rs2, PROCS).names(10, "openat", 3, dirfd=-100, name="/etc/passwd", flags=0) == []


def test_condition_append_override_and_deprecated_append() -> None:
    override = """
- rule: Watched read
  condition: and proc.name = cat
  override:
    condition: append
"""
    rs = load_rules_text([("a.yaml", BASE), ("b.yaml", override)])
    assert not rs.errors
    assert fire(rs, 10) == ["Watched read"]
    old = "- rule: Watched read\n  condition: and proc.name = nobody\n  append: true\n"
    rs = load_rules_text([("a.yaml", BASE), ("b.yaml", old)])
    assert not rs.errors
    assert fire(rs, 10) == []


def test_replace_priority_output_and_disable() -> None:
    override = """
- rule: Watched read
  priority: CRITICAL
  output: replaced %proc.name
  tags: [b]
  override:
    priority: replace
    output: replace
    tags: append
"""
    rs = load_rules_text([("a.yaml", BASE), ("b.yaml", override)])
    m = World(rs, PROCS).ev(10, "openat", 3, dirfd=-100, name="/etc/passwd", flags=0)
    assert [x.priority for x in m] == ["Critical"]
    assert m[0].output.endswith("Critical replaced cat")
    assert m[0].tags == ("a", "b")
    disable = "- rule: Watched read\n  enabled: false\n  override:\n    enabled: replace\n"
    rs = load_rules_text([("a.yaml", BASE), ("b.yaml", disable)])
    assert rs.rules == () and fire(rs, 10) == []
    shorthand = "- rule: Watched read\n  enabled: false\n"
    assert load_rules_text([("a.yaml", BASE), ("b.yaml", shorthand)]).rules == ()


def test_priorities_case_insensitive_and_info_alias() -> None:
    for given, want in (("info", "Informational"), ("EMERGENCY", "Emergency"), ("Debug", "Debug")):
        rs = load_rules_text([("a.yaml", BASE.replace("priority: warning", f"priority: {given}"))])
        assert rs.rules[0].priority == want


def test_other_sources_are_skipped_with_a_warning() -> None:
    text = BASE + """
- rule: audit rule
  desc: d
  condition: ka.verb = create
  output: o
  priority: INFO
  source: k8s_audit
- required_plugin_versions:
    - name: k8saudit
      version: 0.7.0
    - name: container
      version: 0.4.0
"""
    rs = load_rules_text([("a.yaml", text)])
    assert not rs.errors
    assert [r.name for r in rs.rules] == ["Watched read"]
    messages = [d.message for d in rs.warnings]
    assert any("k8s_audit" in m for m in messages)
    assert any("k8saudit" in m for m in messages) and not any("'container'" in m for m in messages)


def test_rule_matching_first_stops_at_first_rule() -> None:
    text = BASE + """
- rule: Second
  desc: d
  condition: evt.type = openat
  output: o
  priority: INFO
"""
    all_rs = load_rules_text([("a.yaml", text)])
    first_rs = load_rules_text([("a.yaml", text)], rule_matching="first")
    assert fire(all_rs, 10) == ["Watched read", "Second"]
    assert fire(first_rs, 10) == ["Watched read"]


def test_output_fields_and_na() -> None:
    text = BASE.replace("read %fd.name by %proc.name", "read %fd.name by %(proc.name) gp=%proc.aname[3]")
    m = World(load_rules_text([("a.yaml", text)]), PROCS).ev(10, "openat", 3, dirfd=-100, name="/etc/passwd",
                                                            flags=0)
    assert m[0].output.endswith("read /etc/passwd by cat gp=<NA>")
    assert m[0].output_fields == {"fd.name": "/etc/passwd", "proc.name": "cat", "proc.aname[3]": None}
    assert m[0].source == "syscall" and m[0].pid == 10


def test_output_escapes_control_characters_a_process_chose_and_keeps_the_exact_value() -> None:
    forged = "x\n2026-11-27T07:09:00.000Z Informational FAKE: all clear\x1b[2J"
    procs = [*PROCS, proc(20, 1, "cat", "/usr/bin/cat", forged)]
    text = BASE.replace("read %fd.name by %proc.name", "read %fd.name by %proc.cmdline")
    m = World(load_rules_text([("a.yaml", text)]), procs).ev(20, "openat", 3, dirfd=-100, name="/etc/passwd",
                                                            flags=0)
    assert "\n" not in m[0].output and "\x1b" not in m[0].output  # one line, no terminal escape
    assert m[0].output.endswith("cat x\\n2026-11-27T07:09:00.000Z Informational FAKE: all clear\\x1b[2J")
    assert m[0].output_fields["proc.cmdline"] == f"cat {forged}"  # the structured field stays exact


def test_folded_output_loses_its_trailing_newline() -> None:
    text = BASE.replace("  output: read %fd.name by %proc.name\n", "  output: >\n    read %fd.name\n    by %proc.name\n")
    m = World(load_rules_text([("a.yaml", text)]), PROCS).ev(10, "openat", 3, dirfd=-100, name="/etc/passwd",
                                                            flags=0)
    assert m[0].output.endswith(": Warning read /etc/passwd by cat")  # no trailing newline


def test_interesting_syscalls_from_index() -> None:
    rs = load_rules_text([("a.yaml", BASE)])
    assert rs.interesting_syscalls() == frozenset({"openat"})
    everything = BASE + "\n- rule: all\n  desc: d\n  condition: proc.name = cat\n  output: o\n  priority: INFO\n"
    rs = load_rules_text([("a.yaml", everything)])
    assert "execve" in rs.interesting_syscalls() and "openat" in rs.interesting_syscalls()
    assert any(d.code == "no-evttype" for d in rs.warnings)
    negated = BASE + "\n- rule: n\n  desc: d\n  condition: not evt.type in (openat, read)\n  output: o\n  priority: INFO\n"
    rs = load_rules_text([("a.yaml", negated)])
    n = next(r for r in rs.rules if r.name == "n")
    assert n.evttypes is not None and "openat" not in n.evttypes and "execve" in n.evttypes


def test_appended_exception_values_of_the_wrong_shape_are_errors_not_crashes() -> None:
    base = ("- rule: r\n  desc: d\n  output: o\n  priority: INFO\n  condition: evt.type=open\n  exceptions:\n"
            "   - name: e\n     fields: [proc.name, fd.name]\n     values: [[a, b]]\n")
    for bad, shown in (("5", "got 5"), ("[c]", "got ['c']"), ("{a: 1}", "got {'a': 1}"), ("[x, y, z]", "got ['x'")):
        text = base + f"- rule: r\n  exceptions:\n   - name: e\n     values: [{bad}]\n  append: true\n"
        rs = load_rules_text([("a.yaml", text)])
        assert len(rs.errors) == 1, bad
        assert "exception 'e': each value must be a list of 2 (one per field)" in rs.errors[0].message
        assert shown in rs.errors[0].message and rs.errors[0].file == "a.yaml" and rs.errors[0].line


def test_required_plugin_alternatives_must_be_a_list() -> None:
    rs = load_rules_text([("a.yaml", "- required_plugin_versions:\n    - name: x\n      version: 1.0.0\n"
                                     "      alternatives: 5\n")])
    assert len(rs.errors) == 1 and rs.errors[0].message.endswith("plugin 'x': alternatives must be a list")


def test_rule_files_that_grow_exponentially_are_bounded() -> None:
    """A list naming another ten times (each naming another ten times...) keeps each item once; macros
    inlined into macros (m1 = m0 and m0, m2 = m1 and m1, ...) are refused past a size, at once."""
    import time

    lists = "- list: l0\n  items: [x, y]\n" + "".join(
        f"- list: l{i}\n  items: [{', '.join([f'l{i - 1}'] * 10)}]\n" for i in range(1, 9))
    macros = "- macro: m0\n  condition: evt.type = open\n" + "".join(
        f"- macro: m{i}\n  condition: m{i - 1} and m{i - 1}\n" for i in range(1, 40))
    rules = ("- rule: Listed\n  desc: d\n  condition: evt.type = open and proc.name in (l8)\n  output: o\n"
             "  priority: INFO\n- rule: Bomb\n  desc: d\n  condition: m39\n  output: o\n  priority: INFO\n")
    started = time.monotonic()
    rs = load_rules_text([("a.yaml", lists + macros + rules)])
    assert time.monotonic() - started < 10
    assert [r.name for r in rs.rules] == ["Listed"]
    assert [(e.item_name, e.code) for e in rs.errors] == [("Bomb", "too-large")]
    w = World(rs, [proc(1, 0, "y", "/usr/bin/y")])
    assert w.names(1, "open", 3, name="/tmp/f", flags=0, mode=0) == ["Listed"]

"""Loading: read every file, collect items, then compile each rule (macros and lists resolved at the end,
so names may be used before their definition, as in Falco)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent._files import read_regular
from agent.capture.names import known_names
from agent.errors import RulesError
from agent.falco._ast import (
    BoolOp,
    Compare,
    FieldExpr,
    ListLit,
    Literal,
    Node,
    Not,
    ParseError,
    Source,
    _Parser,
    parse_condition,
)
from agent.falco._collector import Collector, ExceptionDef, RuleDef, TextChunks
from agent.falco._compiler import (
    CompileError,
    Expander,
    MacroInfo,
    compile_condition,
    resolve_list_items,
)
from agent.falco._diag import Diagnostic, Place
from agent.falco._fields import FieldError, bind_field
from agent.falco._output import OutputFormat
from agent.falco._reader import read_rules_text

RULE_MATCHING = ("first", "all")
LIST_OPS = ("in", "intersects", "pmatch")
TOO_DEEP = ("condition nested too deeply (parentheses, 'not's or a chain of macros deeper than Sysgram "
            "can compile)")


@dataclass(frozen=True, slots=True)
class Rule:
    """A loaded rule, as Sysgram will evaluate it."""

    name: str
    description: str
    priority: str  # Falco's spelling: Emergency ... Debug
    tags: tuple[str, ...]
    condition: str
    output: str
    file: str
    line: int
    enabled: bool = True
    source: str = "syscall"
    evttypes: frozenset[str] | None = None  # None: every event type


@dataclass(slots=True)
class CompiledRule:
    rule: Rule
    fn: Callable[[Any], bool]  # generic predicate (any event type)
    output: OutputFormat
    order: int
    by_type: dict[str, Callable[[Any], bool]] = field(default_factory=dict)  # specialised per event type


@dataclass(slots=True)
class RuleStatus:
    name: str
    file: str
    status: str  # ok | warning | error
    reason: str = ""


@dataclass(slots=True)
class RuleSet:
    """The compiled rules of one or more files; ``rules`` holds the enabled, loaded ones in file order."""

    rules: tuple[Rule, ...]
    compiled: tuple[CompiledRule, ...]
    diagnostics: tuple[Diagnostic, ...]
    rule_matching: str = "all"
    statuses: list[RuleStatus] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    universe: frozenset[str] = frozenset()

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if not d.is_error]

    def interesting_syscalls(self) -> frozenset[str]:
        """The syscalls the capture must send details for: the union of the rules' event types."""
        out: set[str] = set()
        for r in self.rules:
            if r.evttypes is None:
                return self.universe
            out |= r.evttypes
        if out & {"execve", "execveat"}:
            out.add("memfd_create")  # rare, and how an exec is known to run from a memfd (fd state)
        return frozenset(out & self.universe)


def _universe() -> frozenset[str]:
    return known_names(False) | known_names(True)


def read_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for path in paths:
        try:
            text = read_regular(path).decode("utf-8")
            out.append((path, text.replace("\r\n", "\n").replace("\r", "\n")))  # as text mode reads it
        except FileNotFoundError:
            raise RulesError("no such rules file", path=path) from None
        except IsADirectoryError:
            raise RulesError("is a directory, not a rules file", path=path) from None
        except OSError as err:
            raise RulesError(f"cannot read rules file: {err.strerror or err}", path=path) from None
        except UnicodeDecodeError as err:
            raise RulesError(f"cannot read rules file: {err}", path=path) from None
    return out


def load_texts(texts: Sequence[tuple[str, str]], rule_matching: str = "all") -> RuleSet:
    if rule_matching not in RULE_MATCHING:
        raise RulesError(f"rule_matching must be 'first' or 'all', not {rule_matching!r}")
    collector = Collector()
    diags: list[Diagnostic] = []
    for path, text in texts:
        items, read_diags = read_rules_text(path, text)
        diags.extend(read_diags)
        collector.add(items, path)
    diags.extend(collector.diags)
    return _Compiler(collector, diags, rule_matching).build()


class _Compiler:
    def __init__(self, collector: Collector, diags: list[Diagnostic], rule_matching: str) -> None:
        self.col = collector.out
        self.diags = diags
        self.rule_matching = rule_matching
        self.universe = _universe()
        self.lists: dict[str, list[str]] = {}
        self.macros: dict[str, MacroInfo] = {}
        self.statuses: list[RuleStatus] = []

    # -- diagnostics
    def node_diag(self, severity: str, node: Node, message: str, rule: RuleDef, code: str) -> Diagnostic:
        file, line, col = node.src.locate(node.pos)
        if node.src.kind == "macro" and node.src.name:
            message = f"{message} (in macro '{node.src.name}')"
        if node.src.kind == "exception":
            message = f"{message} (in exception '{node.src.name}')"
        return Diagnostic(severity, file, line, col, message, "rule", rule.name, code,  # type: ignore[arg-type]
                          node.src.text, node.pos)

    # -- lists and macros
    def resolve_lists(self) -> None:
        pending = dict(self.col.lists)
        resolving: set[str] = set()

        def resolve(name: str) -> list[str]:
            if name in self.lists:
                return self.lists[name]
            resolving.add(name)
            ldef = pending[name]
            deps = {str(i): resolve(str(i)) for i in ldef.items
                    if isinstance(i, str) and i in pending and i not in resolving}
            self.lists[name] = resolve_list_items(ldef.items, deps)
            resolving.discard(name)
            return self.lists[name]

        for name in pending:
            resolve(name)

    def parse_macros(self) -> None:
        for name, mdef in self.col.macros.items():
            src = _source(mdef.condition, "macro", name)
            info = MacroInfo(name, src)
            try:
                info.ast = parse_condition(src)
            except ParseError as err:
                info.error = err.message
                file, line, col = src.locate(err.offset)
                self.diags.append(Diagnostic("error", file, line, col, err.message, "macro", name, "syntax",
                                             src.text, err.offset))
            except RecursionError:
                info.error = TOO_DEEP
                file, line, col = src.locate(0)
                self.diags.append(Diagnostic("error", file, line, col, TOO_DEEP, "macro", name, "too-deep"))
            else:
                self._check_macro_fields(info)
            self.macros[name] = info

    def _check_macro_fields(self, info: MacroInfo) -> None:
        """Unknown fields are reported at the macro itself, used or not (as a typo there is a bug)."""
        stack: list[Any] = [info.ast]
        while stack:
            node = stack.pop()
            if isinstance(node, BoolOp):
                stack.extend(node.children)
            elif isinstance(node, Not):
                stack.append(node.child)
            elif isinstance(node, Compare):
                for fe in (node.field, node.rhs):
                    if not isinstance(fe, FieldExpr):
                        continue
                    try:
                        bind_field(fe.name, fe.arg)
                    except FieldError as err:
                        info.ast = None
                        info.error = str(err)
                        file, line, col = info.source.locate(fe.pos)
                        self.diags.append(Diagnostic("error", file, line, col, str(err), "macro", info.name,
                                                     "unknown-field", info.source.text, fe.pos))
                        return

    # -- rules
    def exception_ast(self, rule: RuleDef, exc: ExceptionDef) -> Node | None:
        src = Source(f"{exc.name}", "exception", exc.name, ((0, exc.place),))
        fields = exc.fields
        if fields is None:
            raise _ExcError(f"exception '{exc.name}' has no 'fields'", exc.place)
        single = isinstance(fields, str)
        names = [fields] if single else list(fields)
        comps = exc.comps
        if comps is None:
            comps = ["in"] if single else ["="] * len(names)
        elif isinstance(comps, str):
            comps = [comps]
        parsed: list[FieldExpr] = []
        for fname in names:
            fsrc = Source(str(fname), "exception", exc.name, ((0, exc.place),))
            try:
                parsed.append(_Parser(fsrc).parse_field())
            except ParseError as err:
                raise _ExcError(f"exception '{exc.name}': bad field '{fname}': {err.message}", exc.place) from None
        for comp in comps:
            if comp not in _OPERATORS:
                raise _ExcError(f"exception '{exc.name}': unknown comparison operator '{comp}'", exc.place)
        if not exc.values:
            return None

        def cmp(fe: FieldExpr, comp: str, value: Any) -> Node:
            if comp == "==":
                comp = "="
            if comp in LIST_OPS:
                items = value if isinstance(value, list) else None
                if items is None:
                    return Compare(src, 0, fe, comp, 0, ListLit(src, 0, [], name=str(value)))
                return Compare(src, 0, fe, comp, 0, ListLit(src, 0, [Literal(src, 0, _text(v), False) for v in items]))
            return Compare(src, 0, fe, comp, 0, Literal(src, 0, _text(value), True))

        alternatives: list[Node] = []
        if single:
            comp = comps[0]
            if comp in LIST_OPS:
                alternatives.append(cmp(parsed[0], comp, list(exc.values)))
            else:
                alternatives.extend(cmp(parsed[0], comp, v) for v in exc.values)
        else:
            for tup in exc.values:
                # values appended to an existing exception were never checked against its fields
                if not isinstance(tup, list) or len(tup) != len(parsed):
                    raise _ExcError(f"exception '{exc.name}': each value must be a list of {len(parsed)} (one per "
                                    f"field), got {tup!r}", exc.place)
                parts = [cmp(fe, comp, v) for fe, comp, v in zip(parsed, comps, tup, strict=True)]
                alternatives.append(parts[0] if len(parts) == 1 else BoolOp(src, 0, "and", parts))
        inner = alternatives[0] if len(alternatives) == 1 else BoolOp(src, 0, "or", alternatives)
        return Not(src, 0, inner)

    def compile_rule(self, rule: RuleDef, order: int) -> CompiledRule | None:
        try:
            return self._compile_rule(rule, order)
        except (RecursionError, SyntaxError):  # Python's own limits on depth, in parsing or generated code
            file, line, col = _source(rule.condition, "rule", rule.name).locate(0)
            self.statuses[-1].status, self.statuses[-1].reason = "error", TOO_DEEP
            self.diags.append(Diagnostic("error", file, line, col, TOO_DEEP, "rule", rule.name, "too-deep"))
            return None

    def _compile_rule(self, rule: RuleDef, order: int) -> CompiledRule | None:
        src = _source(rule.condition, "rule", rule.name)
        status = RuleStatus(rule.name, rule.file, "ok", "" if rule.enabled else "disabled")
        self.statuses.append(status)

        def fail(d: Diagnostic) -> None:
            if rule.skip_if_unknown_filter and d.code == "unknown-field":
                d = Diagnostic("warning", d.file, d.line, d.col, f"{d.message}; rule skipped "
                               "(skip-if-unknown-filter)", d.item_kind, d.item_name, d.code, d.condition, d.offset)
                status.status, status.reason = "warning", d.message
            else:
                status.status, status.reason = "error", d.message
            self.diags.append(d)

        try:
            ast = parse_condition(src)
        except ParseError as err:
            file, line, col = src.locate(err.offset)
            fail(Diagnostic("error", file, line, col, err.message, "rule", rule.name, "syntax", src.text,
                            err.offset))
            return None
        try:
            exc_nodes = [n for exc in rule.exceptions if (n := self.exception_ast(rule, exc)) is not None]
        except _ExcError as err:
            fail(Diagnostic("error", err.place.file, err.place.line, err.place.col, err.message, "rule",
                            rule.name, "bad-exception"))
            return None
        if exc_nodes:
            ast = BoolOp(src, 0, "and", [ast, *exc_nodes])
        expander = Expander(self.macros, self.lists)
        try:
            expanded = expander.expand(ast)
            result = compile_condition(expanded, rule.name, self.universe)
        except CompileError as err:
            fail(self.node_diag("error", err.node, err.message, rule, err.code))
            return None
        warnings: list[Diagnostic] = []
        seen: set[str] = set()
        for text, node in result.unavailable:
            if text not in seen:
                seen.add(text)
                warnings.append(self.node_diag("warning", node, f"field '{text}' is not available in Sysgram; "
                                               "it is treated as missing", rule, "unavailable-field"))
        output = OutputFormat(rule.output.rstrip())  # a folded YAML scalar (`output: >`) ends in a newline
        for f in output.fields:
            if f.error:
                self.diags.append(Diagnostic("error", rule.output_place.file, rule.output_place.line,
                                             rule.output_place.col, f"invalid output field '%{f.text}': {f.error}",
                                             "rule", rule.name, "bad-output", rule.output, f.offset))
                status.status, status.reason = "error", f"invalid output field '%{f.text}'"
                return None
            if f.bound is not None and not f.bound.fdef.available and f.text not in seen:
                seen.add(f.text)
                warnings.append(Diagnostic("warning", rule.output_place.file, rule.output_place.line,
                                           rule.output_place.col, f"output field '%{f.text}' is not available in "
                                           "Sysgram; it prints as <NA>", "rule", rule.name, "unavailable-field"))
        if result.evttypes is None and rule.warn_evttypes:
            warnings.append(Diagnostic("warning", rule.place.file, rule.place.line, rule.place.col,
                                       "rule matches too many evt.type values (no evt.type filter); it is "
                                       "evaluated for every event", "rule", rule.name, "no-evttype"))
        self.diags.extend(warnings)
        if warnings:
            status.status, status.reason = "warning", warnings[0].message
        loaded = Rule(rule.name, rule.desc.strip(), rule.priority, rule.tags, rule.condition.text, rule.output,
                      rule.file, rule.place.line, rule.enabled, "syscall", result.evttypes)
        return CompiledRule(loaded, result.fn, output, order, result.by_type)

    def build(self) -> RuleSet:
        self.resolve_lists()
        self.parse_macros()
        compiled: list[CompiledRule] = []
        for order, rule in enumerate(self.col.rules.values()):
            cr = self.compile_rule(rule, order)
            if cr is not None and cr.rule.enabled:
                compiled.append(cr)
        for name, source in self.col.skipped_sources.items():
            if name not in self.col.rules:
                self.statuses.append(RuleStatus(name, "", "warning", f"source '{source}' is not evaluated"))
        return RuleSet(tuple(c.rule for c in compiled), tuple(compiled), tuple(self.diags), self.rule_matching,
                       self.statuses, self.col.counts, self.universe)


class _ExcError(Exception):
    def __init__(self, message: str, place: Place) -> None:
        super().__init__(message)
        self.message = message
        self.place = place


_OPERATORS = ("=", "==", "!=", "<", "<=", ">", ">=", "contains", "icontains", "bcontains", "startswith",
              "bstartswith", "endswith", "glob", "iglob", "regex", "in", "intersects", "pmatch")


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _source(chunks: TextChunks, kind: str, name: str) -> Source:
    return Source(chunks.text, kind, name, tuple(chunks.chunks))

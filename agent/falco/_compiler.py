"""Compiler: a condition AST (macros and lists expanded, fields resolved) -> one generated Python function.

Each rule's condition becomes the source of one ``def`` whose body is a single short-circuit expression;
field extractors and converted constants are bound as globals of the generated code. A missing field value
(None) makes its comparison false, as in Falco.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.falco._ast import (
    BoolOp,
    Compare,
    Const,
    FieldExpr,
    ListLit,
    Literal,
    MacroRef,
    Node,
    Not,
    Source,
    parse_condition,
    unquote_list_item,
)
from agent.falco._fields import BoundField, FieldError, bind_field, falco_exepath

EVT_TYPE = "evt.type"
ORDER_OPS = ("<", "<=", ">", ">=")
STRING_OPS = ("contains", "icontains", "bcontains", "startswith", "bstartswith", "endswith", "glob", "iglob",
              "regex")


class CompileError(Exception):
    """A fault at one node; carries the node so the diagnostic can point at it."""

    def __init__(self, message: str, node: Node, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.code = code


@dataclass(slots=True)
class MacroInfo:
    name: str
    source: Source
    ast: Node | None = None
    error: str = ""  # a parse error already reported for this macro
    used: bool = False


@dataclass(slots=True)
class CompileResult:
    fn: Callable[[Any], bool]
    evttypes: frozenset[str] | None  # None: every event type
    unavailable: list[tuple[str, Node]] = field(default_factory=list)  # fields Sysgram cannot fill
    by_type: dict[str, Callable[[Any], bool]] = field(default_factory=dict)  # specialised per event type


# ------------------------------------------------------------------ expansion of macros and lists
MAX_EXPANDED_NODES = 200_000  # upstream's largest rule expands to a few thousand
class Expander:
    """Replaces macro references by their (parsed) conditions and list names by their items."""

    def __init__(self, macros: dict[str, MacroInfo], lists: dict[str, list[str]]) -> None:
        self.macros = macros
        self.lists = lists
        self.budget = MAX_EXPANDED_NODES

    def expand(self, node: Node, stack: tuple[str, ...] = ()) -> Node:
        self.budget -= 1
        if self.budget < 0:  # macros inlined into macros (m2 = m1 and m1 ...) grow exponentially
            raise CompileError(f"the condition is over {MAX_EXPANDED_NODES:,} terms once its macros are expanded",
                               node, "too-large")
        if isinstance(node, BoolOp):
            return BoolOp(node.src, node.pos, node.op, [self.expand(c, stack) for c in node.children])
        if isinstance(node, Not):
            assert node.child is not None
            return Not(node.src, node.pos, self.expand(node.child, stack))
        if isinstance(node, MacroRef):
            info = self.macros.get(node.name)
            if info is None:
                raise CompileError(f"undefined macro '{node.name}'", node, "unknown-macro")
            if node.name in stack:
                chain = " -> ".join((*stack[stack.index(node.name):], node.name))
                raise CompileError(f"macro cycle: {chain}", node, "macro-cycle")
            if info.ast is None:
                raise CompileError(f"macro '{node.name}' has an error: {info.error}", node, "bad-macro")
            info.used = True
            return self.expand(info.ast, (*stack, node.name))
        if isinstance(node, Compare) and isinstance(node.rhs, ListLit):
            return Compare(node.src, node.pos, node.field, node.op, node.op_pos, self.expand_list(node.rhs))
        return node

    def expand_list(self, lit: ListLit) -> ListLit:
        items: list[Literal] = []
        if lit.name is not None:
            if lit.name not in self.lists:
                raise CompileError(f"undefined list '{lit.name}'", lit, "unknown-list")
            items.extend(Literal(lit.src, lit.pos, v, True) for v in self.lists[lit.name])
        for item in lit.items:
            if not item.quoted and item.text in self.lists:
                items.extend(Literal(item.src, item.pos, v, True) for v in self.lists[item.text])
            else:
                items.append(item)
        return ListLit(lit.src, lit.pos, items)


def resolve_list_items(raw: Iterable[Any], lists: dict[str, list[str]]) -> list[str]:
    """A list's items with nested list names expanded and explicit quotes removed, each once: a list that
    names another ten times, which names another ten times... would otherwise grow exponentially (membership
    is all a list is used for)."""
    out: dict[str, None] = {}
    for item in raw:
        text = item if isinstance(item, str) else _scalar_text(item)
        if text in lists:
            out.update(dict.fromkeys(lists[text]))
        else:
            out[unquote_list_item(text)] = None
    return list(out)


def _scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# ------------------------------------------------------------------ event-type analysis
def evttypes_of(node: Node, universe: frozenset[str]) -> frozenset[str] | None:
    """The event types a condition can match (None: all), as Falco's evttype index computes it."""
    types, _pure = _evttypes(node, universe)
    return types


def _evttypes(node: Node, universe: frozenset[str]) -> tuple[frozenset[str] | None, bool]:
    if isinstance(node, Compare) and node.field is not None and node.field.name == EVT_TYPE \
            and not node.field.transformers:
        if node.op == "=" and isinstance(node.rhs, Literal):
            return frozenset((node.rhs.text,)), True
        if node.op == "in" and isinstance(node.rhs, ListLit):
            return frozenset(i.text for i in node.rhs.items), True
        if node.op == "!=" and isinstance(node.rhs, Literal):
            return universe - {node.rhs.text}, True
        return None, False
    if isinstance(node, BoolOp):
        results = [_evttypes(c, universe) for c in node.children]
        pure = all(p for _, p in results)
        if node.op == "and":
            acc: frozenset[str] | None = None
            for types, _ in results:
                if types is not None:
                    acc = types if acc is None else acc & types
            return acc, pure
        union: set[str] = set()
        for types, _ in results:
            if types is None:
                return None, pure
            union |= types
        return frozenset(union), pure
    if isinstance(node, Not):
        assert node.child is not None
        types, pure = _evttypes(node.child, universe)
        if pure and types is not None:
            return universe - types, True
        return None, False
    if isinstance(node, Const):
        return (None if node.value else frozenset()), True
    return None, False


# ------------------------------------------------------------------ code generation
_GEN_IDS = itertools.count()
PREDICATE_SOURCE = "_sysgram_source"  # attribute of a generated predicate: (expression, namespace)
# Operators that a field value rarely satisfies (so a test using one rejects most events).
_SELECTIVE_OPS = frozenset({"=", "==", "in", "intersects", "startswith", "bstartswith", "endswith", "contains",
                            "icontains", "bcontains", "glob", "iglob", "regex", "pmatch"})
# Fields that walk the process tree or call out: the dearest to extract.
_DEAR_PREFIXES = ("proc.a", "proc.p", "proc.s", "proc.vpgid", "proc.exe_ino", "container.", "sysgram.")


def _flatten_and(node: BoolOp) -> Iterable[Node]:
    for child in node.children:
        if isinstance(child, BoolOp) and child.op == "and":
            yield from _flatten_and(child)
        else:
            yield child


def _cost_rank(node: Node) -> int:
    """Lower first in an `and`: selective and cheap tests (0) before unselective or dear ones (up to 9)."""
    if isinstance(node, Const):
        return 0
    if isinstance(node, Not):
        return 6 + (_cost_rank(node.child) % 3 if node.child is not None else 0)  # `not x` nearly always holds
    if isinstance(node, BoolOp):
        ranks = [_cost_rank(c) for c in node.children] or [0]
        # An `or` of tests costs each of them when (as usual) none holds: after single tests of its rank.
        return min(max(ranks) + (len(ranks) > 1), 9) if node.op == "or" else min(ranks)
    if isinstance(node, Compare) and node.field is not None:
        fe = node.field
        if fe.name == EVT_TYPE:
            return 0
        try:
            bound = bind_field(fe.name, fe.arg)
        except FieldError:
            return 9  # reported when the test itself is compiled
        if bound.fdef.inline is not None and not fe.transformers and bound.mode == "single":
            cost = 0
        else:
            cost = 2 if fe.name.startswith(_DEAR_PREFIXES) else 1
        selective = node.op in _SELECTIVE_OPS and not isinstance(node.rhs, FieldExpr)
        return cost + (0 if selective else 3)
    return 9


class _Gen:
    """Generates one expression; with ``evttype`` set, evt.type tests are decided at compile time (the
    rule is specialised for that event type, as the index only calls it for that type)."""

    def __init__(self, evttype: str | None = None) -> None:
        self.ns: dict[str, Any] = dict(_RUNTIME)
        self.n = 0
        # Names unique across every generated predicate, so that the engine can merge the predicates of one
        # event type into one function (see _engine.combine_predicates).
        self.prefix = f"g{next(_GEN_IDS)}_"
        self.unavailable: list[tuple[str, Node]] = []
        self.evttype = evttype

    def const(self, value: Any) -> str:
        name = f"{self.prefix}k{self.n}"
        self.n += 1
        self.ns[name] = value
        return name

    def var(self) -> str:
        name = f"{self.prefix}v{self.n}"
        self.n += 1
        return name

    def expr(self, node: Node) -> str:
        if isinstance(node, BoolOp):
            absorbing, neutral = ("False", "True") if node.op == "and" else ("True", "False")
            parts = []
            children = node.children
            if node.op == "and":
                # Conditions are pure, so an `and` may test its cheapest, most selective parts first:
                # `fd.name in (...)` rejects most events at once, `open_read`'s flag checks rarely do.
                flat = list(_flatten_and(node))
                children = [c for _rank, _i, c in sorted((_cost_rank(c), i, c) for i, c in enumerate(flat))]
            for child in children:
                code = self.expr(child)
                if code == absorbing:
                    return absorbing
                if code != neutral:
                    parts.append(code)
            if not parts:
                return neutral
            return parts[0] if len(parts) == 1 else "(" + f" {node.op} ".join(parts) + ")"
        if isinstance(node, Not):
            assert node.child is not None
            inner = self.expr(node.child)
            return {"True": "False", "False": "True"}.get(inner, f"(not {inner})")
        if isinstance(node, Const):
            return "True" if node.value else "False"
        if isinstance(node, Compare):
            return self.compare(node)
        raise CompileError("internal: unexpanded node", node, "internal")

    def bind(self, fe: FieldExpr) -> tuple[BoundField, str, str, str]:
        """(bound field, an expression of ``c`` giving the value, value type after transformers, mode)."""
        try:
            bound = bind_field(fe.name, fe.arg)
        except FieldError as err:
            code = "unknown-field" if "unknown field" in str(err) else "bad-field-arg"
            raise CompileError(str(err), fe, code) from None
        if not bound.fdef.available:
            self.unavailable.append((fe.text(), fe))
        extractor = bound.extractor
        typ = bound.fdef.type
        mode = bound.mode
        for tr in fe.transformers:
            if tr == "len":
                if mode == "list":
                    extractor = _wrap_list_len(extractor)
                    mode = "single"
                elif typ == "str":
                    extractor = _wrap(extractor, _len, mode)
                else:
                    raise CompileError(f"len() needs a string or list field, '{fe.name}' is {typ}", fe,
                                       "bad-transformer")
                typ = "int"
            else:
                if typ != "str":
                    raise CompileError(f"{tr}() needs a string field, '{fe.name}' is {typ}", fe, "bad-transformer")
                extractor = _wrap(extractor, _TRANSFORMS[tr], mode)
        if not fe.transformers and bound.fdef.inline is not None and mode == "single":
            inline = bound.fdef.inline(self.evttype)
            if inline is not None:
                return bound, inline, typ, mode
        return bound, self.const(extractor) + "(c)", typ, mode

    def fold_evttype(self, node: Compare) -> str | None:
        """With a known event type, evt.type = / != / in are constants."""
        fe = node.field
        if self.evttype is None or fe is None or fe.name != EVT_TYPE or fe.transformers:
            return None
        rhs = node.rhs
        if node.op in ("=", "!=") and isinstance(rhs, Literal):
            hit = rhs.text == self.evttype
            return str(hit if node.op == "=" else not hit)
        if node.op in ("in", "intersects") and isinstance(rhs, ListLit):
            return str(any(i.text == self.evttype for i in rhs.items))
        return None

    def compare(self, node: Compare) -> str:
        assert node.field is not None
        folded = self.fold_evttype(node)
        if folded is not None:
            return folded
        _bound, f, typ, mode = self.bind(node.field)
        op = node.op
        v = self.var()
        if op == "exists":
            if mode == "any":
                return f"(bool({f}))"
            return f"({f} is not None)"
        if mode == "list" and op not in ("in", "intersects"):
            raise CompileError(f"list field '{node.field.text()}' only supports 'exists', 'in' and 'intersects'",
                               node, "bad-operator")
        self.check_op(node, typ)
        rhs = node.rhs
        if isinstance(rhs, FieldExpr):
            _b2, g, _typ2, mode2 = self.bind(rhs)
            if mode2 != "single":
                raise CompileError(f"val({rhs.text()}) must be a single-valued field", rhs, "bad-operator")
            w = self.var()
            fn = self.const(_dyn_op(op, typ))
            test = f"{fn}({{x}}, {w})"
            body = self.apply_mode(test, v, mode, op)
            return f"(({w} := {g}) is not None and ({v} := {f}) is not None and {body})"
        value = self.convert(node, typ)
        k = self.const(value)
        if _bound.fdef.nonnull and mode == "single" and not node.field.transformers:
            if typ == "bool" and op in ("=", "!="):
                return f"({f})" if value == (op == "=") else f"(not {f})"
            return "(" + _template(op, typ).replace("{k}", k).replace("{x}", f) + ")"
        test = _template(op, typ).replace("{k}", k)
        body = self.apply_mode(test, v, mode, op)
        return f"(({v} := {f}) is not None and {body})"

    @staticmethod
    def apply_mode(test: str, v: str, mode: str, op: str) -> str:
        if mode == "single":
            return test.replace("{x}", v)
        if mode == "list" and op == "in":
            return f"all({test.replace('{x}', '_x')} for _x in {v})"
        return f"any({test.replace('{x}', '_x')} for _x in {v})"

    def check_op(self, node: Compare, typ: str) -> None:
        op = node.op
        if op in ORDER_OPS and typ not in ("int", "float"):
            raise CompileError(f"operator '{op}' is not supported by {typ} field '{node.field.text()}'"  # type: ignore[union-attr]
                               , node, "bad-operator")
        if op in STRING_OPS and typ != "str":
            raise CompileError(f"operator '{op}' is not supported by {typ} field '{node.field.text()}'"  # type: ignore[union-attr]
                               , node, "bad-operator")
        if op == "pmatch" and typ != "str":
            raise CompileError(f"operator 'pmatch' needs a path field, '{node.field.text()}' is {typ}"  # type: ignore[union-attr]
                               , node, "bad-operator")

    def convert(self, node: Compare, typ: str) -> Any:
        rhs = node.rhs
        op = node.op
        if isinstance(rhs, ListLit):
            if op == "pmatch":
                return _PathMatcher([i.text for i in rhs.items])
            if typ == "net":
                return tuple(_conv(i, typ, "=") for i in rhs.items)
            return frozenset(_conv(i, typ, "=") for i in rhs.items)
        assert isinstance(rhs, Literal)
        return _conv(rhs, typ, op)


def _conv(lit: Literal, typ: str, op: str) -> Any:
    text = lit.text
    try:
        if op in ("glob", "iglob"):
            pattern = text.lower() if op == "iglob" else text
            return re.compile(fnmatch.translate(pattern), re.DOTALL).match
        if op == "regex":
            return re.compile(text, re.DOTALL).fullmatch
        if op in ("bcontains", "bstartswith"):
            return bytes.fromhex(text.replace(" ", ""))
        if op == "icontains":
            return text.lower()
        if typ == "int":
            return int(text, 0) if text.lower().startswith(("0x", "0o")) else int(text)
        if typ == "float":
            return float(text)
        if typ == "bool":
            low = text.lower()
            if low not in ("true", "false"):
                raise ValueError
            return low == "true"
        if typ == "ip":
            return str(ipaddress.ip_address(text))
        if typ == "net":
            return ipaddress.ip_network(text, strict=False)
    except (ValueError, re.error, binascii.Error):
        kind = {"regex": "regular expression", "bcontains": "hex string", "bstartswith": "hex string"}.get(op, typ)
        raise CompileError(f"invalid {kind} value '{text}'", lit, "bad-value") from None
    return text


def _template(op: str, typ: str) -> str:
    if typ == "net":
        return {"=": "_in_net({x}, ({k},))", "!=": "not _in_net({x}, ({k},))", "in": "_in_net({x}, {k})",
                "intersects": "_in_net({x}, {k})"}.get(op, "False")
    return {
        "=": "{x} == {k}", "!=": "{x} != {k}", "<": "{x} < {k}", "<=": "{x} <= {k}", ">": "{x} > {k}",
        ">=": "{x} >= {k}", "contains": "{k} in {x}", "icontains": "{k} in {x}.lower()",
        "startswith": "{x}.startswith({k})", "endswith": "{x}.endswith({k})",
        "glob": "{k}({x}) is not None", "iglob": "{k}({x}.lower()) is not None", "regex": "{k}({x}) is not None",
        "bcontains": "{k} in {x}.encode()", "bstartswith": "{x}.encode().startswith({k})",
        "in": "{x} in {k}", "intersects": "{x} in {k}", "pmatch": "{k}({x})",
    }[op]


def _dyn_op(op: str, typ: str) -> Callable[[Any, Any], bool]:
    """Comparison against another field's value (val(...)): decided at run time."""
    table: dict[str, Callable[[Any, Any], bool]] = {
        "=": lambda a, b: bool(a == b), "!=": lambda a, b: bool(a != b), "<": lambda a, b: bool(a < b),
        "<=": lambda a, b: bool(a <= b), ">": lambda a, b: bool(a > b), ">=": lambda a, b: bool(a >= b),
        "contains": lambda a, b: str(b) in a, "icontains": lambda a, b: str(b).lower() in a.lower(),
        "startswith": lambda a, b: a.startswith(str(b)), "endswith": lambda a, b: a.endswith(str(b)),
        "glob": lambda a, b: fnmatch.fnmatchcase(a, str(b)),
        "iglob": lambda a, b: fnmatch.fnmatchcase(a.lower(), str(b).lower()),
        "regex": lambda a, b: re.fullmatch(str(b), a) is not None,
        "in": lambda a, b: bool(a == b), "intersects": lambda a, b: bool(a == b),
        "pmatch": lambda a, b: _PathMatcher([str(b)])(a),
        "bcontains": lambda a, b: str(b).encode() in a.encode(),
        "bstartswith": lambda a, b: a.encode().startswith(str(b).encode()),
    }
    return table[op]


@functools.lru_cache(maxsize=8192)
def _parse_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


def _in_net(addr: str, nets: tuple[Any, ...]) -> bool:
    ip = _parse_ip(addr)
    return ip is not None and any(ip.version == n.version and ip in n for n in nets)


class _PathMatcher:
    """pmatch: true when one of the prefixes is a whole-component prefix of the path (globs allowed)."""

    def __init__(self, prefixes: list[str]) -> None:
        self.exact: set[tuple[str, ...]] = set()
        self.globs: list[tuple[str, ...]] = []
        self.root = False
        for p in prefixes:
            parts = _components(p)
            if not parts:
                self.root = True
            elif any(ch in p for ch in "*?["):
                self.globs.append(parts)
            else:
                self.exact.add(parts)

    def __call__(self, path: str) -> bool:
        if not path.startswith("/"):
            return False
        if self.root:
            return True
        parts = _components(path)
        exact = self.exact
        for i in range(1, len(parts) + 1):
            if parts[:i] in exact:
                return True
        for g in self.globs:
            if len(g) <= len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, g, strict=False)):
                return True
        return False


def _components(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _len(v: Any) -> int:
    return len(v)


def _b64(v: str) -> str | None:
    try:
        return base64.b64decode(v, validate=False).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None


def _basename(v: str) -> str:
    return v.rstrip("/").rsplit("/", 1)[-1] if v.rstrip("/") else v


_TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "tolower": str.lower, "toupper": str.upper, "b64": _b64, "basename": _basename,
}


def _wrap(extractor: Callable[[Any], Any], fn: Callable[[Any], Any], mode: str) -> Callable[[Any], Any]:
    if mode == "single":
        def single(c: Any) -> Any:
            v = extractor(c)
            return fn(v) if v is not None else None

        return single

    def many(c: Any) -> Any:
        vs = extractor(c)
        return tuple(r for v in vs if (r := fn(v)) is not None) if vs is not None else None

    return many


def _wrap_list_len(extractor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def get(c: Any) -> Any:
        vs = extractor(c)
        return len(vs) if vs is not None else None

    return get


_RUNTIME: dict[str, Any] = {"_in_net": _in_net, "_FILE_TYPES": ("file", "directory"), "_exepath": falco_exepath}


def _build(gen: _Gen, body: str, name: str) -> Callable[[Any], bool]:
    fn_name = "rule_" + re.sub(r"\W", "_", name)[:40]
    result = body if body in ("True", "False") else f"bool({body})"
    # The locals the inlined field expressions read.
    code = f"def {fn_name}(c):\n    ev = c.ev\n    fd = c.fd\n    p = c.proc\n    return {result}\n"
    ns = gen.ns
    exec(compile(code, f"<falco rule {name!r}>", "exec"), ns)
    fn = ns[fn_name]
    setattr(fn, PREDICATE_SOURCE, (result, ns))
    return fn


def compile_condition(ast: Node, name: str, universe: frozenset[str]) -> CompileResult:
    """Expanded AST -> a generic predicate plus one specialised per event type. Raises CompileError."""
    gen = _Gen()
    generic = _build(gen, gen.expr(ast), name)
    evttypes = evttypes_of(ast, universe)
    result = CompileResult(generic, evttypes, gen.unavailable)
    by_body: dict[str, Callable[[Any], bool]] = {}
    for t in sorted(evttypes or ()):
        tgen = _Gen(t)
        body = tgen.expr(ast)
        if body == "False":
            continue  # can never match this type (e.g. a `not evt.type=...` branch)
        if body not in by_body:
            by_body[body] = _build(tgen, body, name)
        result.by_type[t] = by_body[body]
    return result


def parse_source(src: Source) -> Node:
    return parse_condition(src)


__all__ = [
    "PREDICATE_SOURCE",
    "CompileError",
    "CompileResult",
    "Expander",
    "MacroInfo",
    "compile_condition",
    "evttypes_of",
    "parse_source",
    "resolve_list_items",
]

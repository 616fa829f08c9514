"""The condition grammar of Falco's libs, parsed to an AST that remembers where every node came from.

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | check
    check   := "(" expr ")" | MACRO | field UNARY_OP | field BIN_OP value | field LIST_OP list
    field   := NAME ["[" ARG "]"] | TRANSFORMER "(" field ")"
    value   := QUOTED | BARE | "val(" field ")" | TRANSFORMER "(" "val(" field ")" ")"
    list    := "(" [value ("," value)*] ")" | LIST_NAME

Precedence is not > and > or. A bare name without a dot is a macro; a dotted name is a field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.falco._diag import Place

UNARY_OPS = ("exists",)
LIST_OPS = ("in", "intersects", "pmatch")
WORD_OPS = ("contains", "icontains", "bcontains", "startswith", "bstartswith", "endswith", "glob", "iglob",
            "regex")
SYMBOL_OPS = ("==", "!=", "<=", ">=", "=", "<", ">")
TRANSFORMERS = ("tolower", "toupper", "b64", "basename", "len")
KEYWORDS = ("and", "or", "not")


@dataclass(slots=True)
class Source:
    """The text a node was parsed from, and the item (kind, name) and file places it belongs to.

    ``chunks`` maps offsets to places: an appended condition is the original text, a space, then the
    appended text, each chunk from its own item in its own file.
    """

    text: str
    kind: str
    name: str
    chunks: tuple[tuple[int, Place], ...]

    def locate(self, offset: int) -> tuple[str, int, int]:
        start, place = self.chunks[0]
        for chunk_start, chunk_place in self.chunks:
            if chunk_start <= offset:
                start, place = chunk_start, chunk_place
        line, col = place.at(offset - start)
        return place.file, line, col


@dataclass(slots=True)
class Node:
    src: Source
    pos: int


@dataclass(slots=True)
class BoolOp(Node):
    op: str  # "and" | "or"
    children: list[Node] = field(default_factory=list)


@dataclass(slots=True)
class Not(Node):
    child: Node | None = None


@dataclass(slots=True)
class MacroRef(Node):
    name: str = ""


@dataclass(slots=True)
class Const(Node):
    value: bool = True


@dataclass(slots=True)
class FieldExpr(Node):
    name: str = ""
    arg: str | None = None
    transformers: tuple[str, ...] = ()  # innermost first

    def text(self) -> str:
        base = self.name + (f"[{self.arg}]" if self.arg is not None else "")
        for t in self.transformers:
            base = f"{t}({base})"
        return base


@dataclass(slots=True)
class Literal(Node):
    text: str = ""
    quoted: bool = False


@dataclass(slots=True)
class ListLit(Node):
    items: list[Literal] = field(default_factory=list)
    name: str | None = None  # `in list_name` without parentheses


@dataclass(slots=True)
class Compare(Node):
    field: FieldExpr | None = None
    op: str = ""
    op_pos: int = 0
    rhs: Literal | ListLit | FieldExpr | None = None


class ParseError(Exception):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


_BARE_STOP = frozenset(" \t\r\n\f\v(),\"'")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class _Parser:
    def __init__(self, src: Source) -> None:
        self.src = src
        self.s = src.text
        self.i = 0

    # -- scanning helpers
    def ws(self) -> None:
        s, i = self.s, self.i
        while i < len(s) and s[i].isspace():
            i += 1
        self.i = i

    def peek_word(self) -> str:
        self.ws()
        j = self.i
        while j < len(self.s) and self.s[j] in _NAME_CHARS:
            j += 1
        return self.s[self.i : j]

    def accept_keyword(self, word: str) -> bool:
        self.ws()
        end = self.i + len(word)
        if self.s.startswith(word, self.i) and (end >= len(self.s) or self.s[end] not in _NAME_CHARS):
            # `not(`, `and(`, `or(` are keywords too.
            self.i = end
            return True
        return False

    def expect(self, ch: str, what: str) -> None:
        self.ws()
        if not self.s.startswith(ch, self.i):
            found = f"'{self.s[self.i]}'" if self.i < len(self.s) else "end of condition"
            raise ParseError(f"expected {what}, found {found}", self.i)
        self.i += len(ch)

    # -- grammar
    def parse(self) -> Node:
        self.ws()
        if self.i >= len(self.s):
            raise ParseError("empty condition", 0)
        node = self.parse_or()
        self.ws()
        if self.i < len(self.s):
            if self.s[self.i] == ")":
                raise ParseError("unbalanced parenthesis: ')' without '('", self.i)
            raise ParseError(f"unexpected '{self._token_at()}' (expected 'and', 'or' or end of condition)",
                             self.i)
        return node

    def _token_at(self) -> str:
        j = self.i
        while j < len(self.s) and not self.s[j].isspace() and (j == self.i or self.s[j] not in "()"):
            j += 1
        return self.s[self.i : j] or self.s[self.i]

    def parse_or(self) -> Node:
        start = self.i
        first = self.parse_and()
        children = [first]
        while self.accept_keyword("or"):
            children.append(self.parse_and())
        return first if len(children) == 1 else BoolOp(self.src, start, "or", children)

    def parse_and(self) -> Node:
        self.ws()
        start = self.i
        first = self.parse_not()
        children = [first]
        while self.accept_keyword("and"):
            children.append(self.parse_not())
        return first if len(children) == 1 else BoolOp(self.src, start, "and", children)

    def parse_not(self) -> Node:
        self.ws()
        start = self.i
        if self.accept_keyword("not"):
            return Not(self.src, start, self.parse_not())
        return self.parse_check()

    def parse_check(self) -> Node:
        self.ws()
        start = self.i
        if self.i >= len(self.s):
            raise ParseError("unexpected end of condition (expected a field, macro or '(')", self.i)
        if self.s[self.i] == "(":
            self.i += 1
            node = self.parse_or()
            self.ws()
            if self.i >= len(self.s) or self.s[self.i] != ")":
                if self.i >= len(self.s):
                    raise ParseError("unbalanced parenthesis: '(' is never closed", start)
                raise ParseError(f"expected ')' or 'and'/'or', found '{self._token_at()}'", self.i)
            self.i += 1
            return node
        word = self.peek_word()
        if not word:
            raise ParseError(f"unexpected '{self._token_at()}' (expected a field, macro or '(')", self.i)
        if word in KEYWORDS:
            raise ParseError(f"unexpected keyword '{word}'", self.i)
        after = self.i + len(word)
        if word in TRANSFORMERS and self.s.startswith("(", after):
            fld = self.parse_field()
        elif "." not in word:
            self.i = after
            return MacroRef(self.src, start, word)
        else:
            fld = self.parse_field()
        return self.parse_condition(fld, start)

    def parse_field(self, allow_val: bool = False) -> FieldExpr:
        self.ws()
        start = self.i
        word = self.peek_word()
        after = self.i + len(word)
        if (word in TRANSFORMERS or (allow_val and word == "val")) and self.s.startswith("(", after):
            self.i = after + 1
            inner = self.parse_field(allow_val=allow_val and word != "val")
            self.expect(")", f"')' to close {word}(")
            if word == "val":
                return inner
            inner.transformers = (*inner.transformers, word)
            return inner
        if not word or "." not in word or word[0].isdigit():
            raise ParseError(f"expected a field name, found '{self._token_at()}'", self.i)
        self.i = after
        arg = None
        if self.s.startswith("[", self.i):
            close = self.s.find("]", self.i)
            if close < 0:
                raise ParseError("unclosed '[' in field argument", self.i)
            arg = self.s[self.i + 1 : close]
            self.i = close + 1
        return FieldExpr(self.src, start, word, arg)

    def parse_condition(self, fld: FieldExpr, start: int) -> Node:
        self.ws()
        op_pos = self.i
        op = ""
        for sym in SYMBOL_OPS:
            if self.s.startswith(sym, self.i):
                op = sym
                self.i += len(sym)
                break
        else:
            word = self.peek_word()
            if word in UNARY_OPS or word in LIST_OPS or word in WORD_OPS:
                op = word
                self.i += len(word)
            elif not word and self.i < len(self.s) and self.s[self.i] not in "()":
                raise ParseError(f"unknown operator '{self._token_at()}'", self.i)
            elif word and word not in KEYWORDS:
                raise ParseError(f"unknown operator '{word}'", self.i)
            else:
                raise ParseError(f"expected an operator after field '{fld.text()}'", self.i)
        if op == "==":
            op = "="
        node = Compare(self.src, start, fld, op, op_pos)
        if op in UNARY_OPS:
            return node
        self.ws()
        if op in LIST_OPS:
            node.rhs = self.parse_list()
        else:
            node.rhs = self.parse_value()
        return node

    def parse_list(self) -> ListLit:
        self.ws()
        start = self.i
        if not self.s.startswith("(", self.i):
            word = self.peek_word()
            if word and "." not in word:
                self.i += len(word)
                return ListLit(self.src, start, [], name=word)
            raise ParseError("expected '(' to start a list", self.i)
        self.i += 1
        items: list[Literal] = []
        self.ws()
        if self.s.startswith(")", self.i):
            self.i += 1
            return ListLit(self.src, start, items)
        while True:
            self.ws()
            items.append(self.parse_literal(in_list=True))
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                continue
            if self.s.startswith(")", self.i):
                self.i += 1
                return ListLit(self.src, start, items)
            if self.i >= len(self.s):
                raise ParseError("unbalanced parenthesis: list '(' is never closed", start)
            raise ParseError(f"expected ',' or ')' in list, found '{self._token_at()}'", self.i)

    def parse_value(self) -> Literal | FieldExpr:
        self.ws()
        word = self.peek_word()
        after = self.i + len(word)
        if (word == "val" or word in TRANSFORMERS) and self.s.startswith("(", after):
            save = self.i
            try:
                return self.parse_field(allow_val=True)
            except ParseError:
                self.i = save
        return self.parse_literal(in_list=False)

    def parse_literal(self, in_list: bool) -> Literal:
        start = self.i
        if self.i >= len(self.s):
            raise ParseError("expected a value, found end of condition", self.i)
        ch = self.s[self.i]
        if ch in "\"'":
            return Literal(self.src, start, self._quoted(ch), True)
        j = self.i
        while j < len(self.s) and self.s[j] not in _BARE_STOP:
            j += 1
        if j == self.i:
            raise ParseError(f"expected a value, found '{ch}'", self.i)
        self.i = j
        return Literal(self.src, start, self.s[start:j], False)

    def _quoted(self, quote: str) -> str:
        start = self.i
        self.i += 1
        out: list[str] = []
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "\\" and self.i + 1 < len(s):
                nxt = s[self.i + 1]
                out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
                self.i += 2
                continue
            if c == quote:
                self.i += 1
                return "".join(out)
            out.append(c)
            self.i += 1
        raise ParseError("unterminated quoted string", start)


def parse_condition(src: Source) -> Node:
    """Parse ``src.text``; raises ParseError with the offset of the fault."""
    return _Parser(src).parse()


def unquote_list_item(item: str) -> str:
    """A list item as a value: items written with explicit quotes ('"a b"') lose them, as in Falco."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
        body = item[1:-1]
        return body.replace('\\"', '"').replace("\\'", "'")
    return item

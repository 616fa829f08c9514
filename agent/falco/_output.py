"""Output strings: ``%field`` and ``%(field)`` substitution, ``<NA>`` for missing values."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent._text import escape_controls
from agent.falco._ast import ParseError as _ParseError
from agent.falco._ast import Source, _Parser
from agent.falco._fields import BoundField, FieldError, bind_field

_TOKEN = re.compile(r"%(?:\(([^)]*)\)|([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+(?:\[[^\]]*\])?))")
NA = "<NA>"


@dataclass(frozen=True, slots=True)
class OutputField:
    text: str  # as written in the output (e.g. proc.aname[2])
    offset: int  # where in the output string
    bound: BoundField | None
    error: str = ""
    transform: Callable[[Any], Any] | None = None


def render_value(v: Any) -> str:
    if v is None:
        return NA
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ",".join(render_value(x) for x in v)
    return escape_controls(str(v))  # the line stays one line; output_fields keep the exact value


def json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [json_value(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


class OutputFormat:
    """A compiled output string: literal parts and field extractors, in order."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[str] = []
        self.fields: list[OutputField] = []
        pos = 0
        for m in _TOKEN.finditer(text):
            self.parts.append(text[pos : m.start()])
            ref = (m.group(1) or m.group(2) or "").strip()
            self.fields.append(_bind_output_field(ref, m.start()))
            pos = m.end()
        self.parts.append(text[pos:])
        self._names = [f.text for f in self.fields]

    def errors(self) -> list[OutputField]:
        return [f for f in self.fields if f.error]

    def render(self, ctx: Any) -> tuple[str, dict[str, Any]]:
        values: dict[str, Any] = {}
        out = [self.parts[0]]
        for i, f in enumerate(self.fields):
            v = f.bound.extractor(ctx) if f.bound is not None else None
            if v is not None and f.transform is not None:
                v = f.transform(v)
            values[f.text] = json_value(v)
            out.append(render_value(v))
            out.append(self.parts[i + 1])
        return "".join(out), values


def _bind_output_field(ref: str, offset: int) -> OutputField:
    from agent.falco._compiler import _TRANSFORMS  # late: the compiler imports this module's users

    src = Source(ref, "output", "", ((0, _NOWHERE),))
    try:
        fe = _Parser(src).parse_field()
    except _ParseError as err:
        return OutputField(ref, offset, None, err.message)
    try:
        bound = bind_field(fe.name, fe.arg)
    except FieldError as err:
        return OutputField(ref, offset, None, str(err))
    transform: Callable[[Any], Any] | None = None
    for tr in fe.transformers:
        fn = len if tr == "len" else _TRANSFORMS[tr]
        transform = fn if transform is None else (lambda v, a=transform, b=fn: b(a(v)))
    return OutputField(ref, offset, bound, "", transform)


def _nowhere() -> Any:
    from agent.falco._diag import Place

    return Place("<output>", 0, 0)


_NOWHERE = _nowhere()

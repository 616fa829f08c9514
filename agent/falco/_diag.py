"""Diagnostics: every problem found while loading rules, collected rather than raised one by one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]
_WIDTH = 100


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One error or warning, about one place in one file.

    ``item_kind``/``item_name`` name the YAML item (``rule``/``macro``/``list``/...; empty for a file-level
    problem). For condition errors ``condition`` is the condition text and ``offset`` the index of the fault
    inside it (-1 when the whole item is at fault).
    """

    severity: Severity
    file: str
    line: int
    col: int
    message: str
    item_kind: str = ""
    item_name: str = ""
    code: str = ""
    condition: str = ""
    offset: int = -1

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def caret_lines(self) -> list[str]:
        """The condition line holding the fault and a caret under it (empty when there is no condition)."""
        if not self.condition or self.offset < 0:
            return []
        text = self.condition
        offset = min(self.offset, len(text))
        start = text.rfind("\n", 0, offset) + 1
        end = text.find("\n", offset)
        line = text[start : end if end >= 0 else len(text)]
        col = offset - start
        if len(line) > _WIDTH:  # show a window around the fault of a long line
            left = max(0, min(col - _WIDTH // 2, len(line) - _WIDTH))
            line = ("..." if left else "") + line[left : left + _WIDTH] + ("..." if left + _WIDTH < len(line) else "")
            col = col - left + (3 if left else 0)
        return [f"    {line}", "    " + " " * col + "^"]

    def to_text(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        item = f"{self.item_kind} '{self.item_name}': " if self.item_kind else ""
        return "\n".join([f"{where}: {self.severity}: {item}{self.message}", *self.caret_lines()])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "item": {"kind": self.item_kind, "name": self.item_name} if self.item_kind else None,
            "code": self.code,
            "message": self.message,
        }
        if self.condition:
            out["condition"] = self.condition
            out["offset"] = self.offset
        return out


@dataclass(frozen=True, slots=True)
class Place:
    """Where an item (or one of its keys) sits in its file, and how to map a condition offset into it."""

    file: str
    line: int  # 1-based
    col: int  # 1-based
    # For a condition scalar: source lines of the value with their 1-based line and the column of their
    # first character, used to map an offset inside the (folded) value back to the file.
    segments: tuple[tuple[int, int, int], ...] = ()  # (value_offset, line, col)

    def at(self, offset: int) -> tuple[int, int]:
        if offset < 0 or not self.segments:
            return self.line, self.col
        best = self.segments[0]
        for seg in self.segments:
            if seg[0] <= offset:
                best = seg
            else:
                break
        return best[1], best[2] + (offset - best[0])

"""Text that a watched process chose (its command line, a path, its comm), made safe to print on one line."""

from __future__ import annotations

# C0 controls, DEL and C1 controls as escapes: a newline in an argument must not start a forged alert line
# in a console or a log, nor an ESC sequence repaint the operator's terminal.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``); everything else kept."""
    return text.translate(_ESCAPES)

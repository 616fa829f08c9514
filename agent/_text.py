"""Text that a watched process chose (its command line, a path, its comm), made safe to print on one line."""

from __future__ import annotations

# C0 controls, DEL and C1 controls as escapes: a newline in an argument must not start a forged alert line
# in a console or a log, nor an ESC sequence repaint the operator's terminal. Line and paragraph separators
# and bidirectional overrides too (they reorder or break what the reader sees). The backslash is left as it
# is, so that escaping twice (a rule's output, then the console) changes nothing: a literal "\n" in an
# argument reads like an escaped newline here, and output_fields hold the exact text.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``); everything else kept."""
    return text.translate(_ESCAPES)

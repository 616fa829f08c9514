"""Reader: a Falco rules file -> items with the line/col of every key (PyYAML compose keeps node marks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from agent.falco._diag import Diagnostic, Place

if TYPE_CHECKING:
    _Base = yaml.SafeLoader
else:  # libyaml's loader when PyYAML was built with it: several times faster on large rule files
    _Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):
    """Safe loading, plus a bare `=` (YAML 1.1's "value" tag, as in `comps: [=, in]`) read as the string."""


def _value_as_string(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    return loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None


_Loader.add_constructor("tag:yaml.org,2002:value", _value_as_string)

ITEM_KINDS = ("rule", "macro", "list", "required_engine_version", "required_plugin_versions")


@dataclass(slots=True)
class RawItem:
    """One top-level item: its kind and name, its constructed values, and where each key sits."""

    kind: str
    name: str
    data: dict[str, Any]
    place: Place
    key_places: dict[str, Place] = field(default_factory=dict)

    def where(self, key: str) -> Place:
        return self.key_places.get(key, self.place)


def _place(path: str, node: yaml.Node) -> Place:
    return Place(path, node.start_mark.line + 1, node.start_mark.column + 1)


def _scalar_place(path: str, text: str, node: yaml.Node) -> Place:
    """A scalar's place plus the segments that map offsets of its (folded) value back to lines."""
    start, end = node.start_mark.index, node.end_mark.index
    line0, col0 = node.start_mark.line + 1, node.start_mark.column + 1
    lines = text[start:end].split("\n")
    segments: list[tuple[int, int, int]] = []
    offset = 0
    style = getattr(node, "style", None)
    if style in (">", "|"):
        for i, raw in enumerate(lines[1:], start=1):
            stripped = raw.lstrip(" ")
            if stripped:
                segments.append((offset, line0 + i, len(raw) - len(stripped) + 1))
                offset += len(stripped) + 1
    else:
        quote = 1 if style in ('"', "'") else 0
        for i, raw in enumerate(lines):
            if i == 0:
                segments.append((offset, line0, col0 + quote))
                offset += len(raw) - quote + 1
            else:
                stripped = raw.lstrip(" \t")
                segments.append((offset, line0 + i, len(raw) - len(stripped) + 1))
                offset += len(stripped) + 1
    return Place(path, line0, col0, tuple(segments))


def read_rules_text(path: str, text: str) -> tuple[list[RawItem], list[Diagnostic]]:
    """Parse one file's text. YAML and shape errors become diagnostics, never exceptions."""
    diags: list[Diagnostic] = []
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = err.problem or err.context or "invalid YAML"
        diags.append(Diagnostic("error", path, line, col, f"invalid YAML: {problem}", code="yaml"))
        return [], diags
    except yaml.YAMLError as err:
        diags.append(Diagnostic("error", path, 1, 1, f"invalid YAML: {err}", code="yaml"))
        return [], diags
    finally:
        loader.dispose()
    if root is None:
        return [], diags
    if not isinstance(root, yaml.SequenceNode):
        p = _place(path, root)
        diags.append(Diagnostic("error", path, p.line, p.col, "a rules file must be a YAML list of items",
                                code="shape"))
        return [], diags
    constructor = _Loader("")
    items: list[RawItem] = []
    for node in root.value:
        p = _place(path, node)
        if not isinstance(node, yaml.MappingNode):
            diags.append(Diagnostic("error", path, p.line, p.col, "an item must be a mapping", code="shape"))
            continue
        data: dict[str, Any] = {}
        key_places: dict[str, Place] = {}
        bad = False
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                kp = _place(path, key_node)
                diags.append(Diagnostic("error", path, kp.line, kp.col, "item keys must be strings", code="shape"))
                bad = True
                continue
            try:
                data[key] = constructor.construct_object(value_node, deep=True)
            except yaml.YAMLError as err:
                vp = _place(path, value_node)
                diags.append(Diagnostic("error", path, vp.line, vp.col, f"invalid value for '{key}': {err}",
                                        code="yaml"))
                bad = True
                continue
            if isinstance(value_node, yaml.ScalarNode):
                key_places[key] = _scalar_place(path, text, value_node)
            else:
                key_places[key] = _place(path, value_node)
        if bad:
            continue
        kind = next((k for k in ITEM_KINDS if k in data), "")
        if not kind:
            keys = ", ".join(sorted(data)) or "nothing"
            diags.append(Diagnostic("error", path, p.line, p.col,
                                    f"unknown item (has {keys}); expected one of {', '.join(ITEM_KINDS)}",
                                    code="unknown-item"))
            continue
        name = data[kind]
        items.append(RawItem(kind, name if isinstance(name, str) else str(name), data, p, key_places))
    constructor.dispose()
    return items, diags

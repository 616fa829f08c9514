"""Collector: items from the reader -> lists, macros and rules, with appends, overrides and exceptions applied.

Falco's semantics: a later definition of a list/macro/rule replaces the earlier one; ``append: true``
(deprecated) and ``override: {key: append|replace}`` change an existing one; exceptions with the same name
merge their values. Later stages resolve names, so items may be used before they are defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.falco._diag import Diagnostic, Place
from agent.falco._reader import RawItem

ENGINE_VERSION = (0, 57, 0)
PRIORITIES = {
    "emergency": "Emergency", "alert": "Alert", "critical": "Critical", "error": "Error",
    "warning": "Warning", "notice": "Notice", "informational": "Informational", "info": "Informational",
    "debug": "Debug",
}
# Plugins whose fields Sysgram provides itself.
NATIVE_PLUGINS = {"container"}

RULE_KEYS = {"rule", "condition", "output", "desc", "priority", "tags", "enabled", "source", "exceptions",
             "append", "override", "warn_evttypes", "skip-if-unknown-filter", "required_engine_version",
             "output_fields", "capture", "capture_duration"}
MACRO_KEYS = {"macro", "condition", "append", "override", "source", "required_engine_version"}
LIST_KEYS = {"list", "items", "append", "override", "source", "required_engine_version"}
OVERRIDE_APPEND = {"rule": {"condition", "output", "desc", "tags", "exceptions"},
                   "macro": {"condition"}, "list": {"items"}}
OVERRIDE_REPLACE = {"rule": {"condition", "output", "desc", "priority", "tags", "exceptions", "enabled",
                             "warn_evttypes", "skip-if-unknown-filter", "source", "capture", "capture_duration"},
                    "macro": {"condition"}, "list": {"items"}}


@dataclass(slots=True)
class TextChunks:
    """A condition possibly built from several items: text plus (offset, place) of each part."""

    text: str
    chunks: list[tuple[int, Place]]

    def append(self, more: str, place: Place) -> None:
        start = len(self.text) + 1
        self.text = f"{self.text} {more}"
        self.chunks.append((start, place))


@dataclass(slots=True)
class ListDef:
    name: str
    items: list[Any]
    place: Place


@dataclass(slots=True)
class MacroDef:
    name: str
    condition: TextChunks
    place: Place


@dataclass(slots=True)
class ExceptionDef:
    name: str
    fields: Any
    comps: Any
    values: list[Any]
    place: Place


@dataclass(slots=True)
class RuleDef:
    name: str
    place: Place
    condition: TextChunks
    output: str
    output_place: Place
    desc: str
    priority: str
    tags: tuple[str, ...]
    enabled: bool
    source: str
    exceptions: list[ExceptionDef] = field(default_factory=list)
    warn_evttypes: bool = True
    skip_if_unknown_filter: bool = False
    file: str = ""


@dataclass(slots=True)
class Collected:
    lists: dict[str, ListDef] = field(default_factory=dict)
    macros: dict[str, MacroDef] = field(default_factory=dict)
    rules: dict[str, RuleDef] = field(default_factory=dict)  # insertion order = rule order
    skipped_sources: dict[str, str] = field(default_factory=dict)  # rule name -> its non-syscall source
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> {"rules","macros","lists"}


def parse_version(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (0, value, 0)
    if isinstance(value, str):
        parts = value.strip().split(".")
        if parts and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return None


class Collector:
    def __init__(self) -> None:
        self.out = Collected()
        self.diags: list[Diagnostic] = []

    # -- diagnostics
    def _diag(self, severity: str, place: Place, message: str, item: RawItem | None, code: str) -> None:
        kind, name = (item.kind, item.name) if item is not None else ("", "")
        self.diags.append(Diagnostic(severity, place.file, place.line, place.col, message,  # type: ignore[arg-type]
                                     kind, name, code))

    def error(self, place: Place, message: str, item: RawItem | None = None, code: str = "invalid") -> None:
        self._diag("error", place, message, item, code)

    def warn(self, place: Place, message: str, item: RawItem | None = None, code: str = "warning") -> None:
        self._diag("warning", place, message, item, code)

    # -- items
    def add(self, items: list[RawItem], path: str) -> None:
        counts = self.out.counts.setdefault(path, {"rules": 0, "macros": 0, "lists": 0})
        for item in items:
            handler = getattr(self, "_" + item.kind)
            before = len(self.diags)
            handler(item)
            if item.kind in ("rule", "macro", "list") and not any(d.is_error for d in self.diags[before:]):
                counts[item.kind + "s"] += 1

    def _required_engine_version(self, item: RawItem) -> None:
        want = parse_version(item.data["required_engine_version"])
        place = item.where("required_engine_version")
        if want is None:
            self.error(place, f"invalid required_engine_version {item.data['required_engine_version']!r}", item,
                       "bad-version")
        elif want > ENGINE_VERSION:
            have = ".".join(map(str, ENGINE_VERSION))
            self.error(place, f"rules require engine version {item.data['required_engine_version']}, "
                              f"Sysgram's engine is {have}", item, "engine-version")

    def _required_plugin_versions(self, item: RawItem) -> None:
        value = item.data["required_plugin_versions"]
        place = item.where("required_plugin_versions")
        if not isinstance(value, list):
            self.error(place, "required_plugin_versions must be a list", item, "shape")
            return
        for entry in value:
            if not isinstance(entry, dict) or "name" not in entry or "version" not in entry:
                self.error(place, "each required plugin needs a name and a version", item, "shape")
                continue
            alternatives = entry.get("alternatives") or []
            if not isinstance(alternatives, list):
                self.error(place, f"plugin '{entry['name']}': alternatives must be a list", item, "shape")
                continue
            names = {str(entry["name"])} | {str(a.get("name")) for a in alternatives if isinstance(a, dict)}
            if not names & NATIVE_PLUGINS:
                self.warn(place, f"plugin '{entry['name']}' is not available in Sysgram; rules of its source "
                                 "are skipped", item, "plugin")

    def _check_keys(self, item: RawItem, allowed: set[str]) -> None:
        for key in item.data:
            if key not in allowed:
                self.warn(item.where(key), f"unknown key '{key}' in {item.kind} (ignored)", item, "unknown-key")

    def _override(self, item: RawItem) -> dict[str, str] | None:
        """The override mapping key -> append|replace, validated; None when the item has none."""
        if "override" not in item.data:
            return None
        ov = item.data["override"]
        place = item.where("override")
        if not isinstance(ov, dict) or not ov:
            self.error(place, "override must be a mapping of key: append|replace", item, "bad-override")
            return {}
        out: dict[str, str] = {}
        for key, how in ov.items():
            allowed = OVERRIDE_APPEND[item.kind] if how == "append" else OVERRIDE_REPLACE[item.kind]
            if how not in ("append", "replace"):
                self.error(place, f"override of '{key}' must be append or replace, not {how!r}", item,
                           "bad-override")
            elif key not in allowed:
                self.error(place, f"'{key}' cannot be overridden with {how} in a {item.kind}", item, "bad-override")
            elif key not in item.data:
                self.error(place, f"override names '{key}' but the item has no '{key}'", item, "bad-override")
            else:
                out[key] = how
        if item.data.get("append") is True:
            self.error(place, "an item cannot have both append: true and override", item, "bad-override")
        return out

    def _source_ok(self, item: RawItem) -> bool:
        source = item.data.get("source", "syscall")
        if source != "syscall":
            if item.kind == "rule":
                self.out.skipped_sources[item.name] = str(source)
            self.warn(item.where("source"), f"{item.kind} of source '{source}' skipped (Sysgram evaluates "
                                            "syscall rules only)", item, "source")
            return False
        return True

    def _list(self, item: RawItem) -> None:
        self._check_keys(item, LIST_KEYS)
        if not self._source_ok(item):
            return
        ov = self._override(item)
        items = item.data.get("items")
        if items is None:
            items = []
            if "items" not in item.data:
                self.error(item.place, "list has no 'items'", item, "missing-key")
                return
        if not isinstance(items, list):
            self.error(item.where("items"), "list 'items' must be a YAML list", item, "shape")
            return
        existing = self.out.lists.get(item.name)
        appending = item.data.get("append") is True or (ov is not None and ov.get("items") == "append")
        if ov is not None and not ov:
            return
        if appending or ov is not None:
            if existing is None:
                self.error(item.place, f"list '{item.name}' does not exist, cannot {'append to' if appending else 'override'} it",
                           item, "unknown-list")
                return
            if appending:
                existing.items = existing.items + items
            else:
                existing.items = list(items)
            return
        self.out.lists[item.name] = ListDef(item.name, list(items), item.place)

    def _macro(self, item: RawItem) -> None:
        self._check_keys(item, MACRO_KEYS)
        if not self._source_ok(item):
            return
        ov = self._override(item)
        cond = item.data.get("condition")
        if not isinstance(cond, str) or not cond.strip():
            self.error(item.where("condition") if "condition" in item.data else item.place,
                       "macro needs a non-empty 'condition' string", item, "missing-key")
            return
        existing = self.out.macros.get(item.name)
        appending = item.data.get("append") is True or (ov is not None and ov.get("condition") == "append")
        if ov is not None and not ov:
            return
        place = item.where("condition")
        if appending or ov is not None:
            if existing is None:
                self.error(item.place, f"macro '{item.name}' does not exist, cannot {'append to' if appending else 'override'} it",
                           item, "unknown-macro")
                return
            if appending:
                existing.condition.append(cond, place)
            else:
                existing.condition = TextChunks(cond, [(0, place)])
            return
        self.out.macros[item.name] = MacroDef(item.name, TextChunks(cond, [(0, place)]), item.place)

    def _rule(self, item: RawItem) -> None:
        self._check_keys(item, RULE_KEYS)
        data = item.data
        if "source" in data and data["source"] != "syscall":
            self._source_ok(item)
            return
        ov = self._override(item)
        if ov is not None and not ov:
            return
        existing = self.out.rules.get(item.name)
        if data.get("append") is True:
            ov = {k: "append" for k in ("condition", "output", "desc", "tags", "exceptions") if k in data}
        if ov is not None:
            if existing is None:
                if item.name in self.out.skipped_sources:
                    return
                self.error(item.place, f"rule '{item.name}' does not exist, cannot append to or override it",
                           item, "unknown-rule")
                return
            self._apply_override(existing, item, ov)
            return
        if existing is not None and set(data) <= {"rule", "enabled"}:
            # The old shorthand `- rule: X / enabled: false` only toggles an existing rule.
            self._set_enabled(existing, item)
            return
        missing = [k for k in ("condition", "output", "desc", "priority") if k not in data]
        if set(data) <= {"rule", "enabled"} and existing is None:
            self.error(item.place, f"rule '{item.name}' does not exist, cannot enable/disable it", item,
                       "unknown-rule")
            return
        if missing:
            self.error(item.place, f"rule is missing {', '.join(repr(m) for m in missing)}", item, "missing-key")
            return
        rule = self._new_rule(item)
        if rule is not None:
            self.out.rules.pop(item.name, None)
            self.out.rules[item.name] = rule

    def _priority(self, item: RawItem) -> str | None:
        value = item.data.get("priority")
        canon = PRIORITIES.get(str(value).strip().lower()) if isinstance(value, str) else None
        if canon is None:
            self.error(item.where("priority"), f"invalid priority {value!r} (expected one of Emergency, Alert, "
                                               "Critical, Error, Warning, Notice, Informational, Debug)", item,
                       "bad-priority")
        return canon

    def _strings(self, item: RawItem, key: str) -> str | None:
        value = item.data.get(key)
        if not isinstance(value, str):
            self.error(item.where(key), f"'{key}' must be a string", item, "shape")
            return None
        return value

    def _bool(self, item: RawItem, key: str, default: bool) -> bool:
        value = item.data.get(key, default)
        if not isinstance(value, bool):
            self.error(item.where(key), f"'{key}' must be true or false", item, "shape")
            return default
        return value

    def _tags(self, item: RawItem) -> tuple[str, ...]:
        value = item.data.get("tags", [])
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error(item.where("tags"), "'tags' must be a list", item, "shape")
            return ()
        return tuple(str(t) for t in value)

    def _exceptions(self, item: RawItem) -> list[ExceptionDef]:
        value = item.data.get("exceptions", [])
        place = item.where("exceptions")
        out: list[ExceptionDef] = []
        if value is None:
            return out
        if not isinstance(value, list):
            self.error(place, "'exceptions' must be a list", item, "shape")
            return out
        for exc in value:
            if not isinstance(exc, dict) or not isinstance(exc.get("name"), str):
                self.error(place, "each exception needs a 'name'", item, "bad-exception")
                continue
            fields = exc.get("fields")
            comps = exc.get("comps")
            values = exc.get("values", []) or []
            if fields is not None and not isinstance(fields, str | list):
                self.error(place, f"exception '{exc['name']}': fields must be a string or a list", item,
                           "bad-exception")
                continue
            if isinstance(fields, list) and comps is not None and (not isinstance(comps, list)
                                                                   or len(comps) != len(fields)):
                self.error(place, f"exception '{exc['name']}': comps must be a list as long as fields", item,
                           "bad-exception")
                continue
            if not isinstance(values, list):
                self.error(place, f"exception '{exc['name']}': values must be a list", item, "bad-exception")
                continue
            if isinstance(fields, list):
                bad = [v for v in values if not isinstance(v, list) or len(v) != len(fields)]
                if bad:
                    self.error(place, f"exception '{exc['name']}': each value must be a list of "
                                      f"{len(fields)} item(s), got {bad[0]!r}", item, "bad-exception")
                    continue
            out.append(ExceptionDef(exc["name"], fields, comps, list(values), place))
        return out

    def _new_rule(self, item: RawItem) -> RuleDef | None:
        before = len(self.diags)
        cond = self._strings(item, "condition")
        output = self._strings(item, "output")
        desc = item.data.get("desc")
        priority = self._priority(item)
        tags = self._tags(item)
        enabled = self._bool(item, "enabled", True)
        warn = self._bool(item, "warn_evttypes", True)
        skip = self._bool(item, "skip-if-unknown-filter", False)
        exceptions = self._exceptions(item)
        if any(d.is_error for d in self.diags[before:]) or cond is None or output is None or priority is None:
            return None
        return RuleDef(item.name, item.place, TextChunks(cond, [(0, item.where("condition"))]), output,
                       item.where("output"), str(desc or ""), priority, tags, enabled, "syscall", exceptions,
                       warn, skip, item.place.file)

    def _set_enabled(self, rule: RuleDef, item: RawItem) -> None:
        rule.enabled = self._bool(item, "enabled", rule.enabled)

    def _apply_override(self, rule: RuleDef, item: RawItem, ov: dict[str, str]) -> None:
        data = item.data
        for key, how in ov.items():
            value = data[key]
            place = item.where(key)
            if key == "condition":
                if not isinstance(value, str):
                    self.error(place, "'condition' must be a string", item, "shape")
                elif how == "append":
                    rule.condition.append(value, place)
                else:
                    rule.condition = TextChunks(value, [(0, place)])
            elif key == "output":
                text = self._strings(item, key)
                if text is not None:
                    rule.output = f"{rule.output} {text}" if how == "append" else text
                    rule.output_place = place
            elif key == "desc":
                rule.desc = f"{rule.desc} {value}" if how == "append" else str(value)
            elif key == "tags":
                tags = self._tags(item)
                rule.tags = tuple(dict.fromkeys((*rule.tags, *tags))) if how == "append" else tags
            elif key == "priority":
                pr = self._priority(item)
                if pr is not None:
                    rule.priority = pr
            elif key == "enabled":
                self._set_enabled(rule, item)
            elif key == "warn_evttypes":
                rule.warn_evttypes = self._bool(item, key, rule.warn_evttypes)
            elif key == "skip-if-unknown-filter":
                rule.skip_if_unknown_filter = self._bool(item, key, rule.skip_if_unknown_filter)
            elif key == "exceptions":
                new = self._exceptions(item)
                if how == "replace":
                    rule.exceptions = new
                    continue
                by_name = {e.name: e for e in rule.exceptions}
                for exc in new:
                    old = by_name.get(exc.name)
                    if old is None:
                        if exc.fields is None:
                            self.error(place, f"exception '{exc.name}' is new, it needs 'fields'", item,
                                       "bad-exception")
                            continue
                        rule.exceptions.append(exc)
                        by_name[exc.name] = exc
                    else:
                        old.values = old.values + exc.values
        if "enabled" in data and "enabled" not in ov:
            self._set_enabled(rule, item)

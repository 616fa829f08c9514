"""The alert as it leaves the agent: Falco's JSON shape, and an OCSF Detection Finding mapping."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from agent import __version__

Priority = Literal["Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug"]
# Most severe first, as Falco orders them.
PRIORITIES: tuple[Priority, ...] = (
    "Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug",
)
_PRIORITY_BY_LOWER: dict[str, Priority] = {p.lower(): p for p in PRIORITIES}
# Falco's rule files also accept these spellings.
_PRIORITY_BY_LOWER.update({"info": "Informational", "warn": "Warning", "crit": "Critical", "err": "Error"})

AlertFormat = Literal["falco", "ocsf"]
ALERT_FORMATS: tuple[AlertFormat, ...] = ("falco", "ocsf")

SYSGRAM_SOURCE = "sysgram"
INTERNAL_TAG = "sysgram_internal"

# OCSF severity_id: 1 Informational, 2 Low, 3 Medium, 4 High, 5 Critical, 6 Fatal.
_OCSF_SEVERITY: dict[Priority, tuple[int, str]] = {
    "Emergency": (6, "Fatal"),
    "Alert": (5, "Critical"),
    "Critical": (5, "Critical"),
    "Error": (4, "High"),
    "Warning": (3, "Medium"),
    "Notice": (2, "Low"),
    "Informational": (1, "Informational"),
    "Debug": (1, "Informational"),
}
OCSF_SCHEMA_VERSION = "1.3.0"
OCSF_DETECTION_FINDING = 2004
OCSF_FINDINGS_CATEGORY = 2

_TIME_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?$"
)


def parse_priority(text: str) -> Priority | None:
    """Falco's priority spelling for ``text`` (any case, short forms too), or None."""
    return _PRIORITY_BY_LOWER.get(text.strip().lower())


def format_time(ns: int) -> str:
    """UTC ISO-8601 with nanoseconds, as Falco writes it: ``2026-11-26T13:45:02.123456789Z``."""
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac:09d}Z"


def parse_time(text: str) -> int | None:
    """Nanoseconds since the epoch for an ISO-8601 time (any fraction length, Z or an offset), or None."""
    match = _TIME_RE.match(text.strip())
    if match is None:
        return None
    day, clock, frac, zone = match.groups()
    try:
        base = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if zone in (None, 'Z') else zone}")
    except ValueError:
        return None
    return int(base.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def sysgram_fields(
    *,
    score: float | None = None,
    threshold: float | None = None,
    window: Sequence[str] | None = None,
    explanation: str | None = None,
    verdict: str | None = None,
    action: str | None = None,
) -> dict[str, Any]:
    """Sysgram's own output fields (``sysgram.*``), leaving out those not given."""
    values: dict[str, Any] = {
        "sysgram.score": score,
        "sysgram.threshold": threshold,
        "sysgram.window": list(window) if window is not None else None,
        "sysgram.explanation": explanation,
        "sysgram.verdict": verdict,
        "sysgram.action": action,
    }
    return {k: v for k, v in values.items() if v is not None}


_HOSTNAME = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert, in Falco's JSON shape so Falcosidekick and other Falco consumers take it unchanged.

    ``time`` is UTC ISO-8601 with nine fractional digits; Sysgram's own fields are in ``output_fields``
    under ``sysgram.*`` (see :func:`sysgram_fields`).
    """

    uuid: str
    time: str
    rule: str
    priority: Priority
    output: str
    output_fields: Mapping[str, Any] = field(default_factory=dict)
    source: str = SYSGRAM_SOURCE
    tags: tuple[str, ...] = ()
    hostname: str = _HOSTNAME

    @classmethod
    def new(
        cls,
        rule: str,
        priority: Priority,
        output: str,
        output_fields: Mapping[str, Any] | None = None,
        *,
        source: str = SYSGRAM_SOURCE,
        tags: Sequence[str] = (),
        time_ns: int | None = None,
        hostname: str | None = None,
    ) -> Alert:
        """A fresh alert with a new uuid, stamped now unless ``time_ns`` (ns since the epoch) is given."""
        return cls(
            uuid=str(uuidlib.uuid4()),
            time=format_time(time.time_ns() if time_ns is None else time_ns),
            rule=rule,
            priority=priority,
            output=output,
            output_fields=dict(output_fields or {}),
            source=source,
            tags=tuple(tags),
            hostname=_HOSTNAME if hostname is None else hostname,
        )

    @property
    def time_ns(self) -> int:
        ns = parse_time(self.time)
        return 0 if ns is None else ns

    @property
    def is_internal(self) -> bool:
        return INTERNAL_TAG in self.tags

    def to_falco(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "time": self.time,
            "rule": self.rule,
            "priority": self.priority,
            "output": self.output,
            "output_fields": dict(self.output_fields),
            "source": self.source,
            "tags": list(self.tags),
            "hostname": self.hostname,
        }

    def to_ocsf(self) -> dict[str, Any]:
        return ocsf_finding(self)

    def to_dict(self, fmt: AlertFormat = "falco") -> dict[str, Any]:
        return self.to_ocsf() if fmt == "ocsf" else self.to_falco()

    def to_json(self, fmt: AlertFormat = "falco") -> str:
        """One line of JSON (no newline inside); values JSON cannot hold are written as strings."""
        return json.dumps(self.to_dict(fmt), separators=(",", ":"), ensure_ascii=False, default=str)


def internal_alert(rule: str, priority: Priority, output: str, **fields: Any) -> Alert:
    """An alert about Sysgram itself (a disabled webhook, an overflowing spool...)."""
    return Alert.new(
        rule, priority, output, {f"sysgram.{k}": v for k, v in fields.items()}, tags=(INTERNAL_TAG,)
    )


def _int_field(fields: Mapping[str, Any], key: str) -> int | None:
    value = fields.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def _process_evidence(fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """OCSF Process object from Falco's proc.* / user.* / container.* fields, when there are any."""
    process: dict[str, Any] = {}
    if (pid := _int_field(fields, "proc.pid")) is not None:
        process["pid"] = pid
    if (tid := _int_field(fields, "thread.tid")) is not None:
        process["tid"] = tid
    if isinstance(name := fields.get("proc.name"), str):
        process["name"] = name
    if isinstance(cmdline := fields.get("proc.cmdline"), str):
        process["cmd_line"] = cmdline
    exe = fields.get("proc.exepath") or fields.get("proc.exe")
    if isinstance(exe, str) and exe:
        process["file"] = {"path": exe, "name": exe.rsplit("/", 1)[-1], "type_id": 1}
    if isinstance(cwd := fields.get("proc.cwd"), str):
        process["working_directory"] = cwd
    parent: dict[str, Any] = {}
    if (ppid := _int_field(fields, "proc.ppid")) is not None:
        parent["pid"] = ppid
    if isinstance(pname := fields.get("proc.pname"), str):
        parent["name"] = pname
    if parent:
        process["parent_process"] = parent
    user: dict[str, Any] = {}
    if isinstance(uname := fields.get("user.name"), str):
        user["name"] = uname
    if (uid := _int_field(fields, "user.uid")) is not None:
        user["uid"] = str(uid)
    if user:
        process["user"] = user
    if isinstance(cid := fields.get("container.id"), str) and cid and cid != "host":
        process["container"] = {"uid": cid}
    return process or None


def ocsf_finding(alert: Alert) -> dict[str, Any]:
    """The alert as an OCSF Detection Finding (class 2004, category Findings)."""
    severity_id, severity = _OCSF_SEVERITY[alert.priority]
    time_ms = alert.time_ns // 1_000_000
    activity_id = 1  # Create
    finding: dict[str, Any] = {
        "class_uid": OCSF_DETECTION_FINDING,
        "class_name": "Detection Finding",
        "category_uid": OCSF_FINDINGS_CATEGORY,
        "category_name": "Findings",
        "activity_id": activity_id,
        "activity_name": "Create",
        "type_uid": OCSF_DETECTION_FINDING * 100 + activity_id,
        "severity_id": severity_id,
        "severity": severity,
        "status_id": 1,  # New
        "status": "New",
        "time": time_ms,
        "message": alert.output,
        "is_alert": True,
        "metadata": {
            "version": OCSF_SCHEMA_VERSION,
            "uid": alert.uuid,
            "product": {"name": "Sysgram", "vendor_name": "Sysgram", "version": __version__},
            "original_time": alert.time,
        },
        "finding_info": {
            "uid": alert.uuid,
            "title": alert.rule,
            "desc": alert.output,
            "types": list(alert.tags),
            "created_time": time_ms,
            "analytic": {"name": alert.rule, "type_id": 1, "type": "Rule"},
        },
        "device": {"hostname": alert.hostname, "type_id": 0},
        "unmapped": {
            "source": alert.source,
            "priority": alert.priority,
            "output_fields": dict(alert.output_fields),
        },
    }
    process = _process_evidence(alert.output_fields)
    if process is not None:
        finding["evidences"] = [{"process": process}]
    score = alert.output_fields.get("sysgram.score")
    if isinstance(score, int | float) and not isinstance(score, bool):
        # The anomaly score is the closest thing to a risk score OCSF has.
        finding["risk_details"] = f"anomaly score {score}"
    return finding

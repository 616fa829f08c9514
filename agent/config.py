"""The agent's YAML config (``sysgram run --config FILE``).

Every key is checked: an unknown key or a value of the wrong type is one :class:`ConfigError` naming the
file and the YAML line. Sections owned by other rooms (``outputs``, ``seccomp``, ``verdict``) are checked by
those rooms; their errors carry a dotted key path, which is mapped back to its line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from agent.errors import ConfigError


@dataclass(frozen=True, slots=True)
class EnforceConfig:
    """Blocking. Off unless ``enabled`` (or ``--enforce``); never PID 1, the agent, its ancestors,
    kernel threads, or anything allow-listed."""

    enabled: bool = False
    allow_exes: tuple[str, ...] = ()
    allow_pids: tuple[int, ...] = ()
    block_rules: tuple[str, ...] = ()  # rule names whose matches block (besides rules tagged sysgram.block)
    block_tags: tuple[str, ...] = ("sysgram.block",)
    block_min_priority: str = ""  # e.g. "Critical": rules at or above block; "" = only by name/tag
    block_anomaly_score: float = 0.0  # >0: an anomaly at or above this score (with a rule match) blocks
    action: str = "kill"  # kill | stop
    deny_syscalls: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # exe -> syscalls killed in-kernel


@dataclass(frozen=True, slots=True)
class ContainerRuntimeConfig:
    """Where container.name / image / privileged come from (see docs/process-table.md). A socket that is
    absent is skipped; "" turns that runtime off."""

    enabled: bool = True
    docker_socket: str = "/var/run/docker.sock"
    podman_socket: str = "/run/podman/podman.sock"
    timeout: float = 0.2  # per request to the runtime
    retry_after: float = 30.0  # a socket that failed is left alone this long


@dataclass(frozen=True, slots=True)
class AgentConfig:
    source: str = "<defaults>"
    state_dir: str = "/var/lib/sysgram"
    model: str = ""
    rules: tuple[str, ...] = ()
    default_rules: bool = True
    rule_matching: str = "all"
    flush_interval: float = 0.02
    queue_max_events: int = 2_000_000  # events the capture queue holds before it drops (overload)
    detail_syscalls: tuple[str, ...] = ()  # in addition to those the rules and policies need
    enforce: EnforceConfig = field(default_factory=EnforceConfig)
    container_runtime: ContainerRuntimeConfig = field(default_factory=ContainerRuntimeConfig)
    outputs: Mapping[str, Any] = field(default_factory=dict)
    seccomp: Mapping[str, Any] = field(default_factory=dict)
    verdict: Mapping[str, Any] = field(default_factory=dict)
    marks: Mapping[str, int] = field(default_factory=dict)  # dotted key -> YAML line

    def line_of(self, key_path: str) -> int | None:
        while key_path:
            if key_path in self.marks:
                return self.marks[key_path]
            key_path = key_path.rpartition(".")[0]
        return None

    def error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(f"{key_path}: {message}", path=self.source, line=self.line_of(key_path))


_TOP = {
    "state_dir": str,
    "model": str,
    "rules": list,
    "default_rules": bool,
    "rule_matching": str,
    "flush_interval": float,
    "queue_max_events": int,
    "detail_syscalls": list,
    "enforce": dict,
    "container_runtime": dict,
    "outputs": dict,
    "seccomp": dict,
    "verdict": dict,
}
_ENFORCE = {
    "enabled": bool,
    "allow_exes": list,
    "allow_pids": list,
    "block_rules": list,
    "block_tags": list,
    "block_min_priority": str,
    "block_anomaly_score": float,
    "action": str,
    "deny_syscalls": dict,
}
_CONTAINER_RUNTIME = {
    "enabled": bool,
    "docker_socket": str,
    "podman_socket": str,
    "timeout": float,
    "retry_after": float,
}


def _marks(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            out[path] = key.start_mark.line + 1
            _marks(value, path, out)


def _check(
    section: Mapping[str, Any], schema: Mapping[str, type], prefix: str, source: str, marks: Mapping[str, int]
) -> None:
    for key, value in section.items():
        path = f"{prefix}{key}"
        line = marks.get(path)
        if key not in schema:
            raise ConfigError(
                f"unknown key {path!r} (known: {', '.join(sorted(schema))})", path=source, line=line
            )
        want = schema[key]
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"{path}: expected {want.__name__}, got {type(value).__name__} {value!r}",
                path=source,
                line=line,
            )


def load_config(path: str) -> AgentConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror}", path=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        raise ConfigError(
            f"invalid YAML: {getattr(err, 'problem', err)}", path=path, line=line, col=col
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of keys", path=path, line=1)
    marks: dict[str, int] = {}
    if node is not None:
        _marks(node, "", marks)
    _check(data, _TOP, "", path, marks)
    enforce_raw = data.get("enforce", {}) or {}
    _check(enforce_raw, _ENFORCE, "enforce.", path, marks)
    for key in ("rules", "detail_syscalls"):
        for i, item in enumerate(data.get(key, []) or []):
            if not isinstance(item, str):
                raise ConfigError(f"{key}[{i}]: expected a string", path=path, line=marks.get(key))
    if data.get("rule_matching", "all") not in ("all", "first"):
        raise ConfigError(
            "rule_matching: expected 'all' or 'first'", path=path, line=marks.get("rule_matching")
        )
    if data.get("queue_max_events", 1) < 1:
        raise ConfigError(
            "queue_max_events: expected a positive integer", path=path, line=marks.get("queue_max_events")
        )
    if enforce_raw.get("action", "kill") not in ("kill", "stop"):
        raise ConfigError(
            "enforce.action: expected 'kill' or 'stop'", path=path, line=marks.get("enforce.action")
        )
    runtime_raw = data.get("container_runtime", {}) or {}
    _check(runtime_raw, _CONTAINER_RUNTIME, "container_runtime.", path, marks)
    for key in ("timeout", "retry_after"):
        if runtime_raw.get(key, 1) <= 0:
            raise ConfigError(
                f"container_runtime.{key}: expected a positive number of seconds",
                path=path,
                line=marks.get(f"container_runtime.{key}"),
            )
    defaults = ContainerRuntimeConfig()
    container_runtime = ContainerRuntimeConfig(
        enabled=runtime_raw.get("enabled", defaults.enabled),
        docker_socket=runtime_raw.get("docker_socket", defaults.docker_socket),
        podman_socket=runtime_raw.get("podman_socket", defaults.podman_socket),
        timeout=float(runtime_raw.get("timeout", defaults.timeout)),
        retry_after=float(runtime_raw.get("retry_after", defaults.retry_after)),
    )
    enforce = EnforceConfig(
        enabled=bool(enforce_raw.get("enabled", False)),
        allow_exes=tuple(enforce_raw.get("allow_exes", ())),
        allow_pids=tuple(int(p) for p in enforce_raw.get("allow_pids", ())),
        block_rules=tuple(enforce_raw.get("block_rules", ())),
        block_tags=tuple(enforce_raw.get("block_tags", ("sysgram.block",))),
        block_min_priority=str(enforce_raw.get("block_min_priority", "")),
        block_anomaly_score=float(enforce_raw.get("block_anomaly_score", 0.0)),
        action=str(enforce_raw.get("action", "kill")),
        deny_syscalls={str(k): tuple(v) for k, v in (enforce_raw.get("deny_syscalls", {}) or {}).items()},
    )
    return AgentConfig(
        source=path,
        state_dir=data.get("state_dir", "/var/lib/sysgram"),
        model=data.get("model", ""),
        rules=tuple(data.get("rules", ()) or ()),
        default_rules=data.get("default_rules", True),
        rule_matching=data.get("rule_matching", "all"),
        flush_interval=float(data.get("flush_interval", 0.02)),
        queue_max_events=int(data.get("queue_max_events", 2_000_000)),
        detail_syscalls=tuple(data.get("detail_syscalls", ()) or ()),
        enforce=enforce,
        container_runtime=container_runtime,
        outputs=data.get("outputs", {}) or {},
        seccomp=data.get("seccomp", {}) or {},
        verdict=data.get("verdict", {}) or {},
        marks=marks,
    )

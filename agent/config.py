"""The agent's YAML config (``sysgram run --config FILE``).

Every key is checked: an unknown key, a duplicate key or a value of the wrong type is one
:class:`ConfigError` naming the file and the YAML line. Sections owned by other rooms (``outputs``,
``seccomp``, ``verdict``) are checked by those rooms against a dotted key path;
:meth:`AgentConfig.located` maps such an error back to its line here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from agent._files import read_regular
from agent.errors import ConfigError

COMPAT_DETAILS_MODES = ("auto", "always", "never")
# deny_syscalls policies are ids 1..63 in the kernel's deny_bitmaps (bpf/sysgram.h COMPAT_POLICY_BASE)
MAX_DENY_PROGRAMS = 63
# Falco's priorities, most severe first (``Info`` is accepted for ``Informational``).
PRIORITIES = ("Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug")


def canonical_priority(text: str) -> str | None:
    """The priority ``text`` names (any case, ``Info`` too), or None when it names none."""
    p = text.strip().capitalize()
    p = "Informational" if p == "Info" else p
    return p if p in PRIORITIES else None


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
    # exe -> syscalls killed in-kernel; the paths are resolved (realpath) at load
    deny_syscalls: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Ingested Falco alerts may block only with this on and a bearer token on the ingestion endpoint.
    block_ingested: bool = False


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
    # The agent's threads run at this nice value (auditd boosts itself the same way): at 0 the scheduler's
    # fair share starved the agent on a busy host and it dropped events (docs/performance.md).
    priority_nice: int = -10
    detail_syscalls: tuple[str, ...] = ()  # in addition to those the rules and policies need
    # details of 32-bit syscalls (a raw sys_exit program, ~11 ns on every syscall once attached): "auto"
    # attaches it when the host first runs 32-bit code, "always" at start, "never" not at all
    compat_details: str = "auto"
    enforce: EnforceConfig = field(default_factory=EnforceConfig)
    container_runtime: ContainerRuntimeConfig = field(default_factory=ContainerRuntimeConfig)
    outputs: Mapping[str, Any] = field(default_factory=dict)
    seccomp: Mapping[str, Any] = field(default_factory=dict)
    verdict: Mapping[str, Any] = field(default_factory=dict)
    marks: Mapping[str, int] = field(default_factory=dict)  # dotted key -> YAML line

    def line_of(self, key_path: str) -> int | None:
        return _line_of(self.marks, key_path)

    def error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(f"{key_path}: {message}", path=self.source, line=self.line_of(key_path))

    def located(self, err: ConfigError) -> ConfigError:
        """``err`` (from a room checking its section, message starting with a dotted key path) with the
        file and YAML line of that key filled in when it had none."""
        if err.line is not None or self.source == "<defaults>":
            return err
        key_path = err.message.split(":", 1)[0].split(" ", 1)[0]
        line = self.line_of(key_path)
        if line is None:
            return err
        return ConfigError(err.message, path=err.path or self.source, line=line, col=err.col)


_TOP = {
    "state_dir": str,
    "model": str,
    "rules": list,
    "default_rules": bool,
    "rule_matching": str,
    "flush_interval": float,
    "queue_max_events": int,
    "priority_nice": int,
    "detail_syscalls": list,
    "compat_details": str,
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
    "block_ingested": bool,
}
_CONTAINER_RUNTIME = {
    "enabled": bool,
    "docker_socket": str,
    "podman_socket": str,
    "timeout": float,
    "retry_after": float,
}


def _line_of(marks: Mapping[str, int], key_path: str) -> int | None:
    """The line of ``key_path`` (``a.b[2]``), else of the nearest enclosing key that has one."""
    while key_path:
        if key_path in marks:
            return marks[key_path]
        if key_path.endswith("]") and "[" in key_path:
            key_path = key_path[: key_path.rindex("[")]
        else:
            key_path = key_path.rpartition(".")[0]
    return None


class _Located:
    """Raises ConfigErrors that name the file and the YAML line of a dotted key path."""

    def __init__(self, source: str, marks: Mapping[str, int]) -> None:
        self.source = source
        self.marks = marks

    def fail(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(f"{key_path}: {message}", path=self.source, line=_line_of(self.marks, key_path))

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        """A list of strings (a lone string is refused: it would be read as its characters)."""
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of strings, got {_kind(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.fail(f"{key}[{i}]", f"expected a non-empty string, got {_kind(item)}")
        return tuple(value)

    def syscall_names(self, value: Any, key: str, *, i386_too: bool = False) -> tuple[str, ...]:
        from agent.capture.names import known_names  # libseccomp: loaded only when names are given

        names = self.strings(value, key)
        known = known_names() | (known_names(compat=True) if i386_too else frozenset())
        for i, name in enumerate(names):
            if name not in known:
                raise self.fail(f"{key}[{i}]", f"unknown syscall {name!r} (not known to libseccomp)")
        return names

    def exe_paths(self, value: Any, key: str) -> tuple[str, ...]:
        paths = self.strings(value, key)
        for i, path in enumerate(paths):
            if not path.startswith("/"):
                raise self.fail(f"{key}[{i}]", f"expected an absolute executable path, got {path!r}")
        return paths

    def number(self, value: Any, key: str, *, minimum: float, exclusive: bool) -> float:
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number) or number < minimum or (exclusive and number == minimum):
            bound = f"more than {minimum:g}" if exclusive else f"at least {minimum:g}"
            raise self.fail(key, f"expected a finite number {bound}, got {value!r}")
        return number


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _marks(node: yaml.Node, prefix: str, out: dict[str, int], source: str,
           visited: set[int] | None = None) -> None:
    """Each dotted key path's line; a key given twice in one mapping is refused (YAML would silently keep
    the last one). A node reached again through an alias is not walked again: nine aliases of nine aliases
    of ... (a "billion laughs") would take exponential time and memory."""
    visited = set() if visited is None else visited
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            line = key.start_mark.line + 1
            if "\0" in name:
                raise ConfigError(f"{prefix + '.' if prefix else ''}{name!r}: a key contains a NUL byte", path=source,
                                  line=line)
            if name in seen:
                raise ConfigError(
                    f"duplicate key {name!r} (first on line {seen[name]})", path=source, line=line
                )
            seen[name] = line
            path = f"{prefix}.{name}" if prefix else name
            out[path] = line
            _marks(value, path, out, source, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + 1
            _marks(item, path, out, source, visited)
    elif isinstance(node, yaml.ScalarNode) and "\0" in str(node.value):
        # no path, name or pattern can hold one (the OS refuses it with ValueError, deep in some room)
        raise ConfigError(f"{prefix or 'a value'}: contains a NUL byte", path=source, line=node.start_mark.line + 1)


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


def _read_text(path: str) -> str:
    try:
        raw = read_regular(path)
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror}", path=path) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})", path=path, line=line
        ) from None


def load_config(path: str) -> AgentConfig:
    text = _read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        marks: dict[str, int] = {}
        if node is not None:
            _marks(node, "", marks, path)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        raise ConfigError(
            f"invalid YAML: {getattr(err, 'problem', err)}", path=path, line=line, col=col
        ) from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply", path=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of keys", path=path, line=1)
    data = {k: v for k, v in data.items() if v is not None}  # ``key:`` with nothing after it: the default
    at = _Located(path, marks)
    _check(data, _TOP, "", path, marks)
    enforce = _enforce(data.get("enforce", {}), data.get("outputs", {}), at)
    rules = at.strings(data.get("rules", []), "rules")
    detail_syscalls = at.syscall_names(data.get("detail_syscalls", []), "detail_syscalls")
    if data.get("rule_matching", "all") not in ("all", "first"):
        raise at.fail("rule_matching", "expected 'all' or 'first'")
    if data.get("queue_max_events", 1) < 1:
        raise at.fail("queue_max_events", "expected a positive integer")
    if not -20 <= data.get("priority_nice", 0) <= 19:
        raise at.fail("priority_nice", "expected a nice value from -20 to 19 (0: normal priority)")
    flush_interval = at.number(data.get("flush_interval", 0.02), "flush_interval", minimum=0, exclusive=True)
    compat_details = data.get("compat_details", "auto")
    if compat_details not in COMPAT_DETAILS_MODES:
        raise at.fail("compat_details", f"expected one of {', '.join(COMPAT_DETAILS_MODES)}, got {compat_details!r}")
    runtime_raw = data.get("container_runtime", {})
    _check(runtime_raw, _CONTAINER_RUNTIME, "container_runtime.", path, marks)
    for key in ("timeout", "retry_after"):
        at.number(runtime_raw.get(key, 1), f"container_runtime.{key}", minimum=0, exclusive=True)
    defaults = ContainerRuntimeConfig()
    container_runtime = ContainerRuntimeConfig(
        enabled=runtime_raw.get("enabled", defaults.enabled),
        docker_socket=runtime_raw.get("docker_socket", defaults.docker_socket),
        podman_socket=runtime_raw.get("podman_socket", defaults.podman_socket),
        timeout=float(runtime_raw.get("timeout", defaults.timeout)),
        retry_after=float(runtime_raw.get("retry_after", defaults.retry_after)),
    )
    return AgentConfig(
        source=path,
        state_dir=data.get("state_dir", "/var/lib/sysgram"),
        model=data.get("model", ""),
        rules=rules,
        default_rules=data.get("default_rules", True),
        rule_matching=data.get("rule_matching", "all"),
        flush_interval=flush_interval,
        queue_max_events=int(data.get("queue_max_events", 2_000_000)),
        priority_nice=int(data.get("priority_nice", -10)),
        detail_syscalls=detail_syscalls,
        compat_details=compat_details,
        enforce=enforce,
        container_runtime=container_runtime,
        outputs=data.get("outputs", {}),
        seccomp=data.get("seccomp", {}),
        verdict=data.get("verdict", {}),
        marks=marks,
    )


def _enforce(raw: Mapping[str, Any], outputs: Mapping[str, Any], at: _Located) -> EnforceConfig:
    raw = {k: v for k, v in raw.items() if v is not None}
    _check(raw, _ENFORCE, "enforce.", at.source, at.marks)
    allow_pids = raw.get("allow_pids", [])
    for i, pid in enumerate(allow_pids):
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
            raise at.fail(f"enforce.allow_pids[{i}]", f"expected a positive pid, got {_kind(pid)}")
    action = raw.get("action", "kill")
    if action not in ("kill", "stop"):
        raise at.fail("enforce.action", f"expected 'kill' or 'stop', got {action!r}")
    min_priority = raw.get("block_min_priority", "")
    if min_priority:
        canonical = canonical_priority(min_priority)
        if canonical is None:
            raise at.fail(
                "enforce.block_min_priority",
                f"unknown priority {min_priority!r} (expected one of {', '.join(PRIORITIES)})",
            )
        min_priority = canonical
    score = at.number(raw.get("block_anomaly_score", 0.0), "enforce.block_anomaly_score", minimum=0,
                      exclusive=False)
    deny: dict[str, tuple[str, ...]] = {}
    for exe, names in raw.get("deny_syscalls", {}).items():
        key = f"enforce.deny_syscalls.{exe}"
        if not isinstance(exe, str) or not exe.startswith("/"):
            raise at.fail(key, f"expected an absolute executable path, got {exe!r}")
        syscalls = at.syscall_names(names, key, i386_too=True)  # an i386-only name (fstatat64) too
        if not syscalls:
            raise at.fail(key, "expected at least one syscall name")
        # Policies apply by the program a process really runs (/proc/PID/exe): links and ``..`` resolved.
        real = os.path.realpath(exe)
        deny[real] = tuple(dict.fromkeys((*deny.get(real, ()), *syscalls)))  # two links to one program
    allow_exes = at.exe_paths(raw.get("allow_exes", []), "enforce.allow_exes")
    allowed = {os.path.realpath(exe) for exe in allow_exes}
    for exe in raw.get("deny_syscalls", {}):
        if os.path.realpath(exe) in allowed:  # the kernel keeps one policy per program: it would lose one
            raise at.fail(f"enforce.deny_syscalls.{exe}",
                          "this program is also in enforce.allow_exes (never blocked): remove it from one of them")
    if len(deny) > MAX_DENY_PROGRAMS:
        raise at.fail("enforce.deny_syscalls", f"at most {MAX_DENY_PROGRAMS} programs (got {len(deny)})")
    block_ingested = raw.get("block_ingested", False)
    if block_ingested:
        listen = outputs.get("listen") if isinstance(outputs, Mapping) else None
        token = listen.get("token") if isinstance(listen, Mapping) else None
        if not (isinstance(token, str) and token):
            raise at.fail(
                "enforce.block_ingested",
                "needs outputs.listen.token: anyone on this host could post an alert and have any pid killed",
            )
    return EnforceConfig(
        enabled=raw.get("enabled", False),
        allow_exes=allow_exes,
        allow_pids=tuple(allow_pids),
        block_rules=at.strings(raw.get("block_rules", []), "enforce.block_rules"),
        block_tags=at.strings(raw.get("block_tags", ["sysgram.block"]), "enforce.block_tags"),
        block_min_priority=min_priority,
        block_anomaly_score=score,
        action=action,
        deny_syscalls=deny,
        block_ingested=block_ingested,
    )


def with_enforcement(cfg: AgentConfig) -> AgentConfig:
    """``cfg`` with blocking turned on (``--enforce``)."""
    return replace(cfg, enforce=replace(cfg.enforce, enabled=True))

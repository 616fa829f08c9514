"""``sysgram run``, ``sysgram replay`` and ``sysgram learn``: the agent itself."""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from agent._argtypes import check_absolute_exes, check_model_file, epochs, positive_seconds
from agent.config import AgentConfig, load_config, with_enforcement
from agent.errors import ConfigError, NotYetAvailable
from agent.pipeline import ANOMALY_RULE, SECCOMP_RULE, Pipeline, run_live, run_replay
from agent.proc import ProcessTable, RuntimeContainerLookup, RuntimeSocket, runtime_sockets_present
from agent.proc._table import CRED_SYSCALLS
from agent.verdict import DecisionTable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "sysgram-default.onnx"
DEFAULT_RULES = ROOT / "rules" / "sysgram_rules.yaml"
# The shipped model knows a recorded demonstration workload, not this host: say so once at start.
SHIPPED_MODEL_NOTE = (
    "sysgram: note: the shipped model was learned on a recorded workload, not on this host, and flags this "
    "host's programs wherever they behave differently (docs/model.md, \"Shipped model\"); learn this host's "
    "normal with `sysgram learn --seconds 600 -o host.onnx`, then run with --model host.onnx"
)
DEFAULT_SECCOMP = {"host_default": str(ROOT / "rules" / "seccomp" / "host-default.json")}
SECRET_ENV = "SYSGRAM_WEBHOOK_SECRET"  # the webhook secret without putting it on the command line (ps)
LISTEN_TOKEN_ENV = "SYSGRAM_LISTEN_TOKEN"  # the ingestion bearer token, likewise (as `sysgram alerts listen`)
T = TypeVar("T")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``PORT`` or ``[IPV6]:PORT`` -> (host, port); the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--listen: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"--listen: write an IPv6 address in brackets, e.g. [::1]:{port or 8765}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen: expected HOST:PORT or PORT with a port of 1-65535, got {text!r}")
    return host or "127.0.0.1", int(port)


def _located(cfg: AgentConfig, build: Callable[[], T]) -> T:
    """``build()``; a ConfigError it raises about a section of the config names that key's line."""
    try:
        return build()
    except ConfigError as err:
        raise cfg.located(err) from None


def register(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run the agent: capture, score, cross-check, alert (and block)")
    _agent_options(run)
    run.set_defaults(handler=_run)
    rep = subparsers.add_parser("replay", help="feed a recording through the same pipeline as live capture")
    rep.add_argument("file")
    _agent_options(rep)
    rep.set_defaults(handler=_replay)
    learn = subparsers.add_parser(
        "learn", help="record this host's normal behaviour, then train a model on it"
    )
    learn.add_argument("--seconds", type=positive_seconds, required=True, help="how long to record (> 0)")
    learn.add_argument("-o", "--output", required=True, help="the model to write (.onnx; sidecar beside it)")
    learn.add_argument("--exe", action="append", default=[], help="only these executables")
    learn.add_argument("--epochs", type=epochs, default=0, help="training epochs (default: the trainer's)")
    learn.add_argument("--keep-recording", help="also keep the recording at this path")
    learn.set_defaults(handler=_learn)


def _agent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--state-dir", help="state directory (spool, alerts) [/var/lib/sysgram]")
    p.add_argument("--model", help="ONNX model (sidecar beside it) [models/sysgram-default.onnx]")
    p.add_argument("--no-model", action="store_true", help="run without the anomaly model")
    p.add_argument(
        "--rules", action="append", default=[], help="Falco-format rules file, added to the defaults"
    )
    p.add_argument("--no-default-rules", action="store_true", help="do not load rules/sysgram_rules.yaml")
    p.add_argument("--alerts-jsonl", help="also write alerts as JSON lines to this file")
    p.add_argument("--webhook", help="POST alerts to this URL (Falco JSON)")
    p.add_argument(
        "--webhook-secret",
        help=f"sign webhooks (Standard Webhooks); whsec_ secrets are base64. Visible to every local user in "
        f"ps: prefer the {SECRET_ENV} environment variable or outputs.webhook.secret in a 0600 config",
    )
    p.add_argument(
        "--listen",
        help="ingestion + /metrics address HOST:PORT, PORT or [IPV6]:PORT (default off; 127.0.0.1 if no host)",
    )
    p.add_argument("--falco-file", help="follow Falco's file_output (JSON lines) at this path")
    p.add_argument("--enforce", action="store_true", help="turn blocking on (off by default)")
    p.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no console alerts")


def _config(args: argparse.Namespace) -> AgentConfig:
    cfg = load_config(args.config) if args.config else AgentConfig()
    if args.enforce:
        cfg = with_enforcement(cfg)
    return replace(
        cfg,
        state_dir=args.state_dir or cfg.state_dir,
        model="" if args.no_model else (args.model or cfg.model or str(DEFAULT_MODEL)),
        rules=(*cfg.rules, *args.rules),
        default_rules=cfg.default_rules and not args.no_default_rules,
    )


def _state_dir(cfg: AgentConfig, from_cli: bool) -> None:
    """Create the state directory, or one line saying why it cannot be used."""
    path = None if from_cli else cfg.source
    line = None if from_cli else cfg.line_of("state_dir")
    name = "--state-dir" if from_cli else "state_dir"
    if os.path.exists(cfg.state_dir) and not os.path.isdir(cfg.state_dir):
        raise ConfigError(f"{name}: {cfg.state_dir} is not a directory", path=path, line=line)
    try:
        os.makedirs(cfg.state_dir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{name}: cannot create {cfg.state_dir}: {err.strerror}", path=path, line=line) from None
    if not os.access(cfg.state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {cfg.state_dir} is not writable", path=path, line=line)


def _from_option(err: ConfigError, args: argparse.Namespace) -> ConfigError:
    """``err`` about an outputs key, named after the command-line option that set the value when one did
    (not after the config file, or `<defaults>` when there is none)."""
    key = err.message.split(":", 1)[0]
    # the exact keys options (or environment variables) set -> (how the user gave it, the value given); an
    # error about another key of the same section came from the config file
    given = {
        "outputs.webhook.url": ("--webhook", args.webhook),
        "outputs.webhook.secret": (f"--webhook-secret ({SECRET_ENV})", args.webhook_secret or os.environ.get(SECRET_ENV)),
        "outputs.jsonl.path": ("--alerts-jsonl", args.alerts_jsonl),
        "outputs.listen.address": ("--listen", args.listen),
        "outputs.listen.port": ("--listen", args.listen),
        "outputs.listen.token": (LISTEN_TOKEN_ENV, os.environ.get(LISTEN_TOKEN_ENV)),
        "outputs.falco_file": ("--falco-file", args.falco_file),
    }
    option, value = given.get(key, ("", None))
    if value:
        return ConfigError(f"{option}: {err.message}")
    if key == "outputs.listen.token" and args.listen and "required when listening" in err.message:
        return ConfigError(f"--listen: {err.message}")  # the option chose an address that needs a token
    return err


def _sink(value: Any, shorthand: str | None) -> Any:
    """An outputs sink's config as a dict to merge options into (its short form ``jsonl: PATH`` expanded);
    anything else unchanged, for the outputs' own check to name."""
    if value is None:
        return {}
    if isinstance(value, str) and shorthand is not None:
        return {shorthand: value}
    return dict(value) if isinstance(value, dict) else value


def _merged(value: Any, shorthand: str | None, **options: Any) -> Any:
    sink = _sink(value, shorthand)
    return {**sink, **options} if isinstance(sink, dict) else sink


def _outputs_section(cfg: AgentConfig, args: argparse.Namespace) -> dict[str, Any]:
    section: dict[str, Any] = {k: v for k, v in cfg.outputs.items()}
    if args.quiet:
        section["console"] = None
    if args.alerts_jsonl:
        section["jsonl"] = _merged(section.get("jsonl"), "path", path=args.alerts_jsonl)
    if args.webhook:
        section["webhook"] = _merged(section.get("webhook"), "url", url=args.webhook)
    secret = args.webhook_secret or os.environ.get(SECRET_ENV)
    if secret:
        if not section.get("webhook"):
            raise ConfigError(f"--webhook-secret ({SECRET_ENV}) needs --webhook or outputs.webhook")
        section["webhook"] = _merged(section["webhook"], "url", secret=secret)
    if args.falco_file:
        section["falco_file"] = args.falco_file
    if args.listen:
        host, port = parse_listen(args.listen)
        listen = _sink(section.get("listen"), None)
        if isinstance(listen, dict):
            section["listen"] = {**{k: v for k, v in listen.items() if k != "host"}, "address": host, "port": port}
        # else: the file's value stays, for the outputs' check to name at its line
    # The token from the environment (a Kubernetes Secret) for a listener that is configured; `sysgram
    # alerts listen` reads the same variable, so with no listener here it is not this command's.
    token = os.environ.get(LISTEN_TOKEN_ENV, "").strip()  # a Secret made --from-file ends in a newline
    if token and section.get("listen") is not None:
        section["listen"] = _merged(section["listen"], None, token=token)
    return section


def _warn_uncaptured(rules: Any) -> None:
    """Rules on syscalls the capture has no argument decoder for load clean and never match there: one line
    names those syscalls and a rule that has them (the rest are in the rules' evttypes)."""
    from agent.capture._decode import SPECS

    dead: dict[str, str] = {}
    for rule in rules:
        for name in sorted((rule.evttypes or set()) - SPECS.keys()):
            dead.setdefault(name, rule.name)
    if dead:
        example = next(iter(dead.items()))
        print(f"sysgram: warning: rules name syscalls the capture does not decode, which never match here: "
              f"{', '.join(sorted(dead))} (e.g. rule {example[1]!r} on {example[0]})", file=sys.stderr)


def _check_block_rules(cfg: AgentConfig, enabled: set[str], disabled: set[str]) -> None:
    """A name in enforce.block_rules that no rule has would never block: a typo there turns blocking off in
    silence. Refused, unless ingested Falco alerts may block (their rules are Falco's, not loaded here); a
    disabled rule is only warned of (a per-host override may turn it off)."""
    if not cfg.enforce.enabled:
        return
    for i, name in enumerate(cfg.enforce.block_rules):
        key = f"enforce.block_rules[{i}]"
        if name in enabled:
            continue
        if name in disabled:
            print(f"sysgram: warning: {key}: the rule {name!r} is disabled: it blocks nothing until enabled",
                  file=sys.stderr)
        elif name in (ANOMALY_RULE, SECCOMP_RULE):
            raise cfg.error(key, f"{name!r} is the agent's own alert: it never blocks alone (machine learning and "
                                 "seccomp are cross-checked by rules; see block_anomaly_score)")
        elif not cfg.enforce.block_ingested:
            raise cfg.error(key, f"no loaded rule is named {name!r}: it would never block")
        else:
            print(f"sysgram: warning: {key}: no loaded rule is named {name!r}; only an ingested Falco alert of "
                  "that rule can block", file=sys.stderr)


def build_pipeline(cfg: AgentConfig, args: argparse.Namespace) -> tuple[Pipeline, set[str]]:
    """Every room the config turns on, wired; and the syscalls that need details."""
    table = ProcessTable()
    decisions = _located(cfg, lambda: DecisionTable.from_mapping(cfg.verdict, cfg.enforce, source=cfg.source))
    pipeline = Pipeline(table=table, decisions=decisions)
    # The process table always needs exec (exact argv) and cwd changes (resolving relative paths).
    # ... and the set*id calls (the user and capabilities every rule reads).
    details: set[str] = {"execve", "execveat", "chdir", "fchdir", *CRED_SYSCALLS, *cfg.detail_syscalls}
    rule_files = [*([str(DEFAULT_RULES)] if cfg.default_rules and DEFAULT_RULES.exists() else []), *cfg.rules]
    enabled: set[str] = set()  # rule names, for enforce.block_rules
    disabled: set[str] = set()
    if rule_files:
        from agent.falco import Engine, load_rules

        ruleset, diagnostics = load_rules(rule_files, rule_matching=cfg.rule_matching)
        errors = [d for d in diagnostics if d.is_error]
        if errors:
            first = errors[0]
            raise ConfigError(f"rules: {first.message}", path=first.file, line=first.line, col=first.col)
        warnings = [d for d in diagnostics if not d.is_error]
        if warnings:  # a rule that loads but cannot match as written (a field not available here...): say so
            print(f"sysgram: warning: the rules loaded with {len(warnings)} warning(s), the first: "
                  f"{warnings[0].to_text().splitlines()[0]} (all: sysgram rules check "
                  f"{' '.join(rule_files)})", file=sys.stderr)
        _warn_uncaptured(ruleset.rules)
        enabled = {r.name for r in ruleset.rules}
        disabled = {st.name for st in ruleset.statuses if st.reason == "disabled"}
        pipeline.engine = Engine(
            ruleset, table.get, anomaly_lookup=None, container_lookup=_container_lookup(cfg)
        )
        details |= set(ruleset.interesting_syscalls())
    _check_block_rules(cfg, enabled, disabled)
    if cfg.model == str(DEFAULT_MODEL) and not DEFAULT_MODEL.exists():
        print(f"sysgram: warning: no shipped model at {DEFAULT_MODEL}: anomaly scoring is off "
              "(build one with training/build_shipped_model.py or sysgram learn)", file=sys.stderr)
    elif cfg.model:
        from agent.model import AnomalyDetector, load_model

        pipeline.detector = AnomalyDetector(load_model(cfg.model))
        if Path(cfg.model).resolve() == DEFAULT_MODEL.resolve():
            print(SHIPPED_MODEL_NOTE, file=sys.stderr)
        if pipeline.engine is not None:
            pipeline.engine.anomaly_lookup = _anomaly_fields(pipeline.detector.state)
            pipeline.engine.exec_origin_lookup = _anomaly_fields(pipeline.detector.exec_origin)
    seccomp_section = dict(cfg.seccomp) or {k: v for k, v in DEFAULT_SECCOMP.items() if os.path.exists(v)}
    if seccomp_section:
        from agent.seccomp import PolicyEvaluator, SeccompConfig

        base = os.path.dirname(os.path.abspath(cfg.source)) if os.path.exists(cfg.source) else "."
        seccomp_config = _located(
            cfg, lambda: SeccompConfig.from_dict(seccomp_section, base_dir=base, source=cfg.source)
        )
        pipeline.policy = PolicyEvaluator(seccomp_config)
        details |= set(pipeline.policy.interesting_syscalls())
    from agent.respond import OutputConfig, build_outputs

    if args.quiet and cfg.outputs.get("console") is not None:  # checked even when --quiet drops it
        _located(cfg, lambda: OutputConfig.from_mapping({"console": cfg.outputs["console"]}, source=cfg.source))
    try:
        out_cfg = _located(cfg, lambda: OutputConfig.from_mapping(_outputs_section(cfg, args), source=cfg.source))
    except ConfigError as err:
        raise _from_option(err, args) from None
    if cfg.enforce.block_ingested and (out_cfg.listen is None or not out_cfg.listen.token):
        raise cfg.error("enforce.block_ingested", "needs outputs.listen with a bearer token")
    _state_dir(cfg, from_cli=bool(args.state_dir))
    pipeline.outputs = build_outputs(out_cfg, state_dir=cfg.state_dir, on_falco_alert=pipeline.on_falco_alert)
    return pipeline, details


def _container_lookup(cfg: AgentConfig) -> RuntimeContainerLookup | None:
    """container.name / image / privileged from Docker or Podman when one of their sockets is here; else
    None (container.id alone, from the cgroup)."""
    runtime = cfg.container_runtime
    if not runtime.enabled:
        return None
    wanted = [
        RuntimeSocket(path, kind)
        for path, kind in ((runtime.docker_socket, "docker"), (runtime.podman_socket, "podman"))
        if path
    ]
    present = runtime_sockets_present(wanted)
    if not present:
        return None
    lookup = RuntimeContainerLookup(
        present, timeout=runtime.timeout, first_wait=runtime.timeout, retry_after=runtime.retry_after
    )
    lookup.warm()  # the containers already running are known before their first event
    return lookup


def _anomaly_fields(state_of: Any) -> Any:
    """pid -> AnomalyFields, from a detector's ``state`` or ``exec_origin``."""
    from agent.falco import AnomalyFields

    def lookup(pid: int) -> Any:
        state = state_of(pid)
        if state is None:
            return None
        return AnomalyFields(
            score=state.score,
            threshold=state.threshold,
            window=" ".join(state.window),
            is_anomalous=state.is_anomalous,
            new_syscalls=" ".join(state.new_syscalls),
        )

    return lookup


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own malloc arena, and arenas keep memory freed long ago: under process
    churn that was a one-time rise of ~17 MB of RSS (docs/performance.md). Two arenas are enough here."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-8), ctypes.c_int(arenas))  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _run(args: argparse.Namespace) -> int:
    _limit_malloc_arenas()
    cfg = _config(args)
    pipeline, details = build_pipeline(cfg, args)
    enforce_cfg = cfg.enforce

    def attach(tracer: Any) -> None:
        if enforce_cfg.enabled:
            from agent.enforce import Enforcer

            pipeline.enforcer = Enforcer(tracer.bpf, enforce_cfg, pipeline.table.get)
            pipeline.enforcer.protect_processes(pipeline.table.snapshot())

    pipeline.on_tracer = attach
    return run_live(
        pipeline,
        seconds=args.seconds,
        detail_syscalls=details,
        compat_details=cfg.compat_details,
        enforce=enforce_cfg.enabled,
        flush_interval=cfg.flush_interval,
        queue_max_events=cfg.queue_max_events,
        nice=cfg.priority_nice,
    )


def _replay(args: argparse.Namespace) -> int:
    if args.enforce:
        raise ConfigError("--enforce makes no sense on a replay")
    cfg = _config(args)
    pipeline, _ = build_pipeline(cfg, args)
    return run_replay(pipeline, args.file)


def _learn(args: argparse.Namespace) -> int:
    try:
        from training import train_from_recordings
    except ImportError as err:
        raise NotYetAvailable(f"training is not installed ({err}): pip install -e '.[train]'") from None
    from agent.pipeline import Filters, build_recorder_pipeline

    # everything that can be wrong with the options is said before the recording, not after it
    check_model_file(args.output)
    model_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(model_dir):
        raise ConfigError("no such directory for the model", path=args.output)
    if not os.access(model_dir, os.W_OK | os.X_OK):
        raise ConfigError("the model's directory is not writable", path=args.output)
    check_absolute_exes(args.exe)
    if args.keep_recording and (os.path.isdir(args.keep_recording)
                                or not os.path.isdir(os.path.dirname(os.path.abspath(args.keep_recording)))):
        raise ConfigError("--keep-recording must be a file path in an existing directory", path=args.keep_recording)
    with tempfile.TemporaryDirectory(prefix="sysgram-learn-") as tmp:
        recording = args.keep_recording or os.path.join(tmp, "learn.parquet")
        pipeline = build_recorder_pipeline(recording, Filters(exes=frozenset(args.exe)))
        run_live(pipeline, seconds=args.seconds)
        kwargs: dict[str, Any] = {"exes": tuple(args.exe)}
        if args.epochs:
            kwargs["epochs"] = args.epochs
        print("sysgram: recording done; training the model now (minutes on a small host)", file=sys.stderr,
              flush=True)
        report = train_from_recordings([recording], args.output, **kwargs)
    print(f"sysgram: learned {report.summary()}")
    if note := report.thin_note():
        print(f"sysgram: {note}")
    if note := report.blind_note():
        print(f"sysgram: warning: {note}", file=sys.stderr)
    return 0

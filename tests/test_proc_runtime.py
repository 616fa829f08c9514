"""Container metadata from the runtime: a fake Docker Engine API served on a real unix socket."""

from __future__ import annotations

import argparse
import calendar
import json
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, ContainerRuntimeConfig, load_config
from agent.errors import ConfigError
from agent.events import DetailEvent
from agent.falco import Engine, load_rules
from agent.pipeline_commands import build_pipeline
from agent.proc import RuntimeContainerLookup, RuntimeSocket, split_image
from agent.proc._runtime import parse_inspect, parse_started_at
from agent.proc.info import ProcessInfo
from tests._falco_helpers import STABLE, proc, ruleset_from
from tests.conftest import sysgram

PRIV_ID = "3f1c2a9b7d6e" + "a" * 52
PLAIN_ID = "9e8d7c6b5a41" + "b" * 52
IMAGE_SHA = "sha256:" + "c0ffee" * 10 + "beef"


def inspect_doc(cid: str, name: str, image: str, privileged: bool) -> dict[str, Any]:
    """The shape of Docker 24's ``GET /containers/{id}/json`` (trimmed to a realistic subset)."""
    return {
        "Id": cid,
        "Created": "2026-11-26T14:01:02.123456789Z",
        "Path": "/bin/sh",
        "Args": ["-c", "sleep infinity"],
        "State": {
            "Status": "running",
            "Running": True,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": False,
            "Dead": False,
            "Pid": 4242,
            "ExitCode": 0,
            "Error": "",
            "StartedAt": "2026-11-26T14:01:03.500000001Z",
            "FinishedAt": "0001-01-01T00:00:00Z",
        },
        "Image": IMAGE_SHA,
        "ResolvConfPath": f"/var/lib/docker/containers/{cid}/resolv.conf",
        "Name": f"/{name}",
        "RestartCount": 0,
        "Driver": "overlay2",
        "Platform": "linux",
        "HostConfig": {
            "Binds": None,
            "NetworkMode": "default",
            "Privileged": privileged,
            "PidMode": "",
            "CapAdd": None,
            "CapDrop": None,
            "ReadonlyRootfs": False,
            "SecurityOpt": None,
        },
        "Mounts": [],
        "Config": {
            "Hostname": cid[:12],
            "User": "",
            "Tty": False,
            "Env": ["PATH=/usr/bin:/bin"],
            "Cmd": ["sh", "-c", "sleep infinity"],
            "Image": image,
            "WorkingDir": "",
            "Entrypoint": None,
            "Labels": {},
        },
        "NetworkSettings": {"Bridge": "", "SandboxID": "f" * 64, "Networks": {}},
    }


class FakeEngine:
    """Answers /containers/<id>/json from ``answers`` (status, body); counts the requests it sees."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.delay = 0.0
        self.seen: list[str] = []
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                engine.seen.append(self.path)
                if engine.delay:
                    time.sleep(engine.delay)
                parts = self.path.strip("/").split("/")
                status, body = 404, b'{"message":"No such container"}'
                if len(parts) == 3 and parts[0] == "containers" and parts[2] == "json":
                    status, body = engine.answers.get(parts[1], (status, body))
                elif parts == ["containers", "json"]:  # the running containers, as `docker ps` asks
                    status = 200
                    body = json.dumps(
                        [
                            {"Id": cid, "Names": ["/x"], "Image": "img", "State": "running"}
                            for cid, (code, _) in engine.answers.items()
                            if code == 200
                        ]
                    ).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                conn, _ = self.socket.accept()
                return conn, ("fake-docker", 0)  # http.server wants a (host, port) client address

        self.server = Server(path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, cid: str, name: str, image: str, privileged: bool) -> None:
        self.answers[cid] = (200, json.dumps(inspect_doc(cid, name, image, privileged)).encode())

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def sockdir() -> Iterator[Path]:
    # A short directory: unix socket paths are limited to 108 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="sg-rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def docker(sockdir: Path) -> Iterator[FakeEngine]:
    engine = FakeEngine(str(sockdir / "docker.sock"))
    engine.add(PRIV_ID, "debug-box", "docker.io/library/debian:12.8", True)
    engine.add(PLAIN_ID, "web", "nginx", False)
    yield engine
    engine.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lookup_for(*paths: str | tuple[str, str], **kw: Any) -> RuntimeContainerLookup:
    sockets = [RuntimeSocket(p) if isinstance(p, str) else RuntimeSocket(*p) for p in paths]
    kw.setdefault("first_wait", 5.0)  # generous: the worker answers in a few ms; a loaded machine is slow
    return RuntimeContainerLookup(sockets, **kw)


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("image", "repository", "tag", "digest"),
    [
        ("nginx", "nginx", None, None),
        ("nginx:1.25", "nginx", "1.25", None),
        ("docker.io/library/nginx:1.25-alpine", "docker.io/library/nginx", "1.25-alpine", None),
        ("localhost:5000/app:v1", "localhost:5000/app", "v1", None),
        ("quay.io/org/app@sha256:abcd", "quay.io/org/app", None, "sha256:abcd"),
        ("registry:5000/ns/app:v2@sha256:ef01", "registry:5000/ns/app", "v2", "sha256:ef01"),
    ],
)
def test_image_is_split_as_falco_does(
    image: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = split_image(image)
    assert (ref.repository, ref.tag, ref.digest) == (repository, tag, digest)


def test_started_at_keeps_nanoseconds_and_zero_time_is_unknown() -> None:
    base = calendar.timegm((2026, 11, 26, 14, 1, 3, 0, 0, 0)) * 1_000_000_000
    assert parse_started_at("2026-11-26T14:01:03.500000001Z") == base + 500_000_001
    assert parse_started_at("2026-11-26T16:01:03+02:00") == base
    assert parse_started_at("0001-01-01T00:00:00Z") is None
    assert parse_started_at("yesterday") is None


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"a string"', b"null"])
def test_malformed_inspect_answer_is_none(body: bytes) -> None:
    assert parse_inspect(PRIV_ID, body, "docker") is None


def test_wrong_types_in_inspect_answer_stay_unknown() -> None:
    doc = {"Name": 7, "Config": {"Image": ["x"]}, "HostConfig": {"Privileged": "yes"}, "State": "up"}
    info = parse_inspect(PRIV_ID, json.dumps(doc).encode(), "docker")
    assert info is not None and info.id == PRIV_ID[:12]
    assert (info.name, info.image, info.privileged, info.start_ts) == (None, None, None, None)


def test_container_started_from_an_image_id_has_no_repository() -> None:
    doc = inspect_doc(PRIV_ID, "x", IMAGE_SHA.partition(":")[2][:12], False)
    info = parse_inspect(PRIV_ID, json.dumps(doc).encode(), "docker")
    assert info is not None and info.repository is None and info.tag is None and info.image is not None


# ---------------------------------------------------------------- the runtime over its socket
def test_lookup_fills_name_image_and_privileged(docker: FakeEngine) -> None:
    lookup = lookup_for(docker.path)
    try:
        info = lookup(PRIV_ID)
        assert info is not None
        assert info.id == PRIV_ID[:12]
        assert info.name == "debug-box"
        assert info.image == "docker.io/library/debian:12.8"
        assert (info.repository, info.tag) == ("docker.io/library/debian", "12.8")
        assert info.image_id == IMAGE_SHA.partition(":")[2]
        assert info.privileged is True and info.type == "docker"
        assert (
            info.start_ts == calendar.timegm((2026, 11, 26, 14, 1, 3, 0, 0, 0)) * 1_000_000_000 + 500_000_001
        )
        plain = lookup(PLAIN_ID)
        assert (
            plain is not None
            and plain.privileged is False
            and plain.repository == "nginx"
            and plain.tag is None
        )
        assert docker.seen == [f"/containers/{PRIV_ID}/json", f"/containers/{PLAIN_ID}/json"]
        for _ in range(5):  # cached: the runtime is not asked again
            assert lookup(PRIV_ID) == info
        assert len(docker.seen) == 2
    finally:
        lookup.close()


def test_host_and_empty_ids_never_reach_the_runtime(docker: FakeEngine) -> None:
    lookup = lookup_for(docker.path)
    try:
        assert lookup("host") is None and lookup("") is None
        odd = lookup("../../images/x")  # not a runtime id: never put in a URL
        assert odd is not None and odd.name is None
        assert docker.seen == [] and lookup.requests == 0
    finally:
        lookup.close()


def test_warm_learns_the_running_containers_up_front(docker: FakeEngine) -> None:
    lookup = lookup_for(docker.path, first_wait=0.0)
    lookup.warm()
    lookup.close()  # the worker finishes the queue (the warm-up) before it stops
    assert docker.seen[0] == "/containers/json"
    assert sorted(docker.seen[1:]) == sorted(f"/containers/{c}/json" for c in (PRIV_ID, PLAIN_ID))
    priv = lookup(PRIV_ID)
    assert priv is not None and priv.name == "debug-box" and priv.privileged is True
    assert len(docker.seen) == 3  # answered from the cache


def test_not_found_is_id_only_and_cached_for_a_while(docker: FakeEngine) -> None:
    clock = Clock()
    lookup = lookup_for(docker.path, negative_ttl=30.0, clock=clock)
    unknown = "d" * 64
    try:
        info = lookup(unknown)
        assert info is not None and info.id == "d" * 12 and info.name is None and info.privileged is None
        assert lookup(unknown) == info
        assert len(docker.seen) == 1  # within the negative cache: not asked again
        docker.add(unknown, "late", "alpine:3.20", False)
        clock.now += 31
        later = lookup(unknown)
        assert later is not None and later.name == "late" and len(docker.seen) == 2
    finally:
        lookup.close()


def test_malformed_answer_from_the_runtime_is_id_only(docker: FakeEngine) -> None:
    docker.answers[PRIV_ID] = (200, b'{"Name": "/half", "Config": ')
    docker.answers[PLAIN_ID] = (500, b"oops")
    warnings: list[str] = []
    lookup = lookup_for(docker.path, warn=warnings.append)
    try:
        for cid in (PRIV_ID, PLAIN_ID):
            info = lookup(cid)
            assert info is not None and info.id == cid[:12] and info.name is None and info.privileged is None
        assert lookup.resolve(PRIV_ID).name is None  # the synchronous path does not raise either
        assert warnings == []
    finally:
        lookup.close()


def test_dead_socket_is_not_retried_within_the_backoff(sockdir: Path) -> None:
    # A socket file nobody listens on: connect is refused.
    path = str(sockdir / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    clock = Clock()
    warnings: list[str] = []
    lookup = lookup_for(path, retry_after=30.0, negative_ttl=30.0, clock=clock, warn=warnings.append)
    try:
        first = lookup(PRIV_ID)
        assert first is not None and first.id == PRIV_ID[:12] and first.name is None
        assert (lookup.requests, lookup.failures) == (1, 1)
        other = lookup(PLAIN_ID)  # a new id while the socket is in backoff: no connect at all
        assert other is not None and other.name is None
        assert lookup.resolve("e" * 64).name is None
        assert (lookup.requests, lookup.failures) == (1, 1)
        assert len(warnings) == 1 and path in warnings[0]
        # The runtime comes up; after the backoff it is asked again.
        Path(path).unlink()
        engine = FakeEngine(path)
        engine.add(PRIV_ID, "back", "busybox:1", True)
        try:
            clock.now += 31
            info = lookup(PRIV_ID)
            assert info is not None and info.name == "back" and info.privileged is True
            assert len(warnings) == 1  # one warning line, not one per event
        finally:
            engine.stop()
    finally:
        lookup.close()


def test_absent_socket_is_id_only_without_warning(sockdir: Path) -> None:
    warnings: list[str] = []
    lookup = lookup_for(str(sockdir / "nothing.sock"), warn=warnings.append)
    try:
        for _ in range(3):
            info = lookup(PRIV_ID)
            assert info is not None and info.id == PRIV_ID[:12] and info.name is None
        assert lookup.requests == 0 and warnings == []
    finally:
        lookup.close()


def test_slow_runtime_times_out_to_id_only(docker: FakeEngine) -> None:
    docker.delay = 0.5
    warnings: list[str] = []
    lookup = lookup_for(docker.path, timeout=0.05, warn=warnings.append)
    try:
        info = lookup(PRIV_ID)
        assert info is not None and info.name is None
        assert lookup.failures == 1 and len(warnings) == 1 and "Timeout" in warnings[0]
    finally:
        lookup.close()


def test_new_container_does_not_wait_past_first_wait(docker: FakeEngine) -> None:
    # first_wait=0: the caller gets what is known now (id only); the worker fills the cache behind it.
    docker.delay = 0.2
    lookup = lookup_for(docker.path, first_wait=0.0, timeout=2.0)
    try:
        now = lookup(PRIV_ID)
        assert now is not None and now.name is None
        for _ in range(100):
            later = lookup(PRIV_ID)
            if later is not None and later.name is not None:
                break
            time.sleep(0.05)
        assert later is not None and later.name == "debug-box" and later.privileged is True
        assert len(docker.seen) == 1  # repeated lookups while pending did not queue more requests
    finally:
        lookup.close()


def test_podman_socket_answers_what_docker_does_not_know(docker: FakeEngine, sockdir: Path) -> None:
    podman = FakeEngine(str(sockdir / "podman.sock"))
    pod_id = "f00d" * 16
    podman.add(pod_id, "pod-web", "quay.io/podman/hello:latest", False)
    lookup = lookup_for(docker.path, (podman.path, "podman"))
    try:
        info = lookup(pod_id)
        assert info is not None and info.name == "pod-web" and info.type == "podman"
        assert info.repository == "quay.io/podman/hello" and info.tag == "latest"
        assert docker.seen == [f"/containers/{pod_id}/json"]  # docker said 404 first
        docker_info = lookup(PRIV_ID)
        assert (
            docker_info is not None
            and docker_info.type == "docker"
            and podman.seen == [f"/containers/{pod_id}/json"]
        )
    finally:
        lookup.close()
        podman.stop()


def test_cache_is_bounded(docker: FakeEngine) -> None:
    lookup = lookup_for(docker.path, max_entries=16)
    try:
        for i in range(40):
            lookup.resolve(f"{i:064x}")
        assert lookup.cached <= 16
    finally:
        lookup.close()


# ---------------------------------------------------------------- through the Falco engine
def _exec_in(engine: Engine, p: ProcessInfo) -> list[str]:
    ev = DetailEvent(10_000_000_000, p.pid, p.pid, "execve", 59, 0, {"filename": p.exe, "argv": list(p.args)})
    return [m.rule for m in engine.evaluate(ev)]


def _debugfs_world(lookup: RuntimeContainerLookup) -> tuple[Engine, ProcessInfo, ProcessInfo]:
    shim = proc(300, 1, "containerd-shim", "/usr/bin/containerd-shim", uid=0, user="root")
    priv = proc(
        301, 300, "debugfs", "/usr/sbin/debugfs", "/dev/sda1", uid=0, user="root", container_id=PRIV_ID
    )
    plain = proc(
        302, 300, "debugfs", "/usr/sbin/debugfs", "/dev/sda1", uid=0, user="root", container_id=PLAIN_ID
    )
    table = {p.pid: p for p in (shim, priv, plain)}
    ruleset, diags = load_rules([STABLE])
    assert not [d for d in diags if d.severity == "error"]
    engine = Engine(ruleset, table.get, hostname="testhost", container_lookup=lookup)
    return engine, priv, plain


@pytest.mark.skipif(not Path(STABLE).exists(), reason="upstream Falco rules not in ../shared")
def test_upstream_debugfs_in_privileged_container_fires_with_the_runtime(docker: FakeEngine) -> None:
    lookup = lookup_for(docker.path)
    try:
        engine, priv, plain = _debugfs_world(lookup)
        assert "Debugfs Launched in Privileged Container" in _exec_in(engine, priv)
        assert "Debugfs Launched in Privileged Container" not in _exec_in(engine, plain)
    finally:
        lookup.close()


@pytest.mark.skipif(not Path(STABLE).exists(), reason="upstream Falco rules not in ../shared")
def test_without_a_runtime_the_privileged_rule_cannot_fire(sockdir: Path) -> None:
    lookup = lookup_for(str(sockdir / "absent.sock"))
    engine, priv, _ = _debugfs_world(lookup)
    assert "Debugfs Launched in Privileged Container" not in _exec_in(engine, priv)


def test_container_fields_in_rule_output(docker: FakeEngine) -> None:
    rules = ruleset_from("""
- rule: Priv exec
  desc: d
  condition: evt.type = execve and container.privileged = true and container.image.repository = docker.io/library/debian
  output: "%container.id %container.name %container.image.tag %container.type"
  priority: WARNING
""")
    lookup = lookup_for(docker.path)
    try:
        p = proc(301, 1, "sh", "/bin/sh", uid=0, container_id=PRIV_ID)
        engine = Engine(rules, {301: p}.get, hostname="t", container_lookup=lookup)
        ev = DetailEvent(10_000_000_000, 301, 301, "execve", 59, 0, {"filename": "/bin/sh", "argv": ["sh"]})
        matches = engine.evaluate(ev)
        assert [m.rule for m in matches] == ["Priv exec"]
        assert matches[0].output.endswith(f"{PRIV_ID[:12]} debug-box 12.8 docker")
    finally:
        lookup.close()


# ---------------------------------------------------------------- config and wiring
def test_config_container_runtime_section(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("container_runtime:\n  docker_socket: /tmp/d.sock\n  podman_socket: ''\n  timeout: 0.5\n")
    cfg = load_config(str(p)).container_runtime
    assert (cfg.enabled, cfg.docker_socket, cfg.podman_socket, cfg.timeout, cfg.retry_after) == (
        True,
        "/tmp/d.sock",
        "",
        0.5,
        30.0,
    )


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("model: a\ncontainer_runtime:\n  socket: /x\n", 3, "unknown key 'container_runtime.socket'"),
        ("container_runtime:\n  enabled: yes please\n", 2, "expected bool"),
        ("container_runtime:\n  retry_after: -1\n", 2, "more than 0"),
        ("container_runtime: [1]\n", 1, "expected dict"),
    ],
)
def test_bad_container_runtime_config_names_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(p))
    assert str(info.value).startswith(f"{p}:{line}") and words in str(info.value)


def _pipeline_lookup(tmp_path: Path, runtime: ContainerRuntimeConfig) -> Any:
    rules = tmp_path / "r.yaml"
    rules.write_text("- rule: r\n  desc: d\n  condition: evt.type = execve\n  output: o\n  priority: INFO\n")
    cfg = AgentConfig(
        state_dir=str(tmp_path / "state"), rules=(str(rules),), default_rules=False, container_runtime=runtime
    )
    args = argparse.Namespace(
        quiet=True, alerts_jsonl=None, webhook=None, webhook_secret=None, falco_file=None, listen=None,
        state_dir=str(tmp_path / "state"),
    )
    pipeline, _ = build_pipeline(cfg, args)
    assert pipeline.engine is not None
    return pipeline.engine.container_lookup


def test_build_pipeline_wires_the_runtime_when_a_socket_exists(docker: FakeEngine, tmp_path: Path) -> None:
    found = _pipeline_lookup(tmp_path, ContainerRuntimeConfig(docker_socket=docker.path, podman_socket=""))
    assert isinstance(found, RuntimeContainerLookup)
    try:
        assert [s.path for s in found.sockets] == [docker.path]
        info = found(PRIV_ID)
        assert info is not None and info.privileged is True
    finally:
        found.close()
    absent = _pipeline_lookup(
        tmp_path,
        ContainerRuntimeConfig(
            docker_socket=str(tmp_path / "no.sock"), podman_socket=str(tmp_path / "no2.sock")
        ),
    )
    assert absent is None
    off = _pipeline_lookup(tmp_path, ContainerRuntimeConfig(enabled=False, docker_socket=docker.path))
    assert off is None


def test_cli_bad_container_runtime_config_is_one_line_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("container_runtime:\n  timeout: soon\n")
    done = sysgram("replay", str(tmp_path / "none.parquet"), "--config", str(p))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{p}:2" in lines[0] and "container_runtime.timeout" in lines[0]


def test_a_surprise_in_the_worker_is_id_only_and_one_warning(
    docker: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.proc._runtime as runtime

    def explode(*_: Any) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(runtime, "parse_inspect", explode)
    clock = Clock()
    warnings: list[str] = []
    lookup = lookup_for(docker.path, clock=clock, warn=warnings.append)
    try:
        for cid in (PRIV_ID, PLAIN_ID):
            info = lookup(cid)
            assert info is not None and info.name is None
        assert len(warnings) == 1 and "unexpected" in warnings[0]
        monkeypatch.undo()
        clock.now += 31  # the failure was cached like a 404: asked again later, and now answered
        again = lookup(PRIV_ID)
        assert again is not None and again.name == "debug-box"
    finally:
        lookup.close()

"""deploy/kubernetes/sysgram.yaml, checked against the agent itself (no cluster here): its config loads with
the agent's own loader, its arguments parse with the agent's own CLI, its mounts cover every path the
config writes to, and its probe command passes against a real /healthz and fails without one."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.capture._headers import TRACEFS
from agent.cli import build_parser
from agent.config import load_config
from agent.pipeline_commands import _config, _outputs_section
from agent.respond import IngestServer, Metrics, OutputConfig
from tests.conftest import ROOT

MANIFEST = ROOT / "deploy" / "kubernetes" / "sysgram.yaml"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in loaded}


def _container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return container


def _host_mounts(docs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """mountPath -> the node path behind it, for hostPath volumes."""
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    return {m["mountPath"]: host[m["name"]] for m in _container(docs)["volumeMounts"] if m["name"] in host}


def _under(path: str, mounts: dict[str, str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _config_file(docs: dict[str, dict[str, Any]], tmp_path: Path) -> tuple[Path, str]:
    """The ConfigMap's config.yaml written out, and the path the pod reads it from."""
    (key, text), = docs["ConfigMap"]["data"].items()
    mount = next(m for m in _container(docs)["volumeMounts"] if m["name"] == "config")["mountPath"]
    written = tmp_path / key
    written.write_text(text)
    return written, f"{mount}/{key}"


def test_every_piece_is_there_and_in_one_namespace(docs: dict[str, dict[str, Any]]) -> None:
    assert set(docs) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    namespace = docs["Namespace"]["metadata"]["name"]
    assert all(d["metadata"]["namespace"] == namespace for kind, d in docs.items() if kind != "Namespace")
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    selector = docs["DaemonSet"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"].items()


def test_the_pod_can_see_and_trace_the_node(docs: dict[str, dict[str, Any]]) -> None:
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True  # alerts name host pids; the table reads the node's /proc
    assert _container(docs)["securityContext"]["privileged"] is True
    assert _host_mounts(docs).get(TRACEFS) == TRACEFS


def test_the_arguments_are_a_sysgram_run_reading_the_configmap(
    docs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    container = _container(docs)
    entrypoint = re.search(r'^ENTRYPOINT \["(\w+)"\]', (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint and entrypoint.group(1) == "sysgram" and "command" not in container
    written, in_pod = _config_file(docs, tmp_path)
    assert in_pod in container["args"]
    args = build_parser().parse_args([a if a != in_pod else str(written) for a in container["args"]])
    assert args.config == str(written)
    cfg = _config(args)  # the agent's own loader: unknown keys and bad values are errors
    assert cfg.enforce.enabled is False  # blocking stays off unless the operator turns it on
    mounts = _host_mounts(docs)
    outputs = OutputConfig.from_mapping(_outputs_section(cfg, args), source=str(written))
    assert outputs.jsonl is not None
    for path in (cfg.state_dir, outputs.jsonl.path):  # what must outlive the pod is on the node
        assert _under(path, mounts), path
    env = {e["name"]: e for e in container["env"]}
    assert _under(env["SYSGRAM_CACHE_DIR"]["value"], mounts)
    assert env["SYSGRAM_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is True


def _probe_with_port(command: list[str], port: int) -> list[str]:
    interpreter, *rest = command
    assert interpreter.startswith("/opt/sysgram/.venv/bin/")  # the Dockerfile's venv
    return [sys.executable, *(re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", part) for part in rest)]


def test_the_probes_ask_the_listen_address_and_fail_without_it(
    docs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    container = _container(docs)
    written, _ = _config_file(docs, tmp_path)
    listen = OutputConfig.from_mapping(dict(load_config(str(written)).outputs), source=str(written)).listen
    assert listen is not None and listen.is_loopback
    for probe in ("startupProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert f"http://127.0.0.1:{listen.port}/healthz" in command[-1]
        server = IngestServer.from_config(replace(listen, port=0), lambda alert: None, Metrics()).start()
        try:
            ok = subprocess.run(_probe_with_port(command, server.address[1]), capture_output=True, timeout=30)
        finally:
            server.close()
        assert ok.returncode == 0, ok.stderr
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            free = unused.getsockname()[1]
        down = subprocess.run(_probe_with_port(command, free), capture_output=True, timeout=30)
        assert down.returncode != 0

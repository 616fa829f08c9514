"""deploy/kubernetes/sysgram.yaml, checked against the agent itself (no cluster here): its config loads with
the agent's own loader, its arguments parse with the agent's own CLI, its mounts cover every path the
config writes to, and its probes ask the agent's listen address, where a real server's /healthz answers 200
while the agent works and 503 once it stalls (a kubelet fails an HTTP probe on any status >= 400)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.capture._headers import TRACEFS
from agent.cli import build_parser
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
    assert set(docs) == {"Namespace", "PriorityClass", "ServiceAccount", "ConfigMap", "DaemonSet"}
    namespace = docs["Namespace"]["metadata"]["name"]
    cluster_wide = {"Namespace", "PriorityClass"}
    assert all(d["metadata"]["namespace"] == namespace for kind, d in docs.items() if kind not in cluster_wide)
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["priorityClassName"] == docs["PriorityClass"]["metadata"]["name"]
    selector = docs["DaemonSet"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"].items()


def test_the_pod_can_see_and_trace_the_node(docs: dict[str, dict[str, Any]]) -> None:
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True  # alerts name host pids; the table reads the node's /proc
    assert _container(docs)["securityContext"]["privileged"] is True
    assert _host_mounts(docs).get(TRACEFS) == TRACEFS


def _listen(docs: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The listener the pod's agent would run: the ConfigMap's outputs with the token the pod's environment
    gives (from its Secret; a stand-in value here), through the agent's own merge and check."""
    container = _container(docs)
    token = next(e for e in container["env"] if e["name"] == "SYSGRAM_LISTEN_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token.get("optional") is not True  # listening on the pod's IP without a token is refused
    monkeypatch.setenv("SYSGRAM_LISTEN_TOKEN", "a-stand-in-for-the-secret")
    written, in_pod = _config_file(docs, tmp_path)
    args = build_parser().parse_args([a if a != in_pod else str(written) for a in container["args"]])
    return OutputConfig.from_mapping(_outputs_section(_config(args), args), source=str(written)).listen


def test_the_arguments_are_a_sysgram_run_reading_the_configmap(
    docs: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYSGRAM_LISTEN_TOKEN", "a-stand-in-for-the-secret")
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


def test_the_probes_reach_the_agents_healthz_which_fails_when_it_stalls(
    docs: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = _container(docs)
    listen = _listen(docs, tmp_path, monkeypatch)
    # the kubelet probes the pod's IP: the listener must be on it, and then only with a token
    assert listen is not None and listen.address == "0.0.0.0" and listen.token
    assert "hostNetwork" not in docs["DaemonSet"]["spec"]["template"]["spec"]  # not every node process's
    metrics = Metrics()
    server = IngestServer.from_config(replace(listen, address="127.0.0.1", port=0), lambda alert: None, metrics)
    server.start()
    try:
        for probe in ("startupProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert "host" not in get and get["port"] == listen.port
            url = f"{server.url}{get['path']}"  # what the kubelet asks (no token), on the test server's port
            metrics.health = lambda: None
            assert httpx.get(url, timeout=5).status_code == 200
            metrics.health = lambda: "stalled: the pipeline has not turned for 31 s"
            assert httpx.get(url, timeout=5).status_code >= 400
        assert httpx.post(f"{server.url}/", json={"rule": "forged"}, timeout=5).status_code == 401
    finally:
        server.close()

"""The running agent end to end on the real kernel (LiveAgent: a `sysgram run` for tests): /metrics fed by the pipeline, the overload alert when the
capture queue overflows, and Falco's file_output followed from the config."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.pipeline import OVERLOAD_RULE
from tests.conftest import ROOT, requires_bpf

pytestmark = [requires_bpf, pytest.mark.bpf]

RULE = "Test open of a watched file"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveAgent:
    def __init__(self, tmp: Path, *args: str, config: str = "") -> None:
        self.alerts = tmp / "alerts.jsonl"
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "agent", "run", "--state-dir", str(tmp / "state"), "--alerts-jsonl",
            str(self.alerts), "--quiet", "--listen", f"127.0.0.1:{self.port}", *args,
        ]
        if config:
            path = tmp / "config.yaml"
            path.write_text(config)
            cmd += ["--config", str(path)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.stats: dict[str, Any] = {}
        self.stderr = ""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "sysgram: ready" in line:
                return
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"the agent did not start: {self.stderr}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def records(self) -> list[dict[str, Any]]:
        if not self.alerts.exists():
            return []
        return [json.loads(line) for line in self.alerts.read_text().splitlines() if line.strip()]

    def wait_for(self, what: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = what()
            if found:
                return found
            time.sleep(0.1)
        return what()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        self.stderr = err
        lines = [ln for ln in err.splitlines() if ln.startswith("sysgram: stats ")]
        if lines:
            self.stats = json.loads(lines[-1].removeprefix("sysgram: stats "))
        return self.proc.returncode


def agent_with_rule(tmp: Path, name: str, condition: str, output: str, *, priority: str = "WARNING",
                    tags: str = "", config: str = "") -> LiveAgent:
    """A live agent with no model and this one rule (``tags``: a YAML list, e.g. "[sysgram.block]")."""
    rules = tmp / "rule.yaml"
    rules.write_text(f"- rule: {name}\n  desc: test\n  condition: {condition}\n  output: {output}\n"
                     f"  priority: {priority}\n" + (f"  tags: {tags}\n" if tags else ""))
    return LiveAgent(tmp, "--no-model", "--no-default-rules", "--rules", str(rules), config=config)


def watch_rule(tmp: Path, watched: str) -> Path:
    rules = tmp / "watch.yaml"
    rules.write_text(
        f"- rule: {RULE}\n"
        "  desc: a file tests watch\n"
        f"  condition: evt.type in (open, openat) and fd.name = {watched}\n"
        "  output: watched open of %fd.name by %proc.name (pid %proc.pid)\n"
        "  priority: WARNING\n"
    )
    return rules


class _Receiver(BaseHTTPRequestHandler):
    """A SOC webhook endpoint on 127.0.0.1 that takes everything."""

    received: ClassVar[list[bytes]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()


def test_metrics_show_events_rules_alerts_and_webhook_deliveries(tmp_path: Path, workload: Path) -> None:
    watched = f"/tmp/sysgram-watch-{uuid.uuid4().hex}"
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    agent = LiveAgent(
        tmp_path, "--no-model", "--no-default-rules", "--rules", str(watch_rule(tmp_path, watched)),
        "--webhook", f"http://127.0.0.1:{receiver.server_address[1]}/",
    )
    try:
        for _ in range(2):  # two processes: two distinct alerts (folding joins only one process's repeats)
            assert subprocess.run([str(workload), "10", watched], timeout=30).returncode == 0
        key = ("sysgram_alerts_total", (("priority", "Warning"), ("rule", RULE)))
        seen = agent.wait_for(lambda: agent.metrics().get(key, 0) >= 2)
        agent.wait_for(lambda: agent.metrics().get(("sysgram_webhook_deliveries_total", ()), 0) >= 2, 30)
        metrics = agent.metrics()
    finally:
        assert agent.stop() == 0, agent.stderr
        receiver.shutdown()
        receiver.server_close()
        Path(watched).unlink(missing_ok=True)
    assert seen, metrics
    assert metrics[key] == 2
    assert metrics[("sysgram_rule_matches_total", (("rule", RULE),))] == 2
    assert metrics[("sysgram_events_total", ())] > 0
    assert metrics[("sysgram_rules_evaluated_total", ())] >= 2
    # every drop stage is exported once the first sample is taken, even at zero
    stages = {dict(k[1])["stage"] for k in metrics if k[0] == "sysgram_drops_total"}
    assert stages == set(agent.stats["drops_by_stage"])
    assert len([r for r in agent.records() if r["rule"] == RULE]) == 2
    # the webhook's counters live in the same registry /metrics serves
    delivered = [json.loads(body) for body in _Receiver.received]
    assert [d["rule"] for d in delivered] == [RULE, RULE]
    assert metrics[("sysgram_webhook_deliveries_total", ())] == 2
    assert metrics[("sysgram_webhook_spool_depth", ())] == 0


def test_overflowing_capture_queue_raises_one_overload_alert(tmp_path: Path) -> None:
    # A queue that holds one event: every batch of syscalls is dropped in userspace, as when the
    # consumer falls behind.
    agent = LiveAgent(tmp_path, "--no-model", "--no-default-rules", config="queue_max_events: 1\n")
    try:
        found = agent.wait_for(lambda: [r for r in agent.records() if r["rule"] == OVERLOAD_RULE], 20)
        time.sleep(2.5)  # more drops in the next samples must not raise more alerts (once per 30 s)
        metrics = agent.metrics()
    finally:
        assert agent.stop() == 0, agent.stderr
    assert found, agent.stderr
    alerts = [r for r in agent.records() if r["rule"] == OVERLOAD_RULE]
    assert len(alerts) == 1
    fields = alerts[0]["output_fields"]
    assert fields["sysgram.n_drops_userspace_queue_overflow"] > 0
    assert fields["sysgram.n_drops"] >= fields["sysgram.n_drops_userspace_queue_overflow"]
    assert "sysgram_internal" in alerts[0]["tags"]
    dropped = metrics[("sysgram_drops_total", (("stage", "userspace_queue_overflow"),))]
    assert dropped >= fields["sysgram.n_drops_userspace_queue_overflow"]
    assert agent.stats["drops_by_stage"]["userspace_queue_overflow"] >= dropped


def test_falco_file_output_from_the_config_is_followed(tmp_path: Path) -> None:
    falco_file = tmp_path / "falco-events.json"
    agent = LiveAgent(
        tmp_path, "--no-model", "--no-default-rules", config=f"outputs:\n  falco_file: {falco_file}\n"
    )
    payload = {
        "time": "2026-11-26T14:00:00.123456789Z", "rule": "Terminal shell in container", "priority": "Notice",
        "output": "A shell was spawned", "output_fields": {"proc.pid": 999999, "proc.name": "bash"},
        "tags": ["shell"], "source": "syscall", "hostname": "node-1",
    }
    try:
        with falco_file.open("a") as fh:
            fh.write(json.dumps(payload) + "\n")
        found = agent.wait_for(lambda: [r for r in agent.records() if r["rule"] == payload["rule"]], 15)
        metrics = agent.metrics()
    finally:
        assert agent.stop() == 0, agent.stderr
    assert found, agent.stderr
    fields = found[0]["output_fields"]
    assert fields["sysgram.source"] == "falco" and fields["proc.pid"] == 999999
    assert fields["sysgram.anomaly.is_anomalous"] is False
    assert metrics[("sysgram_falco_alerts_ingested_total", (("via", "file"),))] == 1


def test_healthz_says_starting_until_the_tracer_is_attached_then_ok(tmp_path: Path) -> None:
    # What a Kubernetes startup/liveness probe asks (deploy/kubernetes/sysgram.yaml).
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--no-model", "--state-dir", str(tmp_path / "state"), "--quiet",
         "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    answers: list[tuple[int, str]] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                answers.append((reply.status_code, reply.text))
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "sysgram: ready" not in proc.stderr.readline():
            assert proc.poll() is None, "the agent exited before it was ready"
        ready_at = len(answers)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (200, "ok\n") not in answers[ready_at:]:
            time.sleep(0.05)
    finally:
        done.set()
        prober.join(5)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert (503, "starting: loading the tracer\n") in answers[:ready_at]  # the listener is up before the tracer
    assert (200, "ok\n") in answers[ready_at:]
    assert proc.returncode == 0

"""The ``outputs:`` config section, and build_outputs starting what it turns on."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.errors import ConfigError
from agent.respond import Alert, ConsoleConfig, OutputConfig, build_outputs

FULL = """
outputs:
  console: {stream: stdout, format: text}
  jsonl: {path: /var/lib/sysgram/alerts.jsonl, max_bytes: 1048576, backups: 3, format: ocsf}
  webhook:
    url: https://soc.example/hooks/sysgram
    secret: whsec_c2VjcmV0
    timeout: 2.5
    max_attempts: 4
    spool_max: 5000
  listen: {address: 0.0.0.0, port: 9000, token: abc}
  falco_file: /var/log/falco/events.json
  fold_window: 1.5
"""


def parse(text: str) -> OutputConfig:
    return OutputConfig.from_mapping(yaml.safe_load(text)["outputs"], source="sysgram.yaml")


def test_a_full_section_parses() -> None:
    config = parse(FULL)
    assert config.console == ConsoleConfig(stream="stdout", format="text")
    assert config.jsonl is not None and config.jsonl.backups == 3 and config.jsonl.format == "ocsf"
    assert config.webhook is not None and config.webhook.timeout == 2.5 and config.webhook.spool_max == 5000
    assert config.listen is not None and config.listen.port == 9000 and config.listen.token == "abc"
    assert config.falco_file == "/var/log/falco/events.json" and config.fold_window == 1.5
    assert "c2VjcmV0" not in repr(config)  # secrets stay out of logs


def test_defaults_and_shorthands() -> None:
    data = {"jsonl": "/tmp/a.jsonl", "webhook": "http://127.0.0.1:1/"}
    config = OutputConfig.from_mapping(data, source="x")
    assert config.console == ConsoleConfig()
    assert config.jsonl is not None and config.jsonl.path == "/tmp/a.jsonl" and config.jsonl.format == "falco"
    assert config.webhook is not None and config.webhook.url == "http://127.0.0.1:1/"
    assert config.listen is None
    assert OutputConfig.from_mapping({"console": False}, source="x").console is None
    assert OutputConfig.from_mapping(None, source="x") == OutputConfig()


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"bogus": 1}, "outputs.bogus: unknown key"),
        ({"webhook": {"url": "http://x", "retries": 3}}, "outputs.webhook.retries: unknown key"),
        ({"webhook": {"url": "http://x", "timeout": "soon"}}, "outputs.webhook.timeout: expected a number"),
        ({"webhook": {"url": "http://x", "timeout": 0}}, "outputs.webhook.timeout: must be more than"),
        ({"webhook": {"url": "ftp://x"}}, "outputs.webhook.url: expected an http"),
        ({"webhook": {"secret": "x"}}, "outputs.webhook.url: missing"),
        ({"webhook": {"url": "http://x", "secret": "whsec_!!notbase64"}}, "outputs.webhook.secret"),
        ({"webhook": {"url": "http://x", "secret": "whsec_"}}, "outputs.webhook.secret: the secret is empty"),
        ({"webhook": {"url": "http://x", "max_attempts": True}}, "outputs.webhook.max_attempts: expected an"),
        ({"jsonl": {"path": "/a", "format": "cef"}}, "outputs.jsonl.format: expected one of falco, ocsf"),
        ({"jsonl": {"path": "/a", "backups": -1}}, "outputs.jsonl.backups: must be at least 0"),
        ({"console": "yes"}, "outputs.console: expected a mapping"),
        ({"listen": {"address": "0.0.0.0"}}, "outputs.listen.token: required"),
        ({"listen": {"token": "   "}}, "outputs.listen.token: must not begin or end with white space"),
        ({"listen": {"token": "s3cret\n"}}, "outputs.listen.token: must not begin or end with white space"),
        ({"listen": {"port": 70000}}, "outputs.listen.port: must be at most 65535"),
        ({"listen": {"address": "999.1.1.1"}}, "outputs.listen.address: not an IP address or a host name"),
        ({"listen": {"host": "my host", "token": "t"}}, "outputs.listen.host: not an IP address or a host name"),
        ({"fold_window": -1}, "outputs.fold_window: must be at least"),
        ({"fold_window": 1e300}, "outputs.fold_window: must be at most 86400"),
        ({"webhook": {"url": "http://x", "backoff_base": 1e300, "backoff_max": 1e300}},
         "outputs.webhook.backoff_base: must be at most 86400"),
        ({"webhook": {"url": "http://x", "timeout": float("inf")}}, "outputs.webhook.timeout: expected a finite"),
        ({"webhook": {"url": "http://x", "timeout": float("nan")}}, "outputs.webhook.timeout: expected a finite"),
        ({"webhook": {"url": "http://127.0.0.1:99999/"}}, "outputs.webhook.url: not a usable URL"),
        ({"webhook": {"url": "http://127.0.0.1:0/"}}, "outputs.webhook.url: expected a host and a port"),
        ({"webhook": {"url": "http://:8080/"}}, "outputs.webhook.url: expected a host and a port"),
        ([1, 2], "outputs: expected a mapping"),
    ],
)
def test_bad_sections_name_the_file_and_key(data: Any, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        OutputConfig.from_mapping(data, source="/etc/sysgram.yaml")
    assert str(info.value).startswith("/etc/sysgram.yaml: " + where), str(info.value)


def test_loopback_listen_needs_no_token() -> None:
    config = OutputConfig.from_mapping({"listen": {"address": "::1"}}, source="x")
    assert config.listen is not None and config.listen.is_loopback


def test_build_outputs_wires_file_webhook_ingestion_and_metrics(tmp_path: Path) -> None:
    from tests.test_respond_ingest import FALCO_PAYLOAD
    from tests.test_respond_webhook import Receiver

    receiver = Receiver()
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    config = OutputConfig.from_mapping(
        {
            "console": False,
            "jsonl": {"path": str(tmp_path / "alerts.jsonl")},
            "webhook": {"url": receiver.url, "secret": secret, "backoff_base": 0.01, "backoff_max": 0.1},
            "listen": {"port": 0},
            "fold_window": 0,
        },
        source="test",
    )
    outputs = build_outputs(config, state_dir=tmp_path / "state")
    try:
        outputs.sink.emit(Alert.new("Own rule", "Error", "from sysgram"))
        assert outputs.server is not None
        # Without a pipeline callback, ingested Falco alerts are passed on to the outputs.
        assert httpx.post(outputs.server.url + "/", json=FALCO_PAYLOAD).status_code == 200
        assert outputs.webhook is not None and outputs.webhook.wait_idle(10)
        metrics_text = httpx.get(outputs.server.url + "/metrics").text
    finally:
        outputs.close()
        receiver.close()
    rules = [json.loads(x)["rule"] for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert rules == ["Own rule", FALCO_PAYLOAD["rule"]]
    assert [json.loads(b)["rule"] for _, b in receiver.requests] == rules
    assert "sysgram_webhook_deliveries_total 2.0" in metrics_text
    assert 'sysgram_falco_alerts_ingested_total{via="http"} 1.0' in metrics_text


@pytest.mark.parametrize("url", ["http://soc:hunter2@127.0.0.1:99999/", "ftp://soc:hunter2@siem/", "http://soc:hunter2@:0/"])
def test_a_bad_webhook_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        OutputConfig.from_mapping({"webhook": {"url": url}}, source="/etc/sysgram.yaml")
    assert "outputs.webhook.url" in str(info.value) and "***@" in str(info.value)
    assert "hunter2" not in str(info.value)

"""``sysgram alerts ...`` through the real CLI entry point, and the alerts benchmark at its quick size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.respond import Alert, OutputConfig, WebhookSink


def test_alerts_test_writes_the_console_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "alerts.jsonl"
    assert main(["alerts", "test", "--jsonl", str(path), "--format", "ocsf"]) == 0
    assert "Sysgram test alert" in capsys.readouterr().out
    finding = json.loads(path.read_text())
    assert finding["class_uid"] == 2004 and finding["finding_info"]["title"] == "Sysgram test alert"


def test_alerts_test_with_a_bad_secret_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alerts", "test", "--webhook", "http://127.0.0.1:1/", "--secret", "whsec_***"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sysgram: error: --secret") and err.count("\n") == 1


def test_alerts_spool_reports_and_re_enables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = WebhookSink("http://soc:hunter2@127.0.0.1:1/", state_dir=tmp_path, close_timeout=0)
    sink.emit(Alert.new("r", "Notice", "o"))
    sink.spool.set_meta("disabled_url", "http://soc:hunter2@127.0.0.1:1/")  # as a 410 would have left it
    sink.close(timeout=0)
    assert main(["alerts", "spool", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pending"] == 1 and status["disabled_endpoint"] == "http://***@127.0.0.1:1/"  # no password
    assert main(["alerts", "spool", str(tmp_path), "--enable"]) == 0
    assert "re-enabled" in capsys.readouterr().out
    assert main(["alerts", "spool", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["disabled_endpoint"] is None


def test_alerts_spool_shows_the_status_while_the_agent_holds_the_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the running agent's sink holds the spool's lock, delivering (here: failing to) as an outage goes on
    sink = WebhookSink("http://127.0.0.1:1/", state_dir=tmp_path, close_timeout=0)
    try:
        for i in range(3):
            sink.emit(Alert.new("r", "Notice", f"o{i}"))
        assert main(["alerts", "spool", str(tmp_path), "--json"]) == 0  # was "in use by another process"
        status = json.loads(capsys.readouterr().out)
        assert status["pending"] == 3 and status["oldest_pending"] is not None
        assert main(["alerts", "spool", str(tmp_path), "--requeue-dead"]) == 2  # a change still needs the lock
        err = capsys.readouterr().err
        assert "in use by another process" in err and "stop the agent to change it" in err
        assert err.count("\n") == 1
    finally:
        sink.close(timeout=0)


def test_alerts_spool_without_a_spool_names_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["alerts", "spool", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_listen_host_alias_and_null_console() -> None:
    data = {"console": None, "listen": {"host": "127.0.0.1", "port": 1}}
    config = OutputConfig.from_mapping(data, source="x")
    assert config.console is None and config.listen is not None and config.listen.address == "127.0.0.1"


def test_bench_quick_delivers_everything() -> None:
    from agent.respond.bench import run

    figures = {f.name: f for f in run(quick=True)}
    assert figures["alerts not received"].value == 0
    webhook = [f.value for name, f in figures.items() if "alert" in f.unit or name.startswith("enqueue")]
    assert len(webhook) == 5 and all(isinstance(v, float) and v > 0 for v in webhook)
    # blocking on the real kernel: every victim killed, each latency measured (or why it was skipped)
    killed = figures.get("victims killed (SIGKILL) of 10")
    if killed is None:
        assert str(figures["verdict-to-kill latency"].value).startswith("skipped")
    else:
        assert killed.value == 10
        assert all(float(figures[f"open -> {what} p{q}"].value) > 0 for what in ("process dead", "block alert written")
                   for q in (50, 99))


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_alerts_listen_refuses_a_port_out_of_range(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["alerts", "listen", "--port", port, "--seconds", "0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--port" in err and "1-65535" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["alerts", "listen", "--seconds", "nan"], ["alerts", "listen", "--seconds", "-1"],
                                  ["alerts", "test", "--timeout", "-1"]])
def test_alert_commands_refuse_durations_that_are_not_positive(argv: list[str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "expected a number of seconds more than 0" in capsys.readouterr().err


def test_alerts_test_says_where_a_rejected_alert_went(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Rejecting(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(400)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Rejecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert main(["alerts", "test", "--webhook", url, "--state-dir", str(tmp_path), "--timeout", "5"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err  # it said "it stays in the spool", which a dead letter does not
    assert "rejected it, so it went to the dead letters" in err and "stays in the spool" not in err

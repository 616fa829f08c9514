"""Console, JSON lines (with rotation), fan-out and folding sinks."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DeliveryError
from agent.respond import Alert, ConsoleSink, Fanout, FoldingSink, JsonlSink, Metrics, sysgram_fields


def alert(i: int = 0, *, rule: str = "Test rule", pid: int = 10, output: str | None = None) -> Alert:
    return Alert.new(rule, "Warning", output or f"alert {i}", {"proc.pid": pid, "test.seq": i})


def test_console_shows_time_priority_rule_and_output() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, color=False)
    fields = sysgram_fields(score=0.9, verdict="block")
    a = Alert.new("Shell in container", "Critical", "bash spawned", fields)
    sink.emit(a)
    text = out.getvalue()
    assert "Critical" in text and "Shell in container" in text and "bash spawned" in text
    assert "score=0.9" in text and "verdict=block" in text
    assert text.startswith(a.time[:19])
    assert "\x1b[" not in text


def test_console_prints_one_line_whatever_the_alert_text_holds() -> None:
    out = io.StringIO()
    # an ingested alert's text is whatever the sender wrote
    ConsoleSink(out, color=False).emit(Alert.new("r\nFAKE", "Notice", "cat x\n2026 Critical FAKE: ok\x1b[2J"))
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text
    assert "r\\nFAKE" in text and "cat x\\n2026 Critical FAKE: ok\\x1b[2J" in text


def test_escaping_covers_reordering_characters_and_twice_is_once() -> None:
    from agent._text import escape_controls

    text = "evil\u202egpj.exe\u2028next\x85"  # a right-to-left override, a line separator, NEL
    once = escape_controls(text)
    assert once == "evil\\u202egpj.exe\\u2028next\\x85" and escape_controls(once) == once


def test_console_colours_by_priority_when_asked() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, color=True)
    sink.emit(Alert.new("r", "Critical", "o"))
    sink.emit(Alert.new("r", "Notice", "o"))
    first, second = out.getvalue().splitlines()
    critical = re.search(r"(\x1b\[[0-9;]+m)Critical", first)
    notice = re.search(r"(\x1b\[[0-9;]+m)Notice", second)
    assert critical and notice and critical.group(1) != notice.group(1)


def test_console_can_print_falco_json() -> None:
    out = io.StringIO()
    ConsoleSink(out, "falco", color=False).emit(alert(3))
    assert json.loads(out.getvalue())["output"] == "alert 3"


def test_jsonl_appended_to_a_file_ending_mid_line_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_bytes(b'{"ok": 1}\n{"partial":')  # a writer that died mid-line
    sink = JsonlSink(path)
    sink.emit(alert(1))
    sink.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[:2] == [b'{"ok": 1}', b'{"partial":'] and json.loads(lines[2])["output"] == "alert 1"
    sink = JsonlSink(path)  # a file that ends cleanly gets no blank line
    sink.emit(alert(2))
    sink.close()
    assert [json.loads(x)["output"] for x in path.read_bytes().split(b"\n")[2:] if x] == ["alert 1", "alert 2"]


def test_jsonl_writes_one_object_a_line_readable_at_once(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "alerts.jsonl"
    sink = JsonlSink(path)
    sink.emit(alert(1))
    sink.emit(alert(2))
    # Flushed per alert: readable before close.
    lines = path.read_text().splitlines()
    assert [json.loads(x)["output"] for x in lines] == ["alert 1", "alert 2"]
    sink.close()


def test_jsonl_rotates_by_size_and_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    one = len(alert(0).to_json()) + 1
    sink = JsonlSink(path, max_bytes=one * 3 + 5, backups=2)
    for i in range(12):
        sink.emit(alert(i))
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"]
    seqs = {
        name: [json.loads(x)["output_fields"]["test.seq"] for x in (tmp_path / name).read_text().splitlines()]
        for name in files
    }
    assert seqs == {"alerts.jsonl": [9, 10, 11], "alerts.jsonl.1": [6, 7, 8], "alerts.jsonl.2": [3, 4, 5]}
    assert all((tmp_path / n).stat().st_size <= one * 3 + 5 for n in files)


def test_jsonl_ocsf_format(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    sink = JsonlSink(path, fmt="ocsf")
    sink.emit(alert(1))
    sink.close()
    assert json.loads(path.read_text())["class_uid"] == 2004


def test_jsonl_unwritable_path_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DeliveryError, match=str(blocker)):
        JsonlSink(blocker / "alerts.jsonl")


class Broken:
    def emit(self, alert: Alert) -> None:
        raise OSError("disk on fire")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_fanout_keeps_going_when_one_sink_fails(tmp_path: Path) -> None:
    metrics = Metrics()
    path = tmp_path / "a.jsonl"
    fanout = Fanout([Broken(), JsonlSink(path)], metrics)
    fanout.emit(alert(1, rule="Rule A"))
    fanout.close()
    assert json.loads(path.read_text())["rule"] == "Rule A"
    assert metrics.value("sysgram_sink_errors_total", sink="Broken") == 1
    assert metrics.value("sysgram_alerts_total", rule="Rule A", priority="Warning") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def folded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_identical_repeats_fold_into_one_with_a_count(tmp_path: Path) -> None:
    path, clock = tmp_path / "a.jsonl", Clock()
    sink = FoldingSink(JsonlSink(path), window=0, clock=clock)
    sink.window_ns = 2_000_000_000  # set after construction: no background thread, time moved by hand
    for _ in range(5):
        sink.emit(alert(output="same"))
        clock.now += 100_000_000
    assert len(folded(path)) == 1  # the first passes at once, the repeats are held
    clock.now += 2_000_000_000
    sink.poll()
    rows = folded(path)
    assert len(rows) == 2
    assert "sysgram.count" not in rows[0]["output_fields"]
    assert rows[1]["output_fields"]["sysgram.count"] == 4
    sink.close()


def test_distinct_alerts_never_fold(tmp_path: Path) -> None:
    path, clock = tmp_path / "a.jsonl", Clock()
    sink = FoldingSink(JsonlSink(path), window=0, clock=clock)
    sink.window_ns = 10_000_000_000
    sink.emit(alert(output="same", pid=1))
    sink.emit(alert(output="same", pid=2))  # another process
    sink.emit(alert(output="same", pid=1, rule="Other rule"))
    sink.emit(alert(output="different", pid=1))
    sink.close()
    rows = folded(path)
    assert len(rows) == 4
    assert all("sysgram.count" not in r["output_fields"] for r in rows)


def test_folding_flushes_held_repeats_on_close(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    metrics = Metrics()
    sink = FoldingSink(JsonlSink(path), window=60.0, metrics=metrics)
    for _ in range(3):
        sink.emit(alert(output="same"))
    sink.close()
    rows = folded(path)
    assert [r["output_fields"].get("sysgram.count") for r in rows] == [None, 2]
    assert metrics.value("sysgram_alerts_folded_total") == 2

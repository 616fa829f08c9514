from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from tests.conftest import sysgram


def test_valid_config_loads(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("state_dir: /tmp/x\nenforce:\n  enabled: true\n  allow_exes: [/usr/sbin/sshd]\n")
    cfg = load_config(str(p))
    assert cfg.state_dir == "/tmp/x" and cfg.enforce.enabled and cfg.enforce.allow_exes == ("/usr/sbin/sshd",)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("model: a\nbogus: 1\n", 2, "unknown key 'bogus'"),
        ("enforce:\n  enabled: true\n  nope: 2\n", 3, "unknown key 'enforce.nope'"),
        ("flush_interval: fast\n", 1, "expected float"),
        ("enforce:\n  enabled: 3\n", 2, "expected bool"),
        ("model: [\n", 2, "invalid YAML"),
    ],
)
def test_bad_config_names_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(p))
    assert info.value.line == line
    assert words in str(info.value)
    assert str(info.value).startswith(f"{p}:{line}")


def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("outputs: {}\nsurprise: true\n")
    result = sysgram("run", "--config", str(p), "--no-model")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{p}:2" in lines[0]


def test_queue_max_events_is_read_and_checked(tmp_path: Path) -> None:
    p = tmp_path / "q.yaml"
    p.write_text("queue_max_events: 5000\n")
    assert load_config(str(p)).queue_max_events == 5000
    p.write_text("state_dir: /tmp/x\nqueue_max_events: 0\n")
    with pytest.raises(ConfigError, match="queue_max_events") as err:
        load_config(str(p))
    assert err.value.line == 2 and str(p) in str(err.value)
    p.write_text("queue_max_events: lots\n")
    with pytest.raises(ConfigError, match="expected int"):
        load_config(str(p))


def test_bad_listen_address_is_one_line(tmp_path: Path) -> None:
    result = sysgram(
        "run", "--no-model", "--no-default-rules", "--listen", "127.0.0.1:http", "--state-dir", str(tmp_path)
    )
    assert result.returncode == 2
    assert "--listen" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

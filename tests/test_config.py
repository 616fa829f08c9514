from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from tests.conftest import requires_bpf, sysgram


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


def _load_error(tmp_path: Path, text: str | bytes) -> ConfigError:
    p = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(p))
    assert str(info.value).startswith(f"{p}:")  # file and line, then the message: one line
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("enforce:\n  allow_pids: [abc]\n", 2, "enforce.allow_pids[0]: expected a positive pid"),
        ("enforce:\n  allow_pids:\n    - 12\n    - true\n", 4, "enforce.allow_pids[1]"),
        ("enforce:\n  deny_syscalls: {/bin/true: 5}\n", 2, "expected a list of strings"),
        ("enforce:\n  deny_syscalls:\n    /bin/true: read\n", 3, "got str 'read'"),
        ("enforce:\n  deny_syscalls:\n    /bin/true: [read, nosuchcall]\n", 3, "unknown syscall 'nosuchcall'"),
        ("enforce:\n  deny_syscalls:\n    bin/true: [read]\n", 3, "absolute executable path"),
        ("enforce:\n  deny_syscalls:\n    /bin/true: []\n", 3, "at least one syscall"),
        ("enforce:\n  deny_syscalls:\n" + "".join(f"    /opt/p{i}: [ptrace]\n" for i in range(64)), 2,
         "enforce.deny_syscalls: at most 63 programs (got 64)"),
        ("enforce:\n  block_min_priority: Critcal\n", 2, "unknown priority 'Critcal'"),
        ("enforce:\n  block_anomaly_score: .nan\n", 2, "enforce.block_anomaly_score: expected a finite"),
        ("enforce:\n  block_anomaly_score: -1\n", 2, "enforce.block_anomaly_score"),
        ("enforce:\n  block_anomaly_score: 1" + "0" * 400 + "\n", 2, "enforce.block_anomaly_score: expected a finite"),
        # one program both never blocked and under a deny list: the kernel keeps one policy per path
        ("enforce:\n  allow_exes: [/bin/true]\n  deny_syscalls:\n    /bin/true: [ptrace]\n", 4,
         "enforce.deny_syscalls./bin/true: this program is also in enforce.allow_exes"),
        ("enforce:\n  allow_exes: [1, 2]\n", 2, "enforce.allow_exes[0]: expected a non-empty string"),
        ("enforce:\n  allow_exes: [sshd]\n", 2, "absolute executable path"),
        ("enforce:\n  block_tags: sysgram.block\n", 2, "enforce.block_tags: expected list, got str"),
        ("detail_syscalls: [bogus_call]\n", 1, "unknown syscall 'bogus_call'"),
        ("compat_details: maybe\n", 1, "compat_details: expected one of auto, always, never, got 'maybe'"),
        ("compat_details: true\n", 1, "compat_details: expected str, got bool True"),
        ("flush_interval: -5\n", 1, "flush_interval: expected a finite number more than 0"),
        ("flush_interval: .inf\n", 1, "flush_interval"),
        ("state_dir: /tmp/a\nmodel: x\nstate_dir: /tmp/b\n", 3, "duplicate key 'state_dir' (first on line 1)"),
        ("enforce:\n  enabled: true\n  enabled: false\n", 3, "duplicate key 'enabled' (first on line 2)"),
        ("enforce:\n  block_ingested: true\n", 2, "needs outputs.listen.token"),
        ("enforce:\n  block_ingested: true\noutputs:\n  listen: {port: 9000}\n", 2, "outputs.listen.token"),
    ],
)
def test_bad_values_name_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    err = _load_error(tmp_path, text)
    assert err.line == line
    assert words in err.message


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    err = _load_error(tmp_path, b"state_dir: /tmp/x\n\xff\xfe bad\n")
    assert err.line == 2 and "UTF-8" in err.message


def test_deny_lists_accept_i386_only_names(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("enforce:\n  deny_syscalls:\n    /bin/true: [fstatat64, setuid32]\n")
    assert load_config(str(p)).enforce.deny_syscalls == {os.path.realpath("/bin/true"): ("fstatat64", "setuid32")}
    p.write_text("detail_syscalls: [fstatat64]\n")  # details are by native name
    with pytest.raises(ConfigError, match="unknown syscall 'fstatat64'"):
        load_config(str(p))


def test_enforcement_values_are_read(tmp_path: Path) -> None:
    real = tmp_path / "bin" / "tool"
    real.parent.mkdir()
    real.write_bytes(b"")
    (tmp_path / "link").symlink_to(real)
    p = tmp_path / "c.yaml"
    p.write_text(
        "enforce:\n"
        "  allow_pids: [42]\n"
        "  block_min_priority: critical\n"
        "  block_anomaly_score: 3\n"
        f"  deny_syscalls:\n    {tmp_path}/link: [ptrace, getppid]\n"
        "  block_ingested: true\n"
        "outputs:\n  listen: {token: s3cret}\n"
    )
    enforce = load_config(str(p)).enforce
    assert enforce.allow_pids == (42,)
    assert enforce.block_min_priority == "Critical"
    assert enforce.block_anomaly_score == 3.0
    assert dict(enforce.deny_syscalls) == {str(real): ("ptrace", "getppid")}  # resolved at load
    assert enforce.block_ingested


def test_cli_state_dir_that_cannot_be_used_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    recording = tmp_path / "none.parquet"
    for state_dir, words in (("/proc/sysgram-nope", "cannot create"), (str(a_file), "not a directory")):
        result = sysgram("replay", str(recording), "--no-model", "--state-dir", state_dir)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sysgram: error: --state-dir: ") and words in lines[0]


def test_config_state_dir_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model: ''\nstate_dir: /proc/sysgram-nope\n")
    result = sysgram("replay", str(tmp_path / "none.parquet"), "--no-model", "--config", str(p))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sysgram: error: {p}:2: state_dir: cannot create /proc/sysgram-nope: No such file or directory"
    ]


@pytest.mark.parametrize(
    ("section", "line", "words"),
    [
        ("outputs:\n  console: false\n  webhook: {url: ftp://x}\n", 3, "outputs.webhook.url"),
        ("outputs:\n  listen: {port: 99999}\n", 2, "outputs.listen.port"),
        ("verdict:\n  escalate: 1\n  anomaly_priority: Nope\n", 3, "verdict.anomaly_priority"),
        ("seccomp:\n  bogus: 1\n", 2, "seccomp.bogus"),
    ],
)
def test_other_rooms_sections_name_the_line(tmp_path: Path, section: str, line: int, words: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(section)
    result = sysgram("replay", str(tmp_path / "none.parquet"), "--no-model", "--no-default-rules",
                     "--config", str(p), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sysgram: error: {p}:{line}: {words}"), lines


@pytest.mark.parametrize(
    ("listen", "words"),
    [("99999", "1-65535"), ("0", "1-65535"), ("::1:8765", "brackets"), ("[nope]:8765", "not an IPv6")],
)
def test_bad_listen_option_is_one_line(tmp_path: Path, listen: str, words: str) -> None:
    result = sysgram("replay", str(tmp_path / "none.parquet"), "--no-model", "--no-default-rules",
                     "--listen", listen, "--state-dir", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--listen" in lines[0] and words in lines[0]


@pytest.mark.parametrize(
    ("options", "config", "prefix"),
    [
        (["--webhook", "ftp://soc.example"], "", "--webhook: outputs.webhook.url: expected an http://"),
        (["--listen", "10.1.2.3:8765"], "", "--listen: outputs.listen.token: required when listening on 10.1.2.3"),
        (["--listen", "10.1.2.3:8765"], "outputs:\n  listen: {port: 8765}\n",
         "--listen: outputs.listen.token: required"),
        ([], "outputs:\n  webhook: ftp://soc.example\n", "{config}:2: outputs.webhook.url: expected"),
    ],
)
def test_an_outputs_error_names_the_option_that_set_the_value(
    tmp_path: Path, options: list[str], config: str, prefix: str
) -> None:
    # Before: an option's bad value was reported as `<defaults>: outputs.webhook.url: ...`, naming a
    # config key the user never wrote; a value from the config file still names the file and line.
    args = [*options]
    path = tmp_path / "c.yaml"
    if config:
        path.write_text(config)
        args += ["--config", str(path)]
    result = sysgram("replay", str(tmp_path / "none.parquet"), "--no-model", "--no-default-rules",
                     "--state-dir", str(tmp_path / "state"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sysgram: error: " + prefix.format(config=path)), lines
    assert "<defaults>" not in lines[0]


@pytest.mark.parametrize(
    ("options", "config", "env", "first"),
    [
        # another key of a section an option also sets: the file's value, so the file's line
        (["--webhook", "https://soc.example/a"], "outputs:\n  webhook: {url: https://x.example, backoff_max: -1}\n",
         {}, "{config}:2: outputs.webhook.backoff_max"),
        # the short forms in the file, with the option that completes them: no crash, the config is fine
        (["--webhook-secret", "s3cret-s3cret-s3cret"], "outputs:\n  webhook: https://soc.example/a\n", {}, "{rec}"),
        (["--alerts-jsonl", "/tmp/sysgram-test-alerts.jsonl"], "outputs:\n  jsonl: /tmp/elsewhere.jsonl\n", {}, "{rec}"),
        # the ingestion token from the environment, as the Kubernetes manifest gives it
        ([], "outputs:\n  listen: {address: 0.0.0.0, port: 8765}\n", {"SYSGRAM_LISTEN_TOKEN": "t0ken-t0ken"}, "{rec}"),
        ([], "outputs:\n  listen: {address: 0.0.0.0, port: 8765}\n", {}, "{config}:2: outputs.listen.token: required"),
        # a Secret made --from-file ends in a newline; an empty section is a listener with its defaults
        ([], "outputs:\n  listen: {address: 0.0.0.0}\n", {"SYSGRAM_LISTEN_TOKEN": "t0ken-t0ken\n"}, "{rec}"),
        ([], "outputs:\n  listen: {}\n", {"SYSGRAM_LISTEN_TOKEN": "t0ken-t0ken"}, "{rec}"),
        # no listener here: the variable (which `sysgram alerts listen` reads too) is not this command's
        ([], "outputs:\n  console: {}\n", {"SYSGRAM_LISTEN_TOKEN": "t0ken-t0ken"}, "{rec}"),
        # a bad listen value in the file is named there, --listen or not
        (["--listen", "127.0.0.1:8765"], "outputs:\n  listen: 5\n", {}, "{config}:2: outputs.listen"),
    ],
)
def test_options_and_the_config_file_merge_and_errors_name_their_source(
    tmp_path: Path, options: list[str], config: str, env: dict[str, str], first: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config)
    recording = tmp_path / "none.parquet"
    result = sysgram("replay", str(recording), "--no-model", "--no-default-rules", "--state-dir",
                     str(tmp_path / "state"), "--config", str(path), *options, env={**os.environ, **env})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sysgram: error: " + first.format(config=path, rec=recording)), lines


def test_parse_listen_accepts_bracketed_ipv6() -> None:
    from agent.pipeline_commands import parse_listen

    assert parse_listen("[::1]:8766") == ("::1", 8766)
    assert parse_listen("8766") == ("127.0.0.1", 8766)
    assert parse_listen("10.0.0.1:80") == ("10.0.0.1", 80)


def test_learn_needs_positive_seconds(tmp_path: Path) -> None:
    for seconds in ("-1", "0", "nan"):
        result = sysgram("learn", "--seconds", seconds, "-o", str(tmp_path / "m.onnx"))
        assert result.returncode == 2
        assert "--seconds" in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "m.onnx").exists()


def test_webhook_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from agent.pipeline_commands import SECRET_ENV, _agent_options, _outputs_section

    parser = argparse.ArgumentParser()
    _agent_options(parser)
    monkeypatch.setenv(SECRET_ENV, "from-the-env")
    args = parser.parse_args(["--webhook", "http://127.0.0.1:9/hook"])
    section = _outputs_section(load_config_text("outputs: {console: false}\n"), args)
    assert section["webhook"] == {"url": "http://127.0.0.1:9/hook", "secret": "from-the-env"}
    # the command line still wins; without a webhook anywhere a secret is refused
    args = parser.parse_args(["--webhook", "http://127.0.0.1:9/hook", "--webhook-secret", "cli"])
    assert _outputs_section(load_config_text(""), args)["webhook"]["secret"] == "cli"
    with pytest.raises(ConfigError, match=SECRET_ENV):
        _outputs_section(load_config_text(""), parser.parse_args([]))
    monkeypatch.delenv(SECRET_ENV)
    assert "webhook" not in _outputs_section(load_config_text(""), parser.parse_args([]))


def load_config_text(text: str) -> AgentConfig:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        fh.write(text)
        fh.flush()
        return load_config(fh.name)


def test_priority_nice_defaults_to_a_boost_and_is_checked(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("state_dir: /tmp/x\n")
    assert load_config(str(p)).priority_nice == -10
    p.write_text("priority_nice: 0\n")
    assert load_config(str(p)).priority_nice == 0
    p.write_text("state_dir: /tmp/x\npriority_nice: -40\n")
    with pytest.raises(ConfigError, match="priority_nice") as err:
        load_config(str(p))
    assert err.value.line == 2


def test_a_config_nested_too_deeply_is_one_config_error(tmp_path: Path) -> None:
    path = tmp_path / "sysgram.yaml"
    path.write_text("verdict: " + "[" * 100_000 + "\n")  # was a RecursionError traceback
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == f"{path}: YAML nested too deeply"


def test_quiet_does_not_hide_a_bad_console_section(tmp_path: Path) -> None:
    """--quiet drops the console sink; a mistake in its section still gets its line (it was accepted)."""
    from agent.capture.recording import RecordingWriter

    rec = tmp_path / "r.parquet"
    RecordingWriter(str(rec)).close({})
    config = tmp_path / "sysgram.yaml"
    config.write_text("outputs:\n  console: {stream: stdnowhere}\n")
    result = sysgram("replay", str(rec), "--config", str(config), "--quiet", "--no-model",
                     "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert f"{config}:2: outputs.console.stream: expected one of" in result.stderr


def test_a_block_rule_no_loaded_rule_has_is_refused_at_its_line(tmp_path: Path) -> None:
    """A typo in enforce.block_rules would turn blocking off in silence."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("- rule: Real rule\n  desc: d\n  condition: evt.type = ptrace\n  output: o\n  priority: ERROR\n")
    p = tmp_path / "config.yaml"
    p.write_text("enforce:\n  enabled: true\n  block_rules:\n    - Real rule\n    - Reel rule\n")
    result = sysgram("run", "--config", str(p), "--no-model", "--no-default-rules", "--rules", str(rules),
                     timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sysgram: error: {p}:5: enforce.block_rules[1]: no loaded rule is named 'Reel rule': it would never block"
    ]


@requires_bpf  # the disabled-rule case starts the agent for a second
def test_block_rules_naming_a_disabled_rule_warn_and_the_agents_own_alerts_are_refused(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("- rule: Off here\n  desc: d\n  condition: evt.type = ptrace\n  output: o\n  priority: ERROR\n"
                     "  enabled: false\n")
    p = tmp_path / "config.yaml"
    p.write_text("enforce:\n  enabled: true\n  block_rules: [Sysgram anomalous syscall sequence]\n")
    result = sysgram("run", "--config", str(p), "--no-model", "--no-default-rules", "--rules", str(rules),
                     timeout=120)
    assert result.returncode == 2
    assert "enforce.block_rules[0]: 'Sysgram anomalous syscall sequence' is the agent's own alert" in result.stderr
    # a disabled rule is only warned of: checked with --seconds so that the agent, which starts, stops again
    p.write_text("enforce:\n  enabled: true\n  block_rules: [Off here]\n")
    result = sysgram("run", "--config", str(p), "--no-model", "--no-default-rules", "--rules", str(rules),
                     "--seconds", "1", "--quiet", "--state-dir", str(tmp_path / "state"), timeout=180)
    assert "enforce.block_rules[0]: the rule 'Off here' is disabled" in result.stderr


def test_rules_on_syscalls_the_capture_does_not_decode_are_named_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agent.falco import load_rules_text
    from agent.pipeline_commands import _warn_uncaptured

    rules = load_rules_text([("r.yaml", "- rule: Truncated log\n  desc: d\n  condition: evt.type in (ftruncate, openat)"
                                         "\n  output: o\n  priority: ERROR\n")])
    _warn_uncaptured(rules.rules)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sysgram: warning: rules name syscalls the capture does not decode, which never match here: "
                   "ftruncate (e.g. rule 'Truncated log' on ftruncate)"]
    _warn_uncaptured(load_rules_text([("r.yaml", "- rule: R\n  desc: d\n  condition: evt.type = openat\n"
                                                 "  output: o\n  priority: ERROR\n")]).rules)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('state_dir: "/var/lib/\\0x"\n', 1, "state_dir: contains a NUL byte"),
        ('enforce:\n  allow_exes: ["/bin/\\0x"]\n', 2, "enforce.allow_exes[0]: contains a NUL byte"),
        ('enforce:\n  deny_syscalls:\n    "/bin/\\0x": [read]\n', 3, "a key contains a NUL byte"),
    ],
)
def test_a_nul_byte_anywhere_is_one_line_at_its_place(tmp_path: Path, text: str, line: int, words: str) -> None:
    err = _load_error(tmp_path, text)
    assert err.line == line and words in err.message


def test_a_billion_laughs_config_is_refused_at_once(tmp_path: Path) -> None:
    """Nine aliases of nine aliases of ...: each node is walked once, not once per path to it."""
    import time

    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]  # 9**8 paths, unwalked: ~40 s
    started = time.monotonic()
    err = _load_error(tmp_path, "\n".join(lines) + "\n")
    assert time.monotonic() - started < 5
    assert err.line == 1 and "unknown key 'a0'" in err.message

"""The runtime model: loading (and refusing bad files), the score cache, alerts and their explanations."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.capture.names import syscall_number
from agent.cli import main
from agent.errors import ModelError
from agent.events import SYSCALL_DTYPE
from agent.model import Anomaly, AnomalyDetector, Model, known_path, load_model
from training.synthetic import ATTACK, HABITS, habit_trace, synthetic_traces
from training.train import TrainConfig, train_model

TINY = {"hidden": 32, "bottleneck": 16, "dim": 8}
ALPHA = "/usr/bin/alpha"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.onnx"
    cfg = TrainConfig(n=8, epochs=4, threads=1, min_program_syscalls=500, net=TINY, min_windows=16)
    train_model(synthetic_traces(40, seed=1), out, cfg, progress=False)
    return out


@pytest.fixture()
def model(model_path: Path) -> Model:
    return load_model(model_path)


def copy_model(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / "copy.onnx"
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    known = known_path(src)
    if known.exists():  # the sidecar names it by its own file name, next to the model
        shutil.copy(known, dst_dir / known.name)
    return dst


def started(det: AnomalyDetector, pid: int, *tids: int) -> AnomalyDetector:
    """The detector saw the process (and these threads) start: their first windows are padded starts."""
    for tid in (pid, *tids):
        det.on_fork(pid, tid)
    return det


def rows(names: list[str], tgid: int, tid: int | None = None, ts0: int = 0) -> np.ndarray:
    out = np.zeros(len(names), dtype=SYSCALL_DTYPE)
    out["ts"] = ts0 + np.arange(len(names)) * 1000
    out["tgid"] = tgid
    out["tid"] = tid if tid is not None else tgid
    out["nr"] = [syscall_number(nm) for nm in names]
    return out


# ---------------------------------------------------------------------------------------- loading


def test_missing_model_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file") as err:
        load_model(tmp_path / "absent.onnx")
    assert str(tmp_path / "absent.onnx") in str(err.value)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ModelError, match="a directory, not a model file"):
        load_model(tmp_path / "dir.onnx")


def test_missing_sidecar_names_the_sidecar(model_path: Path, tmp_path: Path) -> None:
    dst = tmp_path / "lonely.onnx"
    shutil.copy(model_path, dst)
    with pytest.raises(ModelError, match="sidecar missing") as err:
        load_model(dst)
    assert str(dst.with_suffix(".json")) in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_onnx_is_one_model_error(model_path: Path, tmp_path: Path, damage: str) -> None:
    dst = copy_model(model_path, tmp_path)
    data = dst.read_bytes()
    dst.write_bytes(b"not an onnx file at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelError) as err:
        load_model(dst)
    assert str(dst) in str(err.value) and "\n" not in str(err.value)
    # without the sidecar's checksum, onnxruntime itself must reject it, still as a ModelError
    side = json.loads(dst.with_suffix(".json").read_text())
    del side["onnx_sha256"]
    dst.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ModelError, match="not a loadable ONNX model") as err:
        load_model(dst)
    assert str(dst) in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(version=99), "unknown sidecar version 99"),
        (lambda s: s.update(vocabulary=[*s["vocabulary"], "extra_syscall"]), "vocab_size"),
        (lambda s: s.update(n=s["n"] * 2), "window width"),
        (lambda s: s.pop("thresholds"), "thresholds"),
        (lambda s: s.update(programs=["/usr/bin/x"]), "programs"),
    ],
)
def test_sidecar_that_does_not_match_is_refused(model_path: Path, tmp_path: Path, edit, message: str) -> None:
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    edit(side)
    dst.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ModelError, match=message) as err:
        load_model(dst)
    assert str(tmp_path) in str(err.value)


def test_malformed_sidecar_json_names_line_and_column(model_path: Path, tmp_path: Path) -> None:
    dst = copy_model(model_path, tmp_path)
    dst.with_suffix(".json").write_text('{"format": "sysgram-model",\n  "version": }')
    with pytest.raises(ModelError) as err:
        load_model(dst)
    assert str(err.value).startswith(f"{dst.with_suffix('.json')}:2:")


def test_cli_turns_a_bad_recording_into_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"nope")
    code = main(["train", "--input", str(bad), "-o", str(tmp_path / "m.onnx"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(bad) in err


# ---------------------------------------------------------------------------------------- scoring


def test_repeated_windows_are_not_scored_again(model: Model) -> None:
    det = started(AnomalyDetector(model, cache_size=4096), 10, 11)
    rng = np.random.default_rng(0)
    batch = rows(habit_trace(HABITS[ALPHA], 400, rng), tgid=10)
    det.push(batch, {10: ALPHA})
    scored, runs = det.stats["windows_scored"], model.session_runs
    assert 0 < scored < len(batch)  # repetitive traffic: distinct windows only
    # the same traffic from another thread of the same program: all from the cache, no session run
    again = batch.copy()
    again["tid"] = 11
    det.push(again, {10: ALPHA})
    assert det.stats["windows_scored"] == scored + det.model.n - 1 or det.stats["windows_scored"] >= scored
    assert det.stats["cache_hits"] >= len(batch) - scored
    # the exact same windows again (thread 10 carries on the same loop): nothing new reaches onnxruntime
    det2 = started(AnomalyDetector(model, cache_size=4096), 10)
    det2.push(batch, {10: ALPHA})
    first_runs = model.session_runs
    det2.on_exec(10, [10])
    det2.push(batch, {10: ALPHA})
    assert model.session_runs == first_runs
    assert det2.stats["windows_scored"] == det.stats["windows_scored"] - (det.stats["windows_scored"] - scored)
    assert det2.stats["cache_hits"] >= len(batch)
    assert runs >= 1


def test_cache_off_scores_every_window(model: Model) -> None:
    det = started(AnomalyDetector(model, cache_size=0), 3)
    batch = rows(habit_trace(HABITS[ALPHA], 100, np.random.default_rng(1)), tgid=3)
    det.push(batch, {3: ALPHA})
    det.push(batch, {3: ALPHA})
    assert det.stats["cache_hits"] == 200 - det.stats["windows_scored"]
    assert det.stats["windows_scored"] > 100


def test_attack_raises_one_explained_anomaly_and_normal_does_not(model: Model) -> None:
    det = started(AnomalyDetector(model, cache_size=4096, alert_every_ns=10**15), 20)
    rng = np.random.default_rng(2)
    normal = rows(habit_trace(HABITS[ALPHA], 300, rng), tgid=20)
    assert det.push(normal, {20: ALPHA}) == []
    state = det.state(20)
    assert state is not None and not state.is_anomalous and state.score <= state.threshold
    evil = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)]
    found = det.push(rows(evil, tgid=21), {21: ALPHA})
    assert len(found) == 1
    a = found[0]
    assert (a.pid, a.exe, a.name) == (21, ALPHA, "alpha")
    assert a.process_score > a.process_threshold and 0 < len(a.window) <= model.n
    assert all(name in a.window and a.window[pos] == name for pos, name, _ in a.contributions)
    assert 0 < sum(share for _, _, share in a.contributions) <= 1.0001
    assert a.contributions[0][1] in a.explanation and "alpha (pid 21)" in a.explanation
    fields = a.output_fields()
    assert fields["proc.exe"] == ALPHA and fields["sysgram.anomaly.window"] == " ".join(a.window)
    # the same process keeps misbehaving: state stays current but no alert storm
    more = det.push(rows(evil, tgid=21, ts0=10**9), {21: ALPHA})
    assert more == []
    st = det.state(21)
    assert st is not None and st.is_anomalous and st.windows > 300


def test_unknown_program_uses_the_generic_slot_and_unk_is_counted(model: Model) -> None:
    det = started(AnomalyDetector(model), 30)
    det.push(rows(["read", "ptrace", "bpf", "read"], tgid=30), {30: "/opt/never/seen"})
    assert det.stats["unk_tokens"] == 2
    st = det.state(30)
    assert st is not None and st.exe == "/opt/never/seen" and "<unk>" in st.window


def test_exited_processes_stay_readable_for_a_while_then_are_forgotten(model: Model) -> None:
    from agent.model._detector import EXITED_KEEP_NS

    det = AnomalyDetector(model, cache_size=4096)
    rng = np.random.default_rng(3)
    for pid in (30, 31):
        det.push(rows(habit_trace(HABITS[ALPHA], 100, rng), tgid=pid), {pid: ALPHA})
    det.on_process_exit(30, ts=10**9)
    assert det.state(30) is not None  # a Falco alert about it may still come in
    # pid 31 is reused by a new process before 30's grace period ends: the new one's state is kept
    det.on_process_exit(31, ts=10**9 + 1)
    det.on_exec(31, (31,))
    det.push(rows(habit_trace(HABITS[ALPHA], 100, rng), tgid=31, ts0=2 * 10**9), {31: ALPHA})
    det.on_process_exit(99, ts=10**9 + EXITED_KEEP_NS + 2)
    assert det.state(30) is None
    assert det.state(31) is not None
    assert det.stats["processes"] == 1


def test_only_the_latest_exited_processes_are_kept_under_churn(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.model._detector as detector_module

    monkeypatch.setattr(detector_module, "EXITED_KEEP_MAX", 3)
    det = AnomalyDetector(model, cache_size=4096)
    rng = np.random.default_rng(4)
    for pid in range(40, 46):
        det.push(rows(habit_trace(HABITS[ALPHA], 30, rng), tgid=pid), {pid: ALPHA})
    for k, pid in enumerate(range(40, 46)):  # six exits within the grace period
        det.on_process_exit(pid, ts=10**9 + k)
    assert [pid for pid in range(40, 46) if det.state(pid) is not None] == [43, 44, 45]
    assert det.stats["processes"] == 3


def test_one_program_alerting_in_every_process_is_limited_per_minute(model: Model) -> None:
    det = AnomalyDetector(model, cache_size=4096, program_alerts=2)
    rng = np.random.default_rng(9)
    evil = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)]
    found = []
    for pid in range(40, 45):  # five processes of one program, each doing what it never did
        found += det.push(rows(evil, tgid=pid, ts0=pid * 10**6), {pid: ALPHA})
    assert [a.pid for a in found] == [40, 41]
    assert det.stats["anomalies_suppressed"] == 3
    # the cross-check still sees them
    assert all((s := det.state(pid)) is not None and s.is_anomalous for pid in range(40, 45))
    other = det.push(rows(evil, tgid=50, ts0=50 * 10**6), {50: "/usr/bin/beta"})
    assert [a.pid for a in other] == [50]  # another executable has its own allowance
    later = det.push(rows(evil, tgid=60, ts0=61 * 10**9), {60: ALPHA})  # a minute on: alpha may alert again
    assert (later[0].pid, later[0].held_back) == (60, 0)
    # ... and the three held back come out as one summary: the worst of them, standing for all three
    (summary,) = later[1:]
    assert (summary.held_back, summary.held_back_pids, summary.exe) == (3, (42, 43, 44), ALPHA)
    assert summary.pid in (42, 43, 44) and summary.process_score > summary.process_threshold
    assert summary.output_fields()["sysgram.anomaly.held_back_pids"] == "42 43 44"
    assert "sysgram.anomaly.held_back" not in later[0].output_fields()
    assert det.stats["held_back_alerts"] == 1 and det.release_held(None) == []  # each summary goes out once
    unlimited = AnomalyDetector(model, cache_size=4096, program_alerts=0)
    alerts = [a for pid in range(70, 75) for a in unlimited.push(rows(evil, tgid=pid), {pid: ALPHA})]
    assert len(alerts) == 5


def test_what_an_anomalous_process_was_outlives_its_exec_for_the_rules(model: Model) -> None:
    det = AnomalyDetector(model, cache_size=4096)
    rng = np.random.default_rng(9)
    odd = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)]
    det.push(rows(odd, tgid=40), {40: ALPHA})
    det.push(rows(habit_trace(HABITS[ALPHA], 300, rng), tgid=41), {41: ALPHA})
    before = det.state(40)
    assert before is not None and before.is_anomalous and not det.state(41).is_anomalous  # type: ignore[union-attr]
    det.on_exec(40, (40,), ts=10**10)  # it exec'd a shell in place
    det.on_exec(41, (41,), ts=10**10)
    assert det.state(40) is None and det.exec_origin(40) == before  # the shell's own state starts afresh
    assert det.exec_origin(41) is None  # a normal process exec'ing leaves nothing
    det.on_exec(40, (40,), ts=10**10 + 1)  # the new program (env, nice) execs the shell at once: no state between
    assert det.exec_origin(40) == before
    det.on_fork(40, 40, ts=2 * 10**10)  # the pid now names another process
    assert det.exec_origin(40) is None


def test_a_spent_quota_cannot_hide_a_later_process_the_worst_held_back_is_summarised(model: Model) -> None:
    det = AnomalyDetector(model, cache_size=4096, program_alerts=2)
    rng = np.random.default_rng(9)
    odd = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)]
    found = [a for pid in (40, 41, 42) for a in det.push(rows(odd, tgid=pid, ts0=pid * 10**6), {pid: ALPHA})]
    assert [a.pid for a in found] == [40, 41]  # the quota, spent; 42 held back
    # then the process that matters, within the same minute: far worse than the ones that spent the quota
    worse = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)] * 2
    assert det.push(rows(worse, tgid=43, ts0=43 * 10**6), {43: ALPHA}) == []
    assert det.release_held(30 * 10**9) == []  # not yet a limit period since the first held back
    (summary,) = det.release_held(None)  # the stream ended: nothing judged anomalous stays unsaid
    assert (summary.held_back, summary.held_back_pids) == (2, (42, 43))
    worst = max((det.state(42), det.state(43)), key=lambda s: s.score if s else 0.0)
    assert worst is not None and summary.process_score == pytest.approx(worst.score)


def pipeline_writing_alerts(tmp_path: Path, table: Any = None) -> tuple[Any, Path]:
    """A Pipeline (no enforcement) whose alerts go to ``tmp_path/alerts.jsonl``, as `sysgram run` writes them."""
    from agent.config import EnforceConfig
    from agent.pipeline import Pipeline
    from agent.proc import ProcessTable
    from agent.respond import JsonlConfig, OutputConfig, build_outputs
    from agent.verdict import DecisionTable

    alerts = tmp_path / "alerts.jsonl"
    outputs = build_outputs(OutputConfig(console=None, jsonl=JsonlConfig(str(alerts)), fold_window=0),
                            state_dir=tmp_path)
    pipeline = Pipeline(table=ProcessTable() if table is None else table, outputs=outputs,
                        decisions=DecisionTable.from_mapping({}, EnforceConfig(), source="test"))
    return pipeline, alerts


def test_the_agent_alerts_what_is_still_held_back_when_its_stream_ends(model: Model, tmp_path: Path) -> None:
    from agent.pipeline import ANOMALY_RULE

    pipeline, alerts = pipeline_writing_alerts(tmp_path)
    det = pipeline.detector = AnomalyDetector(model, cache_size=4096, program_alerts=1)
    rng = np.random.default_rng(9)
    odd = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)]
    for pid in (40, 41, 42):
        for anomaly in det.push(rows(odd, tgid=pid, ts0=pid * 10**6), {pid: ALPHA}):
            pipeline._anomaly(anomaly)  # what handle() does with what push returns
    pipeline.finish()
    pipeline.outputs.close()
    records = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert [r["rule"] for r in records] == [ANOMALY_RULE, ANOMALY_RULE]
    summary = records[1]
    assert summary["output_fields"]["sysgram.anomaly.held_back"] == 2
    assert summary["output_fields"]["sysgram.anomaly.held_back_pids"] == "41 42"
    assert summary["output"].startswith(f"2 anomalous processes of {ALPHA} were held back by the per-program "
                                        "alert limit (pids 41 42); the highest-scoring of them: Anomalous")


@pytest.mark.parametrize("held_at_s", [1, 59])
def test_a_held_back_process_is_one_process_in_its_summary_and_never_a_follow_up(model: Model,
                                                                                 held_at_s: int) -> None:
    det = started(AnomalyDetector(model, cache_size=4096, program_alerts=1, alert_every_ns=60 * 10**9), 40, 41)
    rng = np.random.default_rng(5)
    evil = [*habit_trace(HABITS["/usr/bin/beta"], 150, rng), *(ATTACK * 20)]
    assert [a.pid for a in det.push(rows(evil, tgid=40), {40: ALPHA})] == [40]
    assert det.push(rows(evil, tgid=41, ts0=held_at_s * 10**9), {41: ALPHA}) == []  # held: the quota is spent
    # it then makes a syscall its program never made: it was never alerted, so no "follow-up" (and not twice)
    later = det.push(rows([*evil, "swapon", *evil], tgid=41, ts0=(held_at_s + 3) * 10**9), {41: ALPHA})
    assert [a for a in later if not a.held_back] == []
    summaries = [a for a in later if a.held_back] + det.release_held(None)
    assert [(a.held_back, a.held_back_pids) for a in summaries] == [(1, (41,))]


def test_an_alert_about_a_pid_reused_since_its_anomaly_does_not_borrow_the_new_process(model: Model,
                                                                                       tmp_path: Path) -> None:
    from agent.proc import ProcessTable
    from agent.proc.info import ProcessInfo

    table = ProcessTable()
    table.add(ProcessInfo(pid=77, ppid=1, comm="alpha", exe=ALPHA, args=(ALPHA, "--job"), start_ns=10))
    table.add(ProcessInfo(pid=78, ppid=1, comm="vim", exe="/usr/bin/vim", args=("vim",), start_ns=10))
    table.add(ProcessInfo(pid=79, ppid=1, comm="alpha", exe=ALPHA, args=(ALPHA, "--new"), start_ns=5 * 10**9))
    pipeline, alerts = pipeline_writing_alerts(tmp_path, table)
    rng = np.random.default_rng(9)
    odd = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)]
    det = AnomalyDetector(model, cache_size=4096)
    for pid in (77, 78, 79):
        (anomaly,) = det.push(rows(odd, tgid=pid, ts0=10**9), {pid: ALPHA})  # all judged as alpha at ~1 s
        pipeline._anomaly(anomaly)
    pipeline.outputs.close()
    fields = {r["output_fields"]["proc.pid"]: r["output_fields"] for r in map(json.loads, alerts.read_text().splitlines())}
    assert fields[77]["proc.cmdline"] == "alpha --job"  # the same process: the table's facts (comm + args)
    assert fields[78]["proc.cmdline"] is None and fields[78]["proc.name"] == "alpha"  # another program now
    assert fields[79]["proc.cmdline"] is None  # started after the anomaly: not the process it was about


def test_a_shell_exec_is_cross_checked_with_its_spawners_anomaly(model: Model, tmp_path: Path) -> None:
    from agent.events import DetailEvent
    from agent.falco import Engine, load_rules
    from agent.pipeline_commands import _anomaly_fields
    from agent.proc import ProcessTable
    from agent.proc.info import ProcessInfo

    table = ProcessTable()
    table.add(ProcessInfo(pid=400, ppid=1, comm="alpha", exe=ALPHA, args=(ALPHA,), start_ns=10))
    table.add(ProcessInfo(pid=401, ppid=400, comm="sh", exe="/usr/bin/sh", args=("sh", "-c", "id"), start_ns=10))
    pipeline, alerts = pipeline_writing_alerts(tmp_path, table)
    det = pipeline.detector = AnomalyDetector(model, cache_size=4096)
    rules, _ = load_rules([str(Path(__file__).resolve().parents[1] / "rules" / "sysgram_rules.yaml")])
    pipeline.engine = Engine(rules, table.get, _anomaly_fields(det.state),
                             exec_origin_lookup=_anomaly_fields(det.exec_origin))
    rng = np.random.default_rng(9)
    det.push(rows([ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)], tgid=400), {400: ALPHA})
    assert (parent := det.state(400)) is not None and parent.is_anomalous
    pipeline.handle([DetailEvent(2 * 10**9, 401, 401, "execve", 59, 0, {"filename": "/usr/bin/sh",
                                                                        "argv": ["sh", "-c", "id"]})])
    pipeline.outputs.close()
    (alert,) = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert alert["rule"] == "Anomalous process spawned a shell"
    reasons = alert["output_fields"]["sysgram.verdict.reasons"]
    assert any(r.startswith("anomaly:") and "its spawner (pid 400, alpha)" in r for r in reasons), reasons


def test_held_back_summaries_are_bounded_and_never_dropped(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.model._detector as detector_module

    monkeypatch.setattr(detector_module, "PROGRAMS_LIMITED_MAX", 2)
    monkeypatch.setattr(detector_module, "HELD_PIDS_MAX", 1)
    det = AnomalyDetector(model, cache_size=4096, program_alerts=1)
    rng = np.random.default_rng(9)
    odd = [ATTACK[int(i)] for i in rng.integers(len(ATTACK), size=300)]
    exes = ["/usr/bin/a", "/usr/bin/b", "/usr/bin/c"]
    released = []
    for k, exe in enumerate(exes):  # each: one alert, then two held back
        for j in range(3):
            pid = 100 + 10 * k + j
            released += det.push(rows(odd, tgid=pid, ts0=(k * 3 + j) * 10**6), {pid: exe})
    summaries = [a for a in released if a.held_back] + det.release_held(None)
    assert sorted((a.exe, a.held_back, a.held_back_pids) for a in summaries) == [
        ("/usr/bin/a", 2, (101,)), ("/usr/bin/b", 2, (111,)), ("/usr/bin/c", 2, (121,))]
    assert [a.exe for a in released if a.held_back] == ["/usr/bin/a"]  # pushed out early by the bound


def test_the_model_judges_a_process_by_its_program_not_its_interpreter(model: Model) -> None:
    # a script run by bash: exe is bash, the program is the script the model was trained on
    batch = rows(habit_trace(HABITS[ALPHA], 200, np.random.default_rng(7)), tgid=50)
    as_script = started(AnomalyDetector(model, cache_size=0), 50)
    as_script.push(batch, {50: "/usr/bin/bash"}, {50: ALPHA})
    as_exe = started(AnomalyDetector(model, cache_size=0), 50)
    as_exe.push(batch, {50: ALPHA})
    as_bash = started(AnomalyDetector(model, cache_size=0), 50)
    as_bash.push(batch, {50: "/usr/bin/bash"})
    script, exe, bash = as_script.state(50), as_exe.state(50), as_bash.state(50)
    assert script is not None and exe is not None and bash is not None
    assert script.exe == "/usr/bin/bash"  # alerts still name the executable
    assert script.score == pytest.approx(exe.score) and script.threshold == exe.threshold
    assert script.score != pytest.approx(bash.score)  # bash is not a program this model knows: generic slot



def test_the_pipeline_hands_the_detector_each_process_program(model: Model, tmp_path: Path) -> None:
    from agent.events import ProcEvent
    from agent.pipeline import Pipeline
    from agent.proc import ProcessTable

    table = ProcessTable(proc_root=str(tmp_path / "no-proc"))  # a replay's view: events only
    seen: list[tuple[dict[int, str], dict[int, str] | None]] = []
    det = AnomalyDetector(model, cache_size=0)
    real_push = det.push

    def push(batch: np.ndarray, exe_of: Mapping[int, str], program_of: Mapping[int, str] | None = None
             ) -> list[Anomaly]:
        seen.append((dict(exe_of), None if program_of is None else dict(program_of)))
        return real_push(batch, exe_of, program_of)

    det.push = push  # type: ignore[method-assign]
    pipeline = Pipeline(table=table, detector=det)
    pipeline.handle([ProcEvent("fork", 1, 70, 70, ppid=1, comm="sh"),
                     ProcEvent("exec", 2, 70, 70, comm="backup.sh", filename="/opt/backup.sh")])
    pipeline.handle([rows(habit_trace(HABITS[ALPHA], 50, np.random.default_rng(3)), tgid=70, ts0=10)])
    assert seen and seen[-1][1] == {70: "/opt/backup.sh"}


def test_the_shipped_model_says_at_start_that_it_does_not_know_this_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from agent.config import AgentConfig
    from agent.pipeline_commands import DEFAULT_MODEL, SHIPPED_MODEL_NOTE, build_pipeline

    args = argparse.Namespace(quiet=True, alerts_jsonl=None, webhook=None, webhook_secret=None, falco_file=None,
                              listen=None, state_dir=str(tmp_path / "state"))

    def started_with(model: Path) -> str:
        cfg = AgentConfig(state_dir=str(tmp_path / "state"), default_rules=False, model=str(model))
        pipeline, _ = build_pipeline(cfg, args)
        assert pipeline.detector is not None
        return capsys.readouterr().err

    assert SHIPPED_MODEL_NOTE in started_with(DEFAULT_MODEL)
    assert "sysgram learn" in SHIPPED_MODEL_NOTE
    assert SHIPPED_MODEL_NOTE not in started_with(copy_model(DEFAULT_MODEL, tmp_path))  # a host's own model


# ---------------------------------------------------------------------------------------- new syscalls


def test_the_model_knows_which_syscalls_each_program_made(model: Model) -> None:
    assert model.made is not None
    made = {p: {model.vocabulary[t] for t in np.flatnonzero(model.made[model.program_id(p)])} for p in HABITS}
    assert set(HABITS[ALPHA]) <= made[ALPHA] and not made[ALPHA] & {"socket", "connect", "epoll_wait"}
    assert set(HABITS["/usr/bin/beta"]) <= made["/usr/bin/beta"] and "futex" not in made["/usr/bin/beta"]
    assert model.made[0].all()  # the generic slot: a program never seen has no syscalls of its own


def test_an_anomaly_names_the_syscalls_its_program_never_made(model: Model) -> None:
    from agent.model._detector import NEW_SYSCALLS_MAX

    det = started(AnomalyDetector(model, alert_every_ns=10**15), 40, 41, 42)
    rng = np.random.default_rng(5)
    det.push(rows(habit_trace(HABITS[ALPHA], 300, rng), tgid=40), {40: ALPHA})
    state = det.state(40)
    assert state is not None and state.new_syscalls == ()
    # alpha doing beta's networking, then the attack's syscalls (outside the vocabulary: <unk> to the
    # network, still named here from their numbers)
    evil = [*habit_trace(HABITS["/usr/bin/beta"], 150, rng), *(ATTACK * 20)]
    (found,) = det.push(rows(evil, tgid=41), {41: ALPHA})
    alpha_made = set(HABITS[ALPHA])
    expected = tuple(dict.fromkeys(nm for nm in evil if nm not in alpha_made))
    assert "setuid" in expected and "socket" in expected and "close" not in expected
    assert found.new_syscalls == expected
    assert found.output_fields()["sysgram.anomaly.new_syscalls"] == " ".join(expected)
    assert "never made while learning: socket, connect" in found.explanation
    later = det.state(41)
    assert later is not None and later.new_syscalls == expected
    # bounded per process, in the order first made
    many = ["getuid", "getgid", "geteuid", "getegid", "setpgid", "getpgrp", "setsid", "uname", "sysinfo",
            "times", "getrusage", "umask", "chdir", "fchdir", "rename", "mkdir", "rmdir", "link", "symlink"]
    det.push(rows([*many, *many], tgid=42), {42: ALPHA})
    crowded = det.state(42)
    assert crowded is not None and crowded.new_syscalls == tuple(many[:NEW_SYSCALLS_MAX])
    # a program the model never saw (generic slot) has no syscalls of its own to compare with
    det.on_fork(43, 43)
    det.push(rows(ATTACK * 10, tgid=43), {43: "/opt/never/seen"})
    unknown = det.state(43)
    assert unknown is not None and unknown.new_syscalls == ()


def test_syscalls_new_after_the_alert_raise_one_follow_up_each_time_they_grow(model: Model) -> None:
    from agent.model._detector import NEW_SYSCALLS_MAX

    det = started(AnomalyDetector(model, alert_every_ns=60 * 10**9), 41)
    rng = np.random.default_rng(5)
    evil = [*habit_trace(HABITS["/usr/bin/beta"], 150, rng), *(ATTACK * 20)]
    (first,) = det.push(rows(evil, tgid=41), {41: ALPHA})
    assert first.new_since_alert == () and "sysgram.anomaly.new_since_alert" not in first.output_fields()
    assert len(first.new_syscalls) == NEW_SYSCALLS_MAX - 1 and "swapon" not in first.new_syscalls
    # within the minute: more of the same says nothing new ...
    assert det.push(rows(evil, tgid=41, ts0=2 * 10**9), {41: ALPHA}) == []
    # ... a syscall alpha never made does, once
    later = [*evil, "swapon", *evil]
    (follow_up,) = det.push(rows(later, tgid=41, ts0=4 * 10**9), {41: ALPHA})
    assert follow_up.pid == 41 and follow_up.new_since_alert == ("swapon",)
    assert follow_up.new_syscalls == (*first.new_syscalls, "swapon")
    assert follow_up.output_fields()["sysgram.anomaly.new_since_alert"] == "swapon"
    # the list is bounded, and so are follow-ups: nothing more is added to say within the minute
    assert det.push(rows([*later, "mount", "reboot"], tgid=41, ts0=6 * 10**9), {41: ALPHA}) == []


def test_new_syscalls_ride_the_cache_and_leave_every_score_as_it_was(model: Model) -> None:
    from agent.events import FLAG_COMPAT

    rng = np.random.default_rng(6)
    evil = [*habit_trace(HABITS["/usr/bin/beta"], 120, rng), *(["getrandom"] * 400), *(ATTACK * 5)]
    expected = tuple(dict.fromkeys(nm for nm in evil if nm not in HABITS[ALPHA]))
    blind = replace(model, made=None)  # the same network without the sets: what the scores must stay
    for cache_size in (65536, 0):
        det = started(AnomalyDetector(model, cache_size=cache_size, alert_every_ns=10**15), 50, 51)
        plain = started(AnomalyDetector(blind, cache_size=cache_size, alert_every_ns=10**15), 50, 51)
        for pid in (50, 51):  # 51 makes the same windows: with the cache on, every one is a hit
            scored = det.stats["windows_scored"]
            det.push(rows(evil, tgid=pid), {pid: ALPHA})
            plain.push(rows(evil, tgid=pid), {pid: ALPHA})
            got, want = det.state(pid), plain.state(pid)
            assert got is not None and want is not None and got.new_syscalls == expected, (cache_size, pid)
            assert want.new_syscalls == ()
            assert (got.score, got.window_score, got.is_anomalous) == (want.score, want.window_score, want.is_anomalous)
            if cache_size and pid == 51:
                assert det.stats["windows_scored"] == scored  # the names came from the cache's signs
    # threads of one process: names in the order made, across threads; a 32-bit syscall is marked
    det = started(AnomalyDetector(model, alert_every_ns=10**15), 60, 61, 62)
    first = rows(["socket"], tgid=60, tid=62, ts0=0)
    second = rows(["ptrace"], tgid=60, tid=61, ts0=10**9)
    compat = rows(["read"], tgid=60, tid=61, ts0=2 * 10**9)
    compat["nr"], compat["flags"] = syscall_number("mprotect", compat=True), FLAG_COMPAT
    det.push(np.concatenate([second, first, compat]), {60: ALPHA})
    state = det.state(60)
    assert state is not None and state.new_syscalls == ("socket", "ptrace", "mprotect(i386)")


# ---------------------------------------------------------------------------------------- sysgram inspect MODEL


@pytest.mark.parametrize(("damage", "named"), [
    (lambda s: s["thresholds"]["process"].update({"*": float("nan")}), "thresholds.process['*']"),
    (lambda s: s["thresholds"]["window"].update({ALPHA: float("inf")}), f"thresholds.window[{ALPHA!r}]"),
    (lambda s: s["thresholds"]["process"].update({ALPHA: -1}), f"thresholds.process[{ALPHA!r}]"),
    (lambda s: s["thresholds"].update({"min_windows": 1e30}), "thresholds.min_windows"),
    (lambda s: s["thresholds"].update({"target_process_far": 2}), "thresholds.target_process_far"),
    (lambda s: s.update({"unk_cost": float("nan")}), "unk_cost"),
    (lambda s: s.update({"unk_cost": -100}), "unk_cost"),
    (lambda s: s.update({"nll_cap": float("inf")}), "nll_cap"),
    (lambda s: s.update({"aggregate": "bogus"}), "aggregate"),
    (lambda s: s.update({"specials": {"pad": 999, "unk": -1, "mask": "x"}}), "specials"),
])
def test_a_sidecar_whose_values_would_switch_detection_off_is_refused(
    model_path: Path, tmp_path: Path, damage: Any, named: str
) -> None:
    """Loaded, these gave a model that never alerts (NaN is never crossed) or always does, silently."""
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    damage(side)
    dst.with_suffix(".json").write_text(json.dumps(side))  # Python writes NaN/Infinity as JSON extensions
    with pytest.raises(ModelError) as err:
        load_model(dst)
    assert named in str(err.value) and str(dst.with_suffix(".json")) in str(err.value)


def test_a_sidecar_with_a_whole_number_written_as_a_float_still_loads(model_path: Path, tmp_path: Path) -> None:
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    side["thresholds"]["min_windows"] = float(side["thresholds"]["min_windows"])  # 16.0: it loaded before
    dst.with_suffix(".json").write_text(json.dumps(side))
    assert load_model(dst).sidecar.thresholds.min_windows == int(side["thresholds"]["min_windows"])


def test_a_sidecar_that_is_not_text_or_nested_too_deep_is_one_line(model_path: Path, tmp_path: Path) -> None:
    dst = copy_model(model_path, tmp_path)
    dst.with_suffix(".json").write_bytes(b"\xff\xfe junk")
    with pytest.raises(ModelError, match="not UTF-8"):
        load_model(dst)
    dst.with_suffix(".json").write_text("[" * 100_000)
    with pytest.raises(ModelError, match="nested too deeply"):
        load_model(dst)


def test_inspect_shows_what_a_model_knows(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(model_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    by_name = {p["program"]: p for p in summary["programs"]}
    side = json.loads(model_path.with_suffix(".json").read_text())
    assert list(by_name) == side["programs"] and summary["program_slots"] == len(side["programs"])
    assert summary["known_windows"] == side["known_windows"]["windows"] > 0
    for exe, habit in HABITS.items():
        assert by_name[exe]["syscalls_made"] == len(set(habit))
        assert by_name[exe]["process_threshold"] == side["thresholds"]["process"][exe]
        assert by_name[exe]["judged_traces"] == side["calibration"]["programs"][exe]["judged_traces"]
    assert by_name["*"]["syscalls_made"] is None  # the generic slot has no syscalls of its own

    assert main(["inspect", str(model_path), "--program", ALPHA, "--json"]) == 0
    (alpha,) = json.loads(capsys.readouterr().out)["programs"]
    assert alpha["syscalls"] == sorted(set(HABITS[ALPHA]))

    assert main(["inspect", str(model_path), "--program", ALPHA]) == 0
    text = capsys.readouterr().out
    assert ALPHA in text and f"syscalls made while learning: {' '.join(sorted(set(HABITS[ALPHA])))}" in text


def test_inspect_and_training_say_which_programs_can_never_alert(model_path: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from training.train import TrainReport

    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    cap = side["nll_cap"]
    side["thresholds"]["process"][ALPHA] = cap + 1.0  # held-out runs so far apart that the bound passed the cap
    dst.with_suffix(".json").write_text(json.dumps(side))
    assert main(["inspect", str(dst), "--json"]) == 0
    by_name = {p["program"]: p for p in json.loads(capsys.readouterr().out)["programs"]}
    assert by_name[ALPHA]["cannot_alert"] is True
    assert [name for name, p in by_name.items() if p["cannot_alert"]] == [ALPHA]
    assert main(["inspect", str(dst)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.strip().startswith(ALPHA))
    assert f"{cap + 1.0:.3g}!" in row and "never crossed" in text.splitlines()[-1]
    assert main(["inspect", str(model_path)]) == 0
    assert "never crossed" not in capsys.readouterr().out  # the unedited model can alert for every slot
    report = TrainReport(str(dst), str(dst.with_suffix(".json")), 1, 1, tuple(side["programs"]), 1, 1, 1, 0.0, 0.0,
                         side["thresholds"], nll_cap=cap)
    assert report.blind() == (ALPHA,) and os.path.basename(ALPHA) in report.blind_note()
    assert replace(report, nll_cap=None).blind_note() == ""


def test_inspect_refuses_what_it_cannot_show_in_one_line(model_path: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(model_path), "--program", "/usr/bin/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(model_path) in err and "/usr/bin/never" in err
    assert main(["inspect", str(tmp_path / "some.parquet"), "--program", ALPHA]) == 2  # a recording: --pid
    assert "--program is for a model" in capsys.readouterr().err
    assert main(["inspect", str(model_path), "--pid", "1"]) == 2
    assert "--pid and --events are for a recording" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["calibration", "made", "training_data", "known_windows"])
def test_inspect_shows_a_model_whose_descriptive_fields_are_odd(model_path: Path, tmp_path: Path, field: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The model loads without these (or with them null): inspect must show it, not fail."""
    dst = copy_model(model_path, tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    side[field] = None if field == "known_windows" else ["not", "an", "object"]
    if field == "calibration":
        side[field] = {"programs": {ALPHA: "not an object"}}
    dst.with_suffix(".json").write_text(json.dumps(side))
    assert main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert ALPHA in out and "program slots" in out
    broken = copy_model(model_path, tmp_path)
    broken.write_bytes(b"not a model")
    assert main(["inspect", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(broken) in err

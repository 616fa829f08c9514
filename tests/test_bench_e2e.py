"""``sysgram bench e2e``: its helpers on real processes and files, and a smoke run of the quick mode.

No speed is asserted: the figures must exist and be sane (counts add up, drops are counted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent import pipeline_bench as pb
from agent.capture import bench as capture_bench
from tests.conftest import requires_bpf, sysgram


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> pb.Tools:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    return pb.build_tools(tmp_path_factory.mktemp("bench-tools"))


def test_unclean_counts_drops_unscored_windows_and_unevaluated_events() -> None:
    clean = {
        "drops": 0,
        "details": 10,
        "rules_evaluated": 10,
        "model": {"windows": 100, "windows_scored": 40, "cache_hits": 60},
    }
    assert pb._unclean(clean) == {"drops": 0, "unscored_windows": 0, "unevaluated_events": 0}
    dirty = {
        "drops": 7,
        "details": 12,
        "kernel_signals": 1,
        "rules_evaluated": 9,
        "model": {"windows": 100, "windows_scored": 40, "cache_hits": 50},
    }
    assert pb._unclean(dirty) == {"drops": 7, "unscored_windows": 10, "unevaluated_events": 2}
    # no model, no rules: nothing can be unscored or unevaluated
    assert pb._unclean({"drops": 0, "details": 5}) == {
        "drops": 0,
        "unscored_windows": 0,
        "unevaluated_events": 0,
    }


def test_latencies_match_each_trigger_once_by_its_file_name() -> None:
    opened = {"trigger-1": 1_000_000, "trigger-2": 3_000_000}
    arrivals = [
        (4_000_000, '{"output_fields": {"fd.name": "/tmp/x/trigger-1"}}'),
        (5_000_000, '{"output_fields": {"fd.name": "/tmp/x/trigger-1"}}'),  # a repeat is not counted twice
        (9_000_000, "trigger-2 and trigger-99"),  # unknown names are ignored
    ]
    assert sorted(pb._latencies(opened, arrivals)) == [3.0, 6.0]
    assert pb._latencies(opened, [(2_000_000, b"body naming trigger-2")]) == [-1.0]


def test_percentile_picks_from_the_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert pb._percentile(values, 50) in (50.0, 51.0)
    assert pb._percentile(values, 99) == 99.0
    assert pb._percentile([5.0], 99) == 5.0
    assert pb._percentile([], 50) != pb._percentile([], 50)  # NaN when nothing arrived


def test_live_processes_are_spawned_and_always_cleaned_up(tools: pb.Tools) -> None:
    with pb.live_processes(tools, 50) as n:
        assert n == 50
        parents = [p for p in _children(os.getpid()) if Path(f"/proc/{p}/exe").resolve() == tools.live]
        assert len(parents) == 1
        assert len(_children(parents[0])) == 50
    assert not Path(f"/proc/{parents[0]}").exists() or _children(parents[0]) == []


def test_live_processes_cleaned_up_when_the_block_raises(tools: pb.Tools) -> None:
    with pytest.raises(RuntimeError), pb.live_processes(tools, 10):
        parents = [p for p in _children(os.getpid()) if Path(f"/proc/{p}/exe").resolve() == tools.live]
        raise RuntimeError("boom")
    assert all(not Path(f"/proc/{p}").exists() for p in parents)


def test_paced_load_reports_what_it_did(tools: pb.Tools) -> None:
    assert pb._paced(tools, 20_000, 0.3, 2) > 0
    out = subprocess.run([str(tools.paced), "0", "0.1"], capture_output=True, text=True, check=True).stdout
    done, took = out.split()
    assert int(done) > 0 and float(took) >= 0.1


def test_generated_project_builds_with_make(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")
    project = pb.make_project(tmp_path, 3)
    assert pb._build_s(project) > 0
    out = subprocess.run([str(project / "prog")], capture_output=True, text=True, check=True).stdout
    assert float(out) > 0


def test_unknown_bench_part_is_one_line_exit_2() -> None:
    proc = sysgram("bench", "nope")
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


@requires_bpf
@pytest.mark.slow
def test_e2e_quick_json_has_sane_figures() -> None:
    proc = sysgram("bench", "e2e", "--quick", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = {f["name"]: f for f in json.loads(proc.stdout)}
    assert all(f["part"] == "e2e" for f in figures.values())
    value = {name: f["value"] for name, f in figures.items()}
    assert value["getppid bare"] > 0
    assert value["getppid + floor (count-only BPF)"] > 0
    assert value["getppid + full agent (sysgram run)"] > 0
    assert isinstance(value["drops during the overhead loops"], int)
    assert isinstance(value["drops during the latency runs"], int)
    written, triggers = value["alerts written / triggers"].split("/")
    assert int(written) == int(triggers) == pb.QUICK.triggers
    received, _ = value["webhook POSTs received / triggers"].split("/")
    assert int(received) == pb.QUICK.triggers
    assert 0 <= value["syscall -> alert written p50"] <= value["syscall -> alert written p99"]
    loaded = f" (under {pb.QUICK.latency_load / 1e6:g} M/s load)"
    written, _ = value[f"alerts written / triggers{loaded}"].split("/")
    assert int(written) == pb.QUICK.triggers
    assert value[f"syscall -> webhook received p99{loaded}"] > 0
    assert value["highest rate offered"] > 0
    ended = value["stepping ended because"]
    assert isinstance(ended, str) and ended
    if "not clean" in ended:  # then the first unclean step says which counter was not zero
        assert any(value[f"{k} at that step"] for k in ("drops", "unscored_windows", "unevaluated_events"))
    else:
        assert value["highest clean rate (0 drops/unscored/unevaluated)"] > 0
    assert value["live processes spawned"] == pb.QUICK.live
    assert value[f"agent RSS with {pb.QUICK.live:,} live processes"] > 0
    assert value["process events seen"] >= pb.QUICK.live * 2  # a fork and an exit each, at least
    assert isinstance(value["RSS growth over the churn"], float)
    assert isinstance(value["RSS growth over a second churn (the slope)"], float)
    assert value["build slowdown with the agent"] > 0
    for name in ("drops during the memory runs", "drops during the builds"):
        assert isinstance(value[name], int) and value[name] >= 0


def test_proc_nice_reads_a_real_process_priority() -> None:
    child = subprocess.Popen(["nice", "-n", "7", "sleep", "5"])
    try:
        for _ in range(100):  # nice(1) execs sleep at once; wait until it has
            if Path(f"/proc/{child.pid}/cmdline").read_bytes().startswith(b"sleep"):
                break
            time.sleep(0.01)
        assert pb.proc_nice(child.pid) == os.getpriority(os.PRIO_PROCESS, os.getpid()) + 7 or pb.proc_nice(
            child.pid
        ) == 19
        assert pb.proc_nice(os.getpid()) == os.getpriority(os.PRIO_PROCESS, os.getpid())
    finally:
        child.kill()
        child.wait()


def test_thread_schedstat_counts_a_busy_thread_cpu_time() -> None:
    me = os.getpid()
    before = pb.thread_schedstat(me, me)
    end = time.process_time() + 0.05
    while time.process_time() < end:  # 50 ms of CPU on this (the main) thread
        pass
    after = pb.thread_schedstat(me, me)
    assert after[0] - before[0] >= 0.04
    assert after[1] >= before[1] >= 0.0


@requires_bpf
def test_bpf_run_time_is_read_per_program_with_stats_on_and_the_setting_restored(tools: pb.Tools) -> None:
    """The kernel-accounted overhead's two readings: a process's BPF programs' run time, and the floor's."""
    from agent.bench import BPF_STATS, bpf_run_time_ns, bpf_stats

    before_setting = BPF_STATS.read_text()
    idle_process = subprocess.Popen(["sleep", "30"])
    try:  # a process that holds no BPF program
        assert pb._bpf_ns_per_syscall(idle_process.pid, tools.loop, 10_000) is None
    finally:
        idle_process.kill()
        idle_process.wait()
    with capture_bench.loaded_floors() as floors:
        _, raw, _, _ = floors
        idle = bpf_run_time_ns(os.getpid())
        raw.on()
        try:
            per_syscall = pb._bpf_ns_per_syscall(os.getpid(), tools.loop, 200_000)
        finally:
            raw.off()
        assert per_syscall is not None and per_syscall > 0  # the attached floor ran for every loop syscall
        assert bpf_run_time_ns(os.getpid()) > idle
        # detached, a loop under the stats adds nothing to either program
        with bpf_stats() as on:
            assert on and BPF_STATS.read_text().strip() == "1"
            steady = bpf_run_time_ns(os.getpid())
            subprocess.run([str(tools.loop), "100000"], check=True, stdout=subprocess.DEVNULL)
            assert bpf_run_time_ns(os.getpid()) == steady
        one = pb._floor_round(tools, floors, 2, 50_000)
    assert BPF_STATS.read_text() == before_setting
    assert len(one.bare_ns) == len(one.tp_ns) == len(one.raw_ns) == len(one.hooked_ns) == 2
    assert one.entry_hooked_ns == [] and one.entry_dispatch is None  # e2e measures no entry hook
    assert one.raw_bpf_ns is not None and one.raw_bpf_ns > 0


def test_kernel_accounted_ratio_adds_the_agents_extra_bpf_time_to_the_raw_floor() -> None:
    rounds = [
        pb.FloorRound([100.0, 110.0], [170.0, 180.0], [130.0, 140.0], 20.0, [135.0, 145.0]),
        pb.FloorRound([100.0, 100.0], [160.0, 180.0], [130.0, 130.0], 22.0, [135.0, 135.0]),
    ]
    figures = {f.name: f.value for f in pb._kernel_accounted(rounds, [30.0, 34.0])}
    # tp added: medians 70 and 70 -> 70; raw added 30; with the idle detail exit hook 35; extra: 10 and 12 -> 11
    assert figures["agent's BPF time per syscall over the raw floor's (kernel stats)"] == 11.0
    assert figures["the same + an idle detail exit hook (its per-syscall dispatch), median of paired loops"] == 35.0
    assert figures["full agent added / floor added, kernel-accounted"] == round(46 / 70, 2)
    assert figures["same, against the raw-tracepoint floor"] == round(46 / 30, 2)
    # rounds measured without the hooks fall back to the plain raw floor
    plain = [pb.FloorRound(r.bare_ns, r.tp_ns, r.raw_ns, r.raw_bpf_ns) for r in rounds]
    plain_figures = {f.name: f.value for f in pb._kernel_accounted(plain, [30.0, 34.0])}
    assert plain_figures["full agent added / floor added, kernel-accounted"] == round(41 / 70, 2)
    missing = {f.name: f.value for f in pb._kernel_accounted(rounds, [None, None])}
    assert str(missing["full agent added / floor added, kernel-accounted"]).startswith("not measured")
    hidden = [pb.FloorRound([100.0], [90.0], [95.0], 20.0)]
    noisy = {f.name: f.value for f in pb._kernel_accounted(hidden, [30.0])}
    assert str(noisy["full agent added / floor added, kernel-accounted"]).startswith("n/a")

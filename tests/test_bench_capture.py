"""``sysgram bench capture``: the auditd reference leaves the host as found; a quick smoke run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.bench import added_ratio, bpf_stats, read_fdinfo
from agent.capture import bench as capture_bench
from tests.conftest import requires_bpf, sysgram


def _require_audit() -> None:
    """Install auditd as the bench does (a fresh CI host has none), or skip saying why it cannot be."""
    try:
        capture_bench._ensure_auditd()
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"auditd could not be installed: {err}")
    if subprocess.run(["auditctl", "-s"], capture_output=True).returncode != 0:
        pytest.skip("the kernel's audit interface is not available here")


def test_added_ratio_refuses_a_reference_the_noise_hid() -> None:
    assert added_ratio(30.0, 20.0) == 1.5
    assert isinstance(added_ratio(30.0, 0.0), str)
    assert isinstance(added_ratio(30.0, -5.0), str)


def test_audit_figures_say_why_when_not_measured() -> None:
    ref = capture_bench.AuditReference(why_not="no audit here")
    (figure,) = ref.figures("capture", 100.0, 50.0)
    assert "no audit here" in str(figure.value)
    measured = capture_bench.AuditReference(ns=1100.0, wall_ns=9000.0, lost=3).figures("capture", 100.0, 50.0)
    by_name = {f.name: f.value for f in measured}
    assert by_name["auditd added"] == 1000.0
    assert by_name["auditd added / sysgram added"] == 20.0
    assert by_name["audit records lost (kernel)"] == 3
    assert by_name["getppid + auditd, wall time (waits on auditd's backlog)"] == 9000.0


@requires_bpf
def test_audit_reference_measures_then_restores_rules_and_daemon(tmp_path: Path) -> None:
    _require_audit()
    before_rules = subprocess.run(["auditctl", "-l"], capture_output=True, text=True).stdout
    before = capture_bench._audit_status()
    exe = Path("/usr/bin/true").resolve()
    calls: list[str] = []

    def measure() -> tuple[float, float]:
        # while measuring, our rule is in the kernel and a daemon is registered
        calls.append(subprocess.run(["auditctl", "-l"], capture_output=True, text=True).stdout)
        assert capture_bench._audit_status().get("pid", "0") != "0"
        subprocess.run([str(exe)], check=True)
        return 123.0, 456.0

    ref = capture_bench.audit_reference(exe, measure, 2)
    assert ref.why_not == "" and ref.ns == 123.0 and ref.wall_ns == 456.0
    assert len(calls) == 2 and f"exe={exe}" in calls[0]
    after = capture_bench._audit_status()
    assert subprocess.run(["auditctl", "-l"], capture_output=True, text=True).stdout == before_rules
    for key in ("enabled", "pid", "backlog_limit"):
        assert after.get(key) == before.get(key), key


@requires_bpf
@pytest.mark.slow
def test_capture_quick_json_has_the_references() -> None:
    proc = sysgram("bench", "capture", "--quick", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value = {f["name"]: f["value"] for f in json.loads(proc.stdout)}
    assert value["getppid bare"] > 0
    assert value["getppid + floor (count-only, raw tracepoint)"] > 0
    assert value["getppid + floor (count-only, raw_syscalls tracepoint)"] > 0
    assert isinstance(value["drops (all stages)"], int)
    # the capture saw every syscall of its rounds: 3 quick rounds of a million getppid calls each
    assert value["events consumed"] >= 3_000_000
    assert "auditd added" in value or "auditd reference" in value
    ratio = value["sysgram added / floor added (raw_syscalls tracepoint), kernel-accounted"]
    assert isinstance(ratio, float) or str(ratio).startswith(("n/a", "not measured"))


def test_capture_kernel_accounted_ratio_adds_sysgrams_extra_run_time_to_the_raw_floor() -> None:
    # paired short loops: raw floor added median(30, 30, 40) = 30; tp floor added median(70, 70, 60) = 70
    paired = capture_bench.FloorRound([100.0, 120.0, 100.0], [170.0, 190.0, 160.0], [130.0, 150.0, 140.0], None,
                                      [130.0, 150.0, 140.0])  # the capture's own hooks are in bare already
    # per round, ns a call: sysgram over the raw floor by 15, 11 and 40 (a noisy round): median 15
    per_call = {"sysgram": [60.0, 56.0, 90.0], "floor_raw": [45.0, 45.0, 50.0], "floor_tp": [46.0, 47.0, 44.0]}
    figures = {f.name: f.value for f in capture_bench._kernel_accounted(paired, per_call)}
    assert figures["sysgram added / floor added (raw_syscalls tracepoint), kernel-accounted"] == round(45 / 70, 2)
    assert figures["sysgram's BPF time per call over the raw floor's (kernel stats, median)"] == 15.0
    medians = {f.name: f.value for f in capture_bench._program_figures(per_call)}
    assert medians["BPF run time per call: sysgram"] == 60.0
    assert medians["BPF run time per call: floor (raw_syscalls tracepoint)"] == 46.0
    (unmeasured,) = capture_bench._kernel_accounted(paired, {})
    assert str(unmeasured.value).startswith("not measured")


def test_loop_cpu_ns_charges_the_child_and_refuses_a_failing_loop(tmp_path: Path) -> None:
    from agent.bench import loop_cpu_ns, loop_times

    assert loop_cpu_ns("/bin/true", 1) >= 0
    cpu_ns, wall_ns = loop_times("/bin/true", 1)
    assert wall_ns > 0 and cpu_ns >= 0
    spin = tmp_path / "spin.sh"
    spin.write_text("#!/bin/sh\ni=0\nwhile [ $i -lt 20000 ]; do i=$((i+1)); done\n")
    spin.chmod(0o755)
    assert loop_cpu_ns(str(spin), 1) > 0  # a shell that counted spent CPU time
    with pytest.raises(subprocess.CalledProcessError):
        loop_cpu_ns("/bin/false", 1)


def test_entry_dispatch_is_the_median_of_paired_differences_over_the_exit_hooked_loops() -> None:
    paired = capture_bench.FloorRound([100.0] * 3, [170.0] * 3, [130.0] * 3, 20.0, [135.0, 140.0, 150.0],
                                      [141.0, 149.0, 152.0])
    assert paired.entry_dispatch == 6.0  # differences 6, 9, 2
    figure = capture_bench._entry_dispatch_figure(paired)
    assert figure.value == 6.0 and "sys_enter_X" in figure.name
    # rounds measured without the entry hook say so instead of a number
    plain = capture_bench.FloorRound([100.0], [170.0], [130.0], 20.0, [135.0])
    assert plain.entry_dispatch is None
    assert capture_bench._entry_dispatch_figure(plain).value == "not measured"


@requires_bpf
def test_idle_entry_hook_runs_only_while_its_loop_is_measured(tmp_path: Path) -> None:
    """The entry hook is attached for its own loops and detached after: an execve runs its program only
    while it is on (kernel BPF stats), and floor_round pairs one loop with it per cycle."""
    with capture_bench.loaded_floors() as (tp, raw, exit_hook, entry_hook):
        exe = capture_bench._build_loop(tmp_path)
        fd = entry_hook.bpf.funcs[b"tracepoint__syscalls__sys_enter_execve"].fd

        def runs_during_an_exec() -> int:
            before = int(read_fdinfo(f"/proc/self/fdinfo/{fd}").get("run_cnt", "0"))
            subprocess.run(["/bin/true"], check=True)
            return int(read_fdinfo(f"/proc/self/fdinfo/{fd}").get("run_cnt", "0")) - before

        with bpf_stats() as on:
            if not on:
                pytest.skip("kernel BPF stats unavailable (kernel.bpf_stats_enabled)")
            assert runs_during_an_exec() == 0  # bcc attached it at load; loaded_floors detached it
            entry_hook.on()
            try:
                assert runs_during_an_exec() >= 1
            finally:
                entry_hook.off()
            assert runs_during_an_exec() == 0
        paired = capture_bench.floor_round(exe, tp, raw, 2, 20_000, hooks=exit_hook, entry_hook=entry_hook)
        assert len(paired.entry_hooked_ns) == len(paired.hooked_ns) == 2
        assert paired.entry_dispatch is not None

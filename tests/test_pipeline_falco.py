"""Falco's http_output POSTed to the running agent, cross-checked with the live process's anomaly state.

A tiny model is trained on a recording of one program's normal behaviour (`habits normal`: getppid and a
short sleep, over and over). The same binary in `odd` mode makes only syscalls that program never made; the
detector marks it anomalous, the normal run not. The same Falco alert about each is then escalated only
for the anomalous one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from agent.pipeline import ANOMALY_RULE
from tests.conftest import requires_bpf, start_sysgram
from tests.test_pipeline_live import LiveAgent

pytestmark = [requires_bpf, pytest.mark.bpf, pytest.mark.slow]

HABITS_C = r"""
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int odd = argc > 1 && strcmp(argv[1], "odd") == 0;
    double seconds = argc > 2 ? atof(argv[2]) : 1.0;
    struct timespec a, b, pause = {0, 1000000};
    struct utsname u;
    char cwd[256];
    clock_gettime(CLOCK_MONOTONIC, &a);
    do {
        if (odd) {
            syscall(SYS_getuid);
            umask(022);
            uname(&u);
            syscall(SYS_getcwd, cwd, sizeof cwd);
            syscall(SYS_nanosleep, &pause, NULL); /* not usleep's clock_nanosleep: every call is new */
        } else {
            syscall(SYS_getppid);
            usleep(1000);
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
    } while ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9 < seconds);
    return 0;
}
"""

TINY = {"hidden": 32, "bottleneck": 16, "dim": 8}


@pytest.fixture(scope="module")
def habits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "sysgram-habits"
    src = out.with_suffix(".c")
    src.write_text(HABITS_C)
    subprocess.run([shutil.which("cc") or "cc", "-O1", "-o", str(out), str(src)], check=True)
    return out


@pytest.fixture(scope="module")
def habit_model(habits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Record `habits normal` a few times with `sysgram record`, train a tiny model on it."""
    from training.datasets import traces_from_recordings
    from training.train import TrainConfig, train_model

    tmp = tmp_path_factory.mktemp("model")
    recording = tmp / "normal.parquet"
    recorder = start_sysgram("record", "-o", str(recording), "--exe", str(habits), "--state-dir", str(tmp / "state"))
    for _ in range(10):
        subprocess.run([str(habits), "normal", "0.4"], check=True, timeout=30)
    time.sleep(0.5)
    recorder.send_signal(2)
    _, err = recorder.communicate(timeout=60)
    assert recorder.returncode == 0, err
    traces = traces_from_recordings([str(recording)], [str(habits)])
    assert len(traces) >= 3  # a run whose exec the recorder missed is not kept
    out = tmp / "habits.onnx"
    cfg = TrainConfig(n=8, epochs=6, threads=1, min_program_syscalls=500, net=TINY, min_windows=16)
    train_model(traces, out, cfg, progress=False)
    return out


def falco_payload(pid: int, name: str) -> dict[str, object]:
    return {
        "time": "2026-11-26T14:00:00.123456789Z",
        "rule": "Test Falco rule about a process",
        "priority": "Warning",
        "output": f"Falco saw {name} (pid {pid})",
        "output_fields": {"proc.pid": pid, "proc.name": name},
        "tags": ["test"],
        "source": "syscall",
        "hostname": socket.gethostname(),  # this host: its pid is correlated
    }


def test_falco_http_alert_is_cross_checked_with_the_live_anomaly_state(
    tmp_path: Path, habits: Path, habit_model: Path
) -> None:
    agent = LiveAgent(tmp_path, "--model", str(habit_model), "--no-default-rules")
    normal = odd = None
    try:
        normal = subprocess.Popen([str(habits), "normal", "8"])
        odd = subprocess.Popen([str(habits), "odd", "8"])
        flagged = agent.wait_for(
            lambda: [r for r in agent.records()
                     if r["rule"] == ANOMALY_RULE and r["output_fields"]["proc.pid"] == odd.pid], 20
        )
        assert flagged, [(r["output_fields"].get("proc.pid"), r["output_fields"].get("proc.exe"), r["output"][:200], odd.pid, normal.pid) for r in agent.records()]
        time.sleep(1.0)  # the normal run has a span of windows by now, too
        for proc, name in ((odd, "odd"), (normal, "normal")):
            reply = httpx.post(agent.url + "/", json=falco_payload(proc.pid, name), timeout=10)
            assert reply.status_code == 200, reply.text
        metrics = agent.metrics()
    finally:
        for p in (normal, odd):
            if p is not None:
                p.kill()
                p.wait()
        assert agent.stop() == 0, agent.stderr
    falco = {r["output_fields"]["proc.pid"]: r for r in agent.records()
             if r["rule"] == "Test Falco rule about a process"}
    assert set(falco) == {odd.pid, normal.pid}
    hot, calm = falco[odd.pid], falco[normal.pid]
    assert hot["output_fields"]["sysgram.source"] == "falco"
    assert hot["output_fields"]["sysgram.anomaly.is_anomalous"] is True
    assert calm["output_fields"]["sysgram.anomaly.is_anomalous"] is False
    assert hot["output_fields"]["sysgram.anomaly.score"] > calm["output_fields"]["sysgram.anomaly.score"]
    # the anomalous process's alert is escalated one level (Warning -> Error); the other stays as Falco said
    assert hot["priority"] == "Error" and "anomalous" in hot["output_fields"]["sysgram.verdict.explanation"]
    assert calm["priority"] == "Warning"
    assert metrics[("sysgram_falco_alerts_ingested_total", (("via", "http"),))] == 2
    assert metrics[("sysgram_windows_scored_total", ())] > 0
    assert metrics[("sysgram_anomalies_total", ())] >= 1

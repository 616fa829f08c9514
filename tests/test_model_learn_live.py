"""`sysgram learn` then `sysgram run` on the real kernel: a program's own routine is normal, the same program
doing something it never did (sockets, /etc/shadow, listing /etc) raises an anomaly alert naming it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, requires_bpf

pytestmark = [requires_bpf, pytest.mark.bpf, pytest.mark.slow]

ANOMALY_RULE = "Sysgram anomalous syscall sequence"

# `routine DIR NORMAL_MS ODD_MS`: a fixed file routine for NORMAL_MS, then for ODD_MS what it never did.
ROUTINE_C = r"""
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void routine(const char *dir) {
    char path[4096], buf[256];
    struct stat st;
    snprintf(path, sizeof path, "%s/routine-%d.txt", dir, (int)getpid());
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return;
    if (write(fd, "sysgram routine\n", 16) < 0)
        perror("write");
    lseek(fd, 0, SEEK_SET);
    if (read(fd, buf, sizeof buf) < 0)
        perror("read");
    fstat(fd, &st);
    close(fd);
    stat(path, &st);
    syscall(SYS_getppid);
    unlink(path);
    usleep(2000);
}

static void odd(void) {
    char buf[256];
    struct utsname u;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(9)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s >= 0) {
        connect(s, (struct sockaddr *)&addr, sizeof addr);
        close(s);
    }
    int fd = open("/etc/shadow", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, buf, sizeof buf) < 0)
            perror("read");
        close(fd);
    }
    DIR *d = opendir("/etc");
    if (d) {
        while (readdir(d))
            ;
        closedir(d);
    }
    uname(&u);
    syscall(SYS_getuid);
    syscall(SYS_geteuid);
}

int main(int argc, char **argv) {
    if (argc != 4)
        return 2;
    long normal_ms = atol(argv[2]), odd_ms = atol(argv[3]);
    char cwd[4096], buf[256];
    for (int i = 0; i < 4; i++) { /* read its settings: part of starting up */
        int fd = open("/etc/hostname", O_RDONLY);
        if (fd >= 0) {
            if (read(fd, buf, sizeof buf) < 0)
                perror("read");
            close(fd);
        }
    }
    if (!getcwd(cwd, sizeof cwd))
        return 1;
    usleep(200000); /* let the agent see the exec first */
    long start = now_ms();
    while (now_ms() - start < normal_ms)
        routine(argv[1]);
    start = now_ms();
    while (now_ms() - start < odd_ms)
        odd();
    return 0;
}
"""


@pytest.fixture(scope="module")
def routine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workload, compiled under a name no other process on the host has."""
    src = tmp_path_factory.mktemp("src") / "routine.c"
    src.write_text(ROUTINE_C)
    out = tmp_path_factory.mktemp("bin") / "sysgram-learn-routine"
    subprocess.run([shutil.which("cc") or "cc", "-O1", "-o", str(out), str(src)], check=True)
    return out


def start_agent(*args: str) -> subprocess.Popen[str]:
    """`sysgram ARGS`, returned once it says it is ready."""
    agent = subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=ROOT, stderr=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert agent.stderr is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = agent.stderr.readline()
        lines.append(line)
        if "sysgram: ready" in line or (not line and agent.poll() is not None):
            break
    assert agent.poll() is None, "".join(lines) + agent.stderr.read()
    return agent


def run_routines(exe: Path, workdir: Path, stop: threading.Event) -> None:
    """Runs of the routine, from start-and-exit to longer, until ``stop``: its normal includes starting up,
    which the detector judges first (a process's first batch is its startup)."""
    durations = (0, 20, 0, 150, 0, 600)
    k = 0
    while not stop.is_set():
        subprocess.run([str(exe), str(workdir), str(durations[k % len(durations)]), "0"], check=True)
        k += 1


def test_learned_routine_is_normal_and_something_new_is_an_anomaly(routine: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    workdir = tmp_path / "work"
    workdir.mkdir()
    learn = start_agent("learn", "--seconds", "12", "-o", str(model), "--exe", str(routine), "--epochs", "3")
    stop = threading.Event()
    runners = [threading.Thread(target=run_routines, args=(routine, workdir, stop)) for _ in range(2)]
    for runner in runners:
        runner.start()
    try:
        _, err = learn.communicate(timeout=240)
    finally:
        stop.set()
        for runner in runners:
            runner.join()
    assert learn.returncode == 0, err
    sidecar = json.loads(model.with_suffix(".json").read_text())
    assert str(routine) in sidecar["programs"]  # the routine has its own slot, not the generic one

    alerts = tmp_path / "alerts.jsonl"
    agent = start_agent("run", "--model", str(model), "--no-default-rules", "--alerts-jsonl", str(alerts),
                        "--state-dir", str(tmp_path / "state"), "--quiet")
    try:
        normal = subprocess.Popen([str(routine), str(workdir), "3000", "0"])
        odd = subprocess.Popen([str(routine), str(workdir), "1000", "3000"])
        assert normal.wait(timeout=60) == 0 and odd.wait(timeout=60) == 0
        time.sleep(2)  # the agent's last batches
    finally:
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    stats = json.loads(err.strip().splitlines()[-1].removeprefix("sysgram: stats "))
    assert stats["model"]["windows"] > 0
    records = [json.loads(line) for line in alerts.read_text().splitlines()] if alerts.exists() else []
    anomalies = {r["output_fields"]["proc.pid"]: r for r in records if r["rule"] == ANOMALY_RULE}
    assert normal.pid not in anomalies, anomalies.get(normal.pid, {}).get("output")
    assert odd.pid in anomalies, f"no anomaly for pid {odd.pid}; model stats {stats['model']}"
    fields = anomalies[odd.pid]["output_fields"]
    # proc.name is the comm, as Falco and our rule alerts give it: the kernel keeps 15 bytes of the name
    assert fields["proc.exe"] == str(routine) and fields["proc.name"] == routine.name[:15]
    assert fields["sysgram.anomaly.score"] > fields["sysgram.anomaly.threshold"]
    assert len(fields["sysgram.anomaly.window"].split()) > 1
    # the plain evidence beside the scores: what the routine never did while learning, named
    new = fields["sysgram.anomaly.new_syscalls"].split()
    assert {"socket", "connect"} <= set(new) and not {"openat", "write", "unlink"} & set(new), new

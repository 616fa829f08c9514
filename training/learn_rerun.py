"""Learn a workload, then run it again: how many anomaly alerts does the same workload raise?

The issue's live target ("after `learn` on a workload, running that workload again raises no anomaly
alert"), as a repeatable measurement. Needs root (BPF)::

    sudo .venv/bin/python -m training.learn_rerun [--seconds 30] [--workload FILE] [--out DIR] [--json]

1. the workload runs; ``sysgram learn --seconds N`` records it (kept as learn.parquet) and trains a model;
2. the workload runs again; ``sysgram record --seconds N`` records it;
3. ``sysgram replay`` judges that recording with the learned model (no rules), alerts to a JSON-lines file.

``--live``: steps 2-3 are instead ``sysgram run`` with the learned model for N seconds while the workload
runs again (the agent as deployed, reading /proc as it goes; nothing is kept to replay).

Reported: anomaly alerts by executable, and the detector's own counts (anomalous processes past the
per-executable limit are counted as suppressed). Everything else on the host is recorded too: its alerts
are counted, not hidden. The default workload is a loop of short-lived programs (thousands of start-ups in
30 s), the one behind the learn-then-rerun figures in docs/model.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYSGRAM = [sys.executable, "-m", "agent"]
ANOMALY_RULE = "Sysgram anomalous syscall sequence"
WORKLOAD = r"""
end=$((SECONDS + $1))
while [ $SECONDS -lt $end ]; do
  ls -l /usr/bin > /dev/null
  cat /etc/os-release > /dev/null
  grep -c root /etc/passwd > /dev/null
  sed -n 1,5p /etc/services > /dev/null
  sort /etc/services | uniq | wc -l > /dev/null
  sha256sum /etc/hostname > /dev/null
  tar cf "$2/x.tar" -C /etc hostname os-release 2> /dev/null
  gzip -c "$2/x.tar" > "$2/x.tar.gz"
  find /usr/share/doc -maxdepth 1 | head -50 > /dev/null
  date > /dev/null; id > /dev/null; uname -a > /dev/null
  python3 -c 'import json, os; json.dumps(dict(os.environ))' > /dev/null
  sleep 0.2
done
"""


def count_alerts(alerts_jsonl: Path, replay_log: str) -> dict[str, Any]:
    """Anomaly alerts by executable, and the detector's last stats line's anomaly counts."""
    by_exe: collections.Counter[str] = collections.Counter()
    if alerts_jsonl.exists():
        for line in alerts_jsonl.read_text().splitlines():
            alert = json.loads(line)
            if alert.get("rule") == ANOMALY_RULE:
                by_exe[alert["output_fields"].get("proc.exe") or "?"] += 1
    counts = {key: int(value) for key, value in
              re.findall(r'"(anomalies|anomalies_suppressed)": (\d+)', replay_log)}
    return {"anomaly_alerts": sum(by_exe.values()), "by_exe": dict(by_exe.most_common()),
            "anomalies_suppressed": counts.get("anomalies_suppressed", 0)}


STEP_TIMEOUT = 3600  # seconds for one sysgram step (a learn trains after recording)


@contextlib.contextmanager
def _workload(script: str, scratch: str) -> Iterator[None]:
    """The workload running (started 2 s before, so the command sees it going; it is told to run far longer
    than any command, training included, and stopped after: its whole process group, so a long-running
    child of the workload is not left behind)."""
    work = subprocess.Popen(["bash", "-c", script, "workload", "100000", scratch], start_new_session=True)
    try:
        time.sleep(2)
        yield
    finally:
        os.killpg(work.pid, signal.SIGTERM)
        try:
            work.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(work.pid, signal.SIGKILL)
            work.wait()


def _during_workload(script: str, scratch: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``sysgram COMMAND`` while the workload runs."""
    with _workload(script, scratch):
        return subprocess.run([*SYSGRAM, *command], cwd=REPO, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT)


def _run_live(script: str, scratch: str, command: list[str], seconds: int) -> subprocess.CompletedProcess[str]:
    """``sysgram COMMAND`` (one that runs until SIGINT) for ``seconds`` once it says it is ready, while the
    workload runs."""
    log = Path(scratch) / "live.log"
    with _workload(script, scratch), log.open("w") as err:
        agent = subprocess.Popen([*SYSGRAM, *command], cwd=REPO, stdout=err, stderr=err, text=True)
        deadline = time.monotonic() + STEP_TIMEOUT
        while "sysgram: ready" not in log.read_text() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if agent.poll() is None and "sysgram: ready" not in log.read_text():
            agent.kill()  # never ready: no run to report
        elif agent.poll() is None:
            time.sleep(seconds)
            agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=120)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    return subprocess.CompletedProcess(agent.args, agent.returncode, "", log.read_text())


def _failed(step: subprocess.CompletedProcess[str], what: str) -> bool:
    if step.returncode:
        lines = step.stderr.strip().splitlines()
        print(lines[-1] if lines else f"sysgram {what} failed", file=sys.stderr)
    return bool(step.returncode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30, help="learn and rerun for this long")
    parser.add_argument("--workload", help="a bash script, run in a loop of its own making: it gets how long "
                                           "to run ($1, in seconds: far longer than needed, it is stopped) and a "
                                           "scratch directory ($2) (default: the loop of short-lived programs)")
    parser.add_argument("--out", help="keep the model, recording and alerts here (default: a temporary dir)")
    parser.add_argument("--live", action="store_true", help="judge the rerun with `sysgram run` as it happens, "
                                                                 "not a recording of it replayed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    script = Path(args.workload).read_text() if args.workload else WORKLOAD
    with tempfile.TemporaryDirectory(prefix="sysgram-learn-rerun-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        model, recording, alerts = out / "learned.onnx", out / "rerun.parquet", out / "alerts.jsonl"
        alerts.unlink(missing_ok=True)
        started = time.monotonic()
        learn = _during_workload(script, tmp, ["learn", "--seconds", str(args.seconds), "-o", str(model),
                                               "--keep-recording", str(out / "learn.parquet")])
        if _failed(learn, "learn"):
            return 1
        if args.live:
            judged = _run_live(script, tmp, ["run", "--model", str(model), "--no-default-rules", "--quiet",
                                             "--alerts-jsonl", str(alerts), "--state-dir", str(Path(tmp) / "state")],
                               args.seconds)
            if _failed(judged, "run"):
                return 1
        else:
            record = _during_workload(script, tmp, ["record", "-o", str(recording), "--seconds", str(args.seconds)])
            if _failed(record, "record"):
                return 1
            judged = subprocess.run([*SYSGRAM, "replay", str(recording), "--model", str(model), "--no-default-rules",
                                     "--quiet", "--alerts-jsonl", str(alerts)], cwd=REPO, capture_output=True,
                                    text=True, timeout=STEP_TIMEOUT)
            if _failed(judged, "replay"):
                return 1
        result = count_alerts(alerts, judged.stderr + judged.stdout)
        result["mode"] = "live" if args.live else "replay"
        said = learn.stdout.splitlines()
        result["learned"] = next((line for line in said if "learned" in line), "")
        result["thin"] = next((line for line in said if "held-out runs" in line), "")
        result["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"anomaly alerts on the rerun: {result['anomaly_alerts']} (+{result['anomalies_suppressed']} past "
              f"the per-executable limit) {result['by_exe']}")
        print(result["learned"])
        if result["thin"]:
            print(result["thin"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

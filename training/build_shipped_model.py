"""Rebuild models/sysgram-default.onnx (+ .json): record common Debian programs, then train on them.

Needs root (BPF) and the live recorder (``sysgram record``)::

    sudo .venv/bin/python -m training.build_shipped_model [--seconds 60] [--epochs 8] [--out models/...]

The workload is deterministic in what it runs (shells, coreutils, python, apt/dpkg queries, a small web
server with curl); the recording itself of course depends on the host.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_ENTRY = REPO / ".venv" / "bin" / "sysgram"
SYSGRAM = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "agent"]
COMMS = ["bash", "sh", "dash", "ls", "cat", "grep", "sed", "awk", "sort", "find", "tar", "gzip", "cp", "mv",
         "rm", "mkdir", "stat", "date", "id", "ps", "python3", "apt-get", "apt-cache", "dpkg", "dpkg-query",
         "curl", "sha256sum", "head", "tail", "wc", "env", "uname", "xargs"]

# the runtime model: half the width of the ADFA-LD configuration, ~2x the raw ONNX rate (docs/model.md)
SHIPPED_NET = {"hidden": 64, "bottleneck": 32, "dim": 16}

WORKLOAD = r"""
set -u
w=$(mktemp -d)
cd "$w"
python3 -m http.server 18777 --bind 127.0.0.1 >/dev/null 2>&1 &
srv=$!
sleep 1
for i in $(seq 1 {rounds}); do
  ls -la /usr/bin >/dev/null; ls /etc | sort | head -n 20 >/dev/null
  cat /etc/os-release /etc/passwd | grep -c : >/dev/null; sed -n '1,5p' /etc/services >/dev/null
  awk -F: '{{print $1}}' /etc/passwd | wc -l >/dev/null
  find /usr/share/doc -maxdepth 1 -name 'lib*' | head -n 50 >/dev/null
  mkdir -p d$i; cp /etc/hostname d$i/; mv d$i/hostname d$i/h; stat d$i/h >/dev/null; tar czf d$i.tgz d$i
  gzip -t d$i.tgz; sha256sum d$i.tgz >/dev/null; rm -rf d$i d$i.tgz
  date >/dev/null; id >/dev/null; uname -a >/dev/null; env | wc -l >/dev/null; ps aux >/dev/null
  python3 -c 'import json, os; json.dumps(dict(os.environ)); sum(range(10000))'
  dpkg -l >/dev/null 2>&1; dpkg-query -W -f='${{Package}}\n' | head -n 30 >/dev/null
  apt-cache policy bash >/dev/null 2>&1; apt-get -s -q install bash >/dev/null 2>&1
  curl -s -o /dev/null http://127.0.0.1:18777/ ; curl -s -o /dev/null http://127.0.0.1:18777/missing
  echo "$i" | xargs -n1 echo >/dev/null
done
kill $srv
cd /; rm -rf "$w"
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=90, help="how long to record")
    parser.add_argument("--rounds", type=int, default=40, help="workload rounds")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "models" / "sysgram-default.onnx"))
    parser.add_argument("--keep-recording", metavar="FILE", help="also keep the recording here")
    args = parser.parse_args(argv)
    if subprocess.run([*SYSGRAM, "record", "--help"], capture_output=True, cwd=REPO).returncode:
        print("sysgram record is not available yet (the live recorder has not landed)", file=sys.stderr)
        return 2
    from training.train import train_from_recordings

    with tempfile.TemporaryDirectory() as tmp:
        rec = str(Path(tmp) / "shipped.parquet")
        comm_args = [a for c in COMMS for a in ("--comm", c)]
        recorder = subprocess.Popen([*SYSGRAM, "record", "-o", rec, "--seconds", str(args.seconds), *comm_args],
                                    cwd=REPO)
        time.sleep(3)  # let the tracer attach before the workload starts
        subprocess.run(["bash", "-c", WORKLOAD.format(rounds=args.rounds)], check=False)
        if recorder.wait() != 0:
            print("sysgram record failed", file=sys.stderr)
            return 1
        if args.keep_recording:
            shutil.copy(rec, args.keep_recording)
        report = train_from_recordings([rec], args.out, epochs=args.epochs, seed=args.seed, progress=True,
                                       net=SHIPPED_NET)
    print(f"wrote {report.onnx_path}: {len(report.programs) - 1} programs, {report.windows:,} windows, "
          f"{report.vocabulary_size} tokens, {report.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`sysgram rules check` end to end through the CLI, and the benchmark part on a small run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.cli import main
from tests._falco_helpers import STABLE

GOOD = "- rule: r\n  desc: d\n  condition: evt.type = open\n  output: o\n  priority: INFO\n"


def test_check_text_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["rules", "check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("evt.type = open", "evt.type = open and ("))
    capsys.readouterr()
    assert main(["rules", "check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:3:" in out and "error:" in out and "^" in out


def test_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: [\n")
    assert main(["rules", "check", "--json", str(bad)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["files"][0]["errors"][0]["code"] == "yaml"


def test_missing_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml" in err[0]


@pytest.mark.skipif(not os.path.exists(STABLE), reason="../shared/falco-rules not present")
def test_bench_part_reports_events_per_second() -> None:
    from agent.falco import bench

    eps, matches, _load = bench.measure(3_000, [STABLE], rounds=1)
    assert eps > 0 and matches > 0

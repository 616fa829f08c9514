"""The learn-then-rerun measurement's counting (the live run itself needs ~5 minutes of root: it is a
measurement, `python -m training.learn_rerun`, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

from training.learn_rerun import ANOMALY_RULE, count_alerts


def test_counts_anomaly_alerts_by_executable_and_reads_the_suppressed_count(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.jsonl"
    rows = [
        {"rule": ANOMALY_RULE, "output_fields": {"proc.exe": "/usr/bin/find"}},
        {"rule": ANOMALY_RULE, "output_fields": {"proc.exe": "/usr/bin/find"}},
        {"rule": ANOMALY_RULE, "output_fields": {"proc.exe": ""}},
        {"rule": "Read sensitive file untrusted", "output_fields": {"proc.exe": "/usr/bin/cat"}},
    ]
    alerts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = ('sysgram: stats {"events": 10, "model": {"anomalies": 3, "anomalies_suppressed": 7, '
           '"processes": 40}}\n')
    result = count_alerts(alerts, log)
    assert result == {"anomaly_alerts": 3, "by_exe": {"/usr/bin/find": 2, "?": 1}, "anomalies_suppressed": 7}


def test_no_alerts_file_means_no_alerts(tmp_path: Path) -> None:
    result = count_alerts(tmp_path / "missing.jsonl", "")
    assert result == {"anomaly_alerts": 0, "by_exe": {}, "anomalies_suppressed": 0}

"""``sysgram bench alerts``: alerts through the spool and the webhook to a real receiver on 127.0.0.1.

Figures: burst throughput (emit N at once, until the receiver has all), the emit (spool commit) rate,
enqueue-to-received latency p50/p99 at a steady rate, and as a reference the same POSTs sent directly
with httpx (no spool, no signing): the cost of the HTTP round trip alone. Then blocking on the real kernel:
open -> victim dead and -> block alert, p50/p99, beside the agent's own event -> decision time.
"""

from __future__ import annotations

import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np

from agent.bench import Figure
from agent.respond._alert import Alert
from agent.respond._block_bench import blocking_figures
from agent.respond._webhook import RetryPolicy, WebhookSink

PART = "alerts"
_SECRET = "whsec_c3lzZ3JhbS1iZW5jaC1zZWNyZXQtMDEyMzQ1Njc4OWFi"


class _Receiver:
    """Notes the monotonic time each webhook-id first arrives."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.done = threading.Event()
        self.expect = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                receiver.received.setdefault(self.headers.get("webhook-id", ""), time.perf_counter_ns())
                if len(receiver.received) >= receiver.expect:
                    receiver.done.set()
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def reset(self, expect: int) -> None:
        self.received = {}
        self.expect = expect
        self.done.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _alerts(n: int) -> list[Alert]:
    fields = {"proc.pid": 4242, "proc.name": "nc", "sysgram.score": 0.93, "sysgram.threshold": 0.61}
    return [Alert.new("Bench rule", "Warning", f"bench alert {i}", fields) for i in range(n)]


def run(quick: bool) -> list[Figure]:
    burst_n, paced_n, rate = (300, 100, 200.0) if quick else (3000, 1000, 200.0)
    receiver = _Receiver()
    figures: list[Figure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sysgram-bench-") as state_dir:
            sink = WebhookSink(receiver.url, state_dir=state_dir, secret=_SECRET,
                               retry=RetryPolicy(0.01, 0.1))
            try:
                # Burst: everything at once; the spool absorbs it and the sender drains it.
                alerts = _alerts(burst_n)
                receiver.reset(burst_n)
                start = time.perf_counter_ns()
                for alert in alerts:
                    sink.emit(alert)
                emitted = time.perf_counter_ns()
                receiver.done.wait(120)
                end = max(receiver.received.values(), default=emitted)
                figures.append(Figure(PART, f"webhook burst throughput ({burst_n} alerts)",
                                      burst_n / ((end - start) / 1e9), "alerts/s", ">= 500"))
                figures.append(Figure(PART, "emit (spool commit) rate",
                                      burst_n / ((emitted - start) / 1e9), "alerts/s", ">= 2000"))
                # Paced: a steady rate, so latency is the pipeline's, not the queue's.
                alerts = _alerts(paced_n)
                receiver.reset(paced_n)
                sent_at: dict[str, int] = {}
                t0 = time.perf_counter()
                for i, alert in enumerate(alerts):
                    pause = t0 + i / rate - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    sent_at[alert.uuid] = time.perf_counter_ns()
                    sink.emit(alert)
                receiver.done.wait(60)
                latency_ms = np.array(
                    [(receiver.received[u] - t) / 1e6 for u, t in sent_at.items() if u in receiver.received]
                )
                lost = paced_n - len(latency_ms)
                figures.append(Figure(PART, f"enqueue-to-received p50 at {rate:.0f}/s",
                                      float(np.percentile(latency_ms, 50)), "ms", "<= 10"))
                figures.append(Figure(PART, f"enqueue-to-received p99 at {rate:.0f}/s",
                                      float(np.percentile(latency_ms, 99)), "ms", "<= 50"))
                figures.append(Figure(PART, "alerts not received", lost, "", "0"))
            finally:
                sink.close()
        # Reference: the bare HTTP round trips, one after another, on a kept-alive connection.
        bodies = [a.to_json().encode() for a in _alerts(burst_n)]
        receiver.reset(burst_n)
        with httpx.Client() as client:
            start = time.perf_counter_ns()
            for i, body in enumerate(bodies):
                client.post(receiver.url, content=body, headers={"webhook-id": str(i)})
            elapsed = (time.perf_counter_ns() - start) / 1e9
        figures.append(Figure(PART, "reference: direct httpx POSTs, no spool", burst_n / elapsed, "alerts/s"))
    finally:
        receiver.close()
    figures.extend(blocking_figures(quick))
    return figures

"""Wiring an :class:`OutputConfig` into running sinks, the ingestion server and the file tail."""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent.respond._config import OutputConfig
from agent.respond._ingest import FalcoAlert, FalcoAlertCallback, FalcoFileTail, IngestServer
from agent.respond._metrics import Metrics
from agent.respond._sinks import AlertSink, ConsoleSink, Fanout, FoldingSink, JsonlSink
from agent.respond._webhook import WebhookSink


@dataclass(slots=True)
class Outputs:
    """The running outputs. ``sink`` is where the pipeline emits alerts."""

    sink: AlertSink
    metrics: Metrics
    webhook: WebhookSink | None = None
    server: IngestServer | None = None
    tail: FalcoFileTail | None = None

    def close(self) -> None:
        """Stop taking Falco alerts first, then let the sinks finish (the webhook waits a bounded time)."""
        if self.tail is not None:
            self.tail.close()
        if self.server is not None:
            self.server.close()
        self.sink.close()


def build_outputs(
    config: OutputConfig,
    *,
    state_dir: str | os.PathLike[str],
    metrics: Metrics | None = None,
    on_falco_alert: FalcoAlertCallback | None = None,
) -> Outputs:
    """Start every output ``config`` turns on.

    Ingested Falco alerts go to ``on_falco_alert``; without one they are passed on to the sinks as they are.
    On any error the outputs already started are closed again before the error propagates.
    """
    metrics = metrics or Metrics()
    sinks: list[AlertSink] = []
    outputs: Outputs | None = None
    try:
        if config.console is not None:
            sinks.append(ConsoleSink(config.console.stream, config.console.format))
        if config.jsonl is not None:
            j = config.jsonl
            sinks.append(JsonlSink(j.path, max_bytes=j.max_bytes, backups=j.backups, fmt=j.format))
        webhook = None
        if config.webhook is not None:
            webhook = WebhookSink.from_config(config.webhook, state_dir=state_dir, metrics=metrics)
            sinks.append(webhook)
        fanout = Fanout(sinks, metrics)
        sink: AlertSink = fanout
        if config.fold_window > 0:
            sink = FoldingSink(fanout, config.fold_window, metrics)
        outputs = Outputs(sink, metrics, webhook)

        def forward(alert: FalcoAlert) -> None:
            sink.emit(alert.to_alert())

        callback = on_falco_alert or forward
        if config.listen is not None:
            outputs.server = IngestServer.from_config(config.listen, callback, metrics).start()
        if config.falco_file is not None:
            outputs.tail = FalcoFileTail(config.falco_file, callback, metrics).start()
        return outputs
    except BaseException:
        if outputs is not None:
            outputs.close()
        else:
            for started in sinks:
                started.close()
        raise

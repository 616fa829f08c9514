"""How alerts leave the agent, and how Falco's alerts come in (see docs/alerts.md).

* :class:`Alert`: Falco's JSON shape (``to_falco``), or an OCSF Detection Finding (``to_ocsf``);
  Sysgram's own fields under ``sysgram.*`` in ``output_fields`` (:func:`sysgram_fields`).
* Sinks (:class:`AlertSink`): :class:`ConsoleSink`, :class:`JsonlSink`, :class:`WebhookSink` (signed per
  Standard Webhooks, spooled in SQLite, at least once and in order), :class:`Fanout`, :class:`FoldingSink`.
* Ingestion: :class:`IngestServer` (Falco http_output, /metrics), :class:`FalcoFileTail` (file_output),
  both handing a :class:`FalcoAlert` to a callback.
* :class:`Metrics`: every Prometheus metric of the agent, in its own registry.
* :class:`OutputConfig`: the ``outputs:`` config section; :func:`build_outputs` starts what it turns on.
"""

from agent.respond._alert import (
    ALERT_FORMATS,
    PRIORITIES,
    Alert,
    AlertFormat,
    Priority,
    format_time,
    internal_alert,
    ocsf_finding,
    parse_priority,
    parse_time,
    sysgram_fields,
)
from agent.respond._config import (
    ConsoleConfig,
    JsonlConfig,
    ListenConfig,
    OutputConfig,
    WebhookConfig,
)
from agent.respond._ingest import (
    FalcoAlert,
    FalcoAlertCallback,
    FalcoFileTail,
    FalcoPayloadError,
    IngestServer,
    parse_falco_alert,
    parse_falco_json,
)
from agent.respond._metrics import Metrics
from agent.respond._outputs import Outputs, build_outputs
from agent.respond._sinks import AlertSink, ConsoleSink, Fanout, FoldingSink, JsonlSink, fold_key
from agent.respond._spool import DeadLetter, Spool, SpooledAlert
from agent.respond._webhook import RetryPolicy, WebhookSink, sign

__all__ = [
    "ALERT_FORMATS",
    "PRIORITIES",
    "Alert",
    "AlertFormat",
    "AlertSink",
    "ConsoleConfig",
    "ConsoleSink",
    "DeadLetter",
    "FalcoAlert",
    "FalcoAlertCallback",
    "FalcoFileTail",
    "FalcoPayloadError",
    "Fanout",
    "FoldingSink",
    "IngestServer",
    "JsonlConfig",
    "JsonlSink",
    "ListenConfig",
    "Metrics",
    "OutputConfig",
    "Outputs",
    "Priority",
    "RetryPolicy",
    "Spool",
    "SpooledAlert",
    "WebhookConfig",
    "WebhookSink",
    "build_outputs",
    "fold_key",
    "format_time",
    "internal_alert",
    "ocsf_finding",
    "parse_falco_alert",
    "parse_falco_json",
    "parse_priority",
    "parse_time",
    "sign",
    "sysgram_fields",
]

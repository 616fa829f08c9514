"""The agent's Prometheus metrics, in a registry of their own (never the process-global one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the agent updates. Each room increments the attributes it owns.

    The attributes are prometheus_client objects; the methods are short-hands for the common updates.
    """

    def __init__(self) -> None:
        # What /healthz answers: None when healthy (or when nothing is watched, as for `sysgram alerts
        # listen`), else why not; the live agent sets it (agent.pipeline.run_live).
        self.health: Callable[[], str | None] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("sysgram_events", "Syscalls seen by the tracer", registry=r)
        self.drops = Counter(
            "sysgram_drops", "Events lost, by the stage that lost them", ["stage"], registry=r
        )
        self.windows_scored = Counter(
            "sysgram_windows_scored", "N-gram windows scored by the model", registry=r
        )
        self.windows_known = Counter(
            "sysgram_windows_known", "Scored windows the program made in training (scored 0, no network run)",
            registry=r,
        )
        self.cache_hits = Counter(
            "sysgram_score_cache_hits", "Windows answered from the score cache", registry=r
        )
        self.anomalies_suppressed = Counter(
            "sysgram_anomalies_suppressed",
            "Anomalous processes not alerted: their executable reached its alert limit for the minute",
            registry=r,
        )
        self.rules_evaluated = Counter("sysgram_rules_evaluated", "Falco-format rule evaluations", registry=r)
        self.rule_matches = Counter(
            "sysgram_rule_matches", "Falco-format rule matches, by rule", ["rule"], registry=r
        )
        self.anomalies = Counter("sysgram_anomalies", "Anomalies the model found", registry=r)
        self.alerts = Counter("sysgram_alerts", "Alerts raised", ["rule", "priority"], registry=r)
        self.alerts_folded = Counter(
            "sysgram_alerts_folded", "Repeated alerts folded into an earlier one", registry=r
        )
        self.blocks = Counter("sysgram_blocks", "Processes blocked, by action", ["action"], registry=r)
        self.webhook_deliveries = Counter(
            "sysgram_webhook_deliveries", "Alerts the webhook endpoint accepted (2xx)", registry=r
        )
        self.webhook_failures = Counter(
            "sysgram_webhook_failures", "Failed webhook attempts, by reason", ["reason"], registry=r
        )
        self.webhook_dead_letters = Counter(
            "sysgram_webhook_dead_letters", "Alerts the endpoint kept rejecting, moved aside", registry=r
        )
        self.webhook_spool_depth = Gauge(
            "sysgram_webhook_spool_depth", "Alerts in the webhook spool waiting for delivery", registry=r
        )
        self.webhook_spool_overflow = Counter(
            "sysgram_webhook_spool_overflow", "Alerts not spooled because the spool was full", registry=r
        )
        self.webhook_disabled = Gauge(
            "sysgram_webhook_disabled", "1 when the endpoint answered 410 Gone", registry=r
        )
        self.falco_alerts_ingested = Counter(
            "sysgram_falco_alerts_ingested", "Falco alerts received, by way (http, file)", ["via"], registry=r
        )
        self.falco_ingest_errors = Counter(
            "sysgram_falco_ingest_errors", "Falco payloads refused, by reason", ["reason"], registry=r
        )
        self.sink_errors = Counter(
            "sysgram_sink_errors", "Alerts an output sink failed to take", ["sink"], registry=r
        )

    def drop(self, stage: str, n: int = 1) -> None:
        self.drops.labels(stage=stage).inc(n)

    def alert(self, rule: str, priority: str) -> None:
        self.alerts.labels(rule=rule, priority=priority).inc()

    def block(self, action: str) -> None:
        self.blocks.labels(action=action).inc()

    def webhook_failure(self, reason: str) -> None:
        self.webhook_failures.labels(reason=reason).inc()

    def falco_ingested(self, via: str) -> None:
        self.falco_alerts_ingested.labels(via=via).inc()

    def falco_error(self, reason: str) -> None:
        self.falco_ingest_errors.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (``0.0`` when absent), e.g. ``value("sysgram_alerts_total")``."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

"""The webhook sink: Standard Webhooks signing, a durable spool, and one delivery thread.

Delivery policy (docs/alerts.md says the same):

* 2xx: delivered, removed from the spool.
* connection errors, timeouts, 408, 425, 429, 5xx: transient; retried with exponential backoff and
  jitter (``Retry-After`` honoured up to the cap) until delivered. The head of the spool blocks the
  rest, so order holds and an outage loses nothing.
* 410 Gone: the endpoint is disabled (remembered in the spool across restarts), an internal alert goes
  to the other sinks, and alerts keep being spooled (up to ``spool_max``) until re-enabled.
* any other answer (a 400 with garbage, a 3xx...): a rejection; retried with backoff up to
  ``max_attempts`` times, then moved to the dead letters (kept in the spool file, an internal alert
  raised, ``sysgram alerts spool --requeue-dead`` puts them back in line).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Literal

import httpx

from agent import __version__
from agent._text import escape_controls
from agent.respond._alert import Alert, AlertFormat, internal_alert
from agent.respond._config import WebhookConfig, secret_key, without_credentials
from agent.respond._metrics import Metrics
from agent.respond._sinks import InternalAlertCallback
from agent.respond._spool import Spool, SpooledAlert

log = logging.getLogger("sysgram.respond")

_TRANSIENT_STATUS = frozenset({408, 425, 429})
_OVERFLOW_REPORT_EVERY_S = 60.0
DISABLED_KEY = "disabled_url"  # spool meta: the URL that answered 410 Gone
MAX_ANSWER = 4096  # bytes of an answer's body kept (a non-2xx one's start goes in the log line); the rest is never read
ANSWER_DEADLINE_FACTOR = 2  # an answer's body is read for at most this many times the timeout
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")


def header_safe_id(alert_id: str) -> str:
    """The alert's id as its webhook-id header: itself when it is a plain token (our uuids are), else a digest
    of it. An ingested alert chooses its own id, and one a header cannot carry (a newline, non-ASCII) would
    fail every attempt and hold up the spool behind it for good."""
    if _SAFE_ID.fullmatch(alert_id):
        return alert_id
    return "sha256-" + hashlib.sha256(alert_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``."""
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": attempt n waits between d/2 and d, d = min(cap, base·2ⁿ⁻¹)."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(attempt - 1, 0))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


Outcome = Literal["delivered", "transient", "rejected", "gone"]


class WebhookSink:
    """Sends alerts to one URL, at least once and in order, through a spool under ``state_dir``."""

    def __init__(
        self,
        url: str,
        *,
        state_dir: str | os.PathLike[str],
        secret: str | None = None,
        timeout: float = 5.0,
        max_attempts: int = 8,
        spool_max: int = 100_000,
        retry: RetryPolicy | None = None,
        fmt: AlertFormat = "falco",
        metrics: Metrics | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.shown_url = without_credentials(url)  # logs and alerts reach a SIEM: no password in them
        self._key = secret_key(secret) if secret is not None else None
        self._timeout = timeout
        self.max_attempts = max_attempts
        self.retry = retry or RetryPolicy()
        self._format = fmt
        self._metrics = metrics or Metrics()
        self._close_timeout = close_timeout
        self._rng = random.Random()
        self._internal: InternalAlertCallback | None = None
        self.spool = Spool(state_dir, spool_max)
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline = 0.0
        self._overflow_episode = 0
        self._overflow_reported_at = 0.0
        self._failing_since: float | None = None
        self._client = httpx.Client(
            timeout=timeout, follow_redirects=False, headers={"user-agent": f"sysgram/{__version__}"}
        )
        disabled_for = self.spool.get_meta(DISABLED_KEY)
        if disabled_for is not None and disabled_for != url:
            self.spool.set_meta(DISABLED_KEY, None)  # a new endpoint: the old one's 410 is not its
            disabled_for = None
        self._disabled = disabled_for is not None
        self._metrics.webhook_disabled.set(1 if self._disabled else 0)
        self._metrics.webhook_spool_depth.set(self.spool.depth)
        self._thread = threading.Thread(target=self._run, name="sysgram-webhook", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(
        cls, config: WebhookConfig, *, state_dir: str | os.PathLike[str], metrics: Metrics | None = None
    ) -> WebhookSink:
        return cls(
            config.url, state_dir=state_dir, secret=config.secret, timeout=config.timeout,
            max_attempts=config.max_attempts, spool_max=config.spool_max,
            retry=RetryPolicy(config.backoff_base, config.backoff_max), fmt=config.format, metrics=metrics,
        )

    @property
    def disabled(self) -> bool:
        return self._disabled

    def bind_internal(self, callback: InternalAlertCallback) -> None:
        self._internal = callback
        if self._disabled:
            self._raise_disabled("still disabled since an earlier 410 Gone")

    def _raise_internal(self, alert: Alert) -> None:
        log.warning("%s: %s", alert.rule, alert.output)
        if self._internal is not None:
            self._internal(alert)

    def emit(self, alert: Alert) -> None:
        body = alert.to_json(self._format).encode()
        stored = self.spool.put(alert.uuid, body)
        self._metrics.webhook_spool_depth.set(self.spool.depth)
        if stored:
            ended = self._overflow_episode
            self._overflow_episode = 0
            with self._cond:
                self._cond.notify()
            if ended:
                self._raise_internal(internal_alert(
                    "Sysgram webhook spool overflow ended", "Warning",
                    f"the webhook spool for {self.shown_url} has room again; {ended} alerts did not fit in it "
                    f"and were not sent to the webhook (other outputs got them)",
                    url=self.shown_url, overflowed=ended,
                ))
            return
        self._metrics.webhook_spool_overflow.inc()
        self._overflow_episode += 1
        now = time.monotonic()
        if self._overflow_episode == 1 or now - self._overflow_reported_at >= _OVERFLOW_REPORT_EVERY_S:
            self._overflow_reported_at = now
            self._raise_internal(internal_alert(
                "Sysgram webhook spool overflow", "Critical",
                f"the webhook spool for {self.shown_url} is full ({self.spool.max_rows} alerts); "
                f"{self._overflow_episode} alerts not spooled so far, {self.spool.overflowed} in all",
                url=self.shown_url, overflowed=self._overflow_episode, spool_max=self.spool.max_rows,
            ))

    def flush(self) -> None:
        """Nothing to do: an accepted alert is already committed to the spool."""

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the spool is empty (everything delivered or dead-lettered); False on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while self.spool.depth > 0 and not self._disabled:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return self.spool.depth == 0

    def close(self, timeout: float | None = None) -> None:
        """Deliver what can be delivered within ``timeout`` seconds; the rest stays spooled for next time."""
        wait = self._close_timeout if timeout is None else timeout
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + wait
            self._cond.notify_all()
        self._thread.join(wait + self._timeout + 1.0)
        if self._thread.is_alive():
            log.error("webhook %s: delivery thread did not stop in time", self.shown_url)
            return
        self._client.close()
        self.spool.close()

    # --- the delivery thread -------------------------------------------------------------------

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless woken for closing; False when it is time to stop."""
        with self._cond:
            if self._stopping:
                seconds = min(seconds, self._deadline - time.monotonic())
                if seconds <= 0:
                    return False
            self._cond.wait(seconds)
            return not (self._stopping and time.monotonic() >= self._deadline)

    def _run(self) -> None:
        failures = 0  # consecutive transient failures of the head
        while True:
            with self._cond:
                if self._stopping and (self.spool.depth == 0 or self._disabled
                                       or time.monotonic() >= self._deadline):
                    return
                if self._disabled or self.spool.depth == 0:
                    if self._stopping:
                        return
                    self._cond.wait(1.0)
                    continue
            item = self.spool.head()
            if item is None:
                continue
            try:
                outcome, delay_hint = self._post(item)
            except Exception as err:  # never let the thread die: the spool would silently stop draining
                log.error("webhook %s: delivery failed unexpectedly: %s", self.shown_url, err)
                outcome, delay_hint = "transient", None
            try:
                failures, delay = self._settle(item, outcome, delay_hint, failures)
            except Exception as err:  # the spool's disk is full or failing: wait and retry, never die
                log.error("webhook %s: the spool failed: %s; retrying", self.shown_url, err)
                delay = self.retry.cap
            if delay is not None and not self._sleep(delay):
                return

    def _settle(self, item: SpooledAlert, outcome: Outcome, delay_hint: float | None,
                failures: int) -> tuple[int, float | None]:
        """Record one attempt's outcome in the spool; -> (consecutive transient failures, how long to wait
        before the next attempt, None for at once)."""
        if outcome == "delivered":
            self.spool.delete(item.seq)
            self._metrics.webhook_deliveries.inc()
            self._metrics.webhook_spool_depth.set(self.spool.depth)
            with self._cond:
                self._cond.notify_all()
            return 0, None
        if outcome == "gone":
            self._disable()
            return failures, None
        failures += 1
        if outcome == "rejected":
            rejections = self.spool.reject(item.seq)
            if rejections >= self.max_attempts:
                self._bury(item, rejections)
                return 0, None
        delay = self.retry.delay(failures, self._rng)
        if delay_hint is not None:
            delay = min(max(delay, delay_hint), self.retry.cap)
        return failures, delay

    def _post(self, item: SpooledAlert) -> tuple[Outcome, float | None]:
        timestamp = int(time.time())
        webhook_id = header_safe_id(item.webhook_id)
        headers = {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, webhook_id, timestamp, item.body)
        try:
            # Streamed, every answer's body read to at most MAX_ANSWER bytes and not past a deadline, so an
            # endpoint that floods or trickles its answer can neither grow our memory nor hold this thread. A
            # body read to its end (the usual short one) lets the connection go back to the pool (keep-alive).
            deadline = time.monotonic() + ANSWER_DEADLINE_FACTOR * self._timeout
            with self._client.stream("POST", self.url, content=item.body, headers=headers) as response:
                body = self._answer_body(response, deadline)
        except httpx.TimeoutException:
            self._transient_failure("timeout", "timed out")
            return "transient", None
        except httpx.HTTPError as err:
            self._transient_failure("connect", str(err) or type(err).__name__)
            return "transient", None
        status = response.status_code
        if 200 <= status < 300:
            if self._failing_since is not None:
                down_for = time.monotonic() - self._failing_since
                log.info("webhook %s: delivering again after %.1fs", self.shown_url, down_for)
                self._failing_since = None
            return "delivered", None
        snippet = escape_controls(" ".join(body[:120].decode("utf-8", "replace").split()))
        answered = f"answered {status} {escape_controls(response.reason_phrase)}: {snippet or '-'}"
        if status in _TRANSIENT_STATUS or status >= 500:
            self._transient_failure(f"http_{status // 100}xx", answered)  # logged once per outage
            return "transient", _retry_after(response.headers.get("retry-after"))
        log.warning("webhook %s %s", self.shown_url, answered)  # 410 and rejections: each is news
        if status == 410:
            self._metrics.webhook_failure("gone")
            return "gone", None
        self._metrics.webhook_failure("rejected")
        return "rejected", None

    @staticmethod
    def _answer_body(response: httpx.Response, deadline: float) -> bytes:
        """Up to MAX_ANSWER bytes of the answer's body, read until ``deadline``. A body that stalls once the
        status is known costs only its bytes: the status stands (a 410 is not a timeout)."""
        body = b""
        try:
            for chunk in response.iter_raw():
                body += chunk
                if len(body) >= MAX_ANSWER or time.monotonic() > deadline:
                    break
        except (httpx.TimeoutException, httpx.ReadError, httpx.RemoteProtocolError):
            pass  # the connection is not reused: leaving the stream closes it
        return body[:MAX_ANSWER]

    def _transient_failure(self, reason: str, detail: str) -> None:
        self._metrics.webhook_failure(reason)
        if self._failing_since is None:  # one line per outage, not one per retry
            self._failing_since = time.monotonic()
            log.warning("webhook %s: %s; alerts stay spooled and are retried (logged once per outage)", self.shown_url,
                        detail)

    def _disable(self) -> None:
        self.spool.set_meta(DISABLED_KEY, self.url)
        self._disabled = True
        self._metrics.webhook_disabled.set(1)
        with self._cond:
            self._cond.notify_all()
        self._raise_disabled("answered 410 Gone")

    def _raise_disabled(self, why: str) -> None:
        self._raise_internal(internal_alert(
            "Sysgram webhook endpoint disabled", "Error",
            f"webhook {self.shown_url} {why}; delivery stopped, {self.spool.depth} alerts kept in the spool "
            f"(re-enable with: sysgram alerts spool STATE_DIR --enable)",
            url=self.shown_url, spooled=self.spool.depth,
        ))

    def _bury(self, item: SpooledAlert, rejections: int) -> None:
        reason = f"rejected {rejections} times"
        self.spool.bury(item.seq, reason)
        self._metrics.webhook_dead_letters.inc()
        self._metrics.webhook_spool_depth.set(self.spool.depth)
        self._raise_internal(internal_alert(
            "Sysgram webhook alert dead-lettered", "Error",
            f"webhook {self.shown_url} {reason} alert {item.webhook_id}; it was moved to the dead letters",
            url=self.shown_url, webhook_id=item.webhook_id,
        ))


def enable_endpoint(spool: Spool) -> bool:
    """Forget an earlier 410 Gone; True when the endpoint was disabled."""
    was = spool.get_meta(DISABLED_KEY) is not None
    spool.set_meta(DISABLED_KEY, None)
    return was




def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: rare from webhook receivers; plain backoff is fine

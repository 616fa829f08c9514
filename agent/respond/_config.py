"""The ``outputs:`` section of the config file: validated into frozen dataclasses.

The caller reads the YAML; :meth:`OutputConfig.from_mapping` checks the section and names the key path
(``outputs.webhook.timeout``) of anything unknown or of the wrong type.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from agent.errors import ConfigError
from agent.respond._alert import ALERT_FORMATS, AlertFormat

DAY_SECONDS = 86_400.0  # the largest interval a setting takes

ConsoleFormat = Literal["text", "falco", "ocsf"]
Stream = Literal["stderr", "stdout"]

DEFAULT_PORT = 8765
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    stream: Stream = "stderr"
    format: ConsoleFormat = "text"


@dataclass(frozen=True, slots=True)
class JsonlConfig:
    path: str
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5
    format: AlertFormat = "falco"


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret: str | None = None
    timeout: float = 5.0
    max_attempts: int = 8  # for rejections (4xx); transient failures retry until delivered
    spool_max: int = 100_000
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    format: AlertFormat = "falco"

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"WebhookConfig(url={without_credentials(self.url)!r}, secret={'***' if self.secret else None})"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the Falco ingestion endpoint and /metrics listen."""

    address: str = LOOPBACK
    port: int = DEFAULT_PORT
    token: str | None = None

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.address)

    def __repr__(self) -> str:
        token = "***" if self.token else None
        return f"ListenConfig(address={self.address!r}, port={self.port}, token={token})"


@dataclass(frozen=True, slots=True)
class OutputConfig:
    """Every output of the agent; a sink that is ``None`` is off."""

    console: ConsoleConfig | None = field(default_factory=ConsoleConfig)
    jsonl: JsonlConfig | None = None
    webhook: WebhookConfig | None = None
    listen: ListenConfig | None = None
    falco_file: str | None = None
    fold_window: float = 2.0  # seconds; 0 turns folding off

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, source: str) -> OutputConfig:
        """Validate the ``outputs:`` section read from ``source`` (a file name, for error messages)."""
        if data is None:
            return cls()
        reader = _Reader(source)
        top = reader.mapping(data, "outputs")
        reader.known(top, "outputs", {"console", "jsonl", "webhook", "listen", "falco_file", "fold_window"})
        console = reader.console(top.get("console", True))
        jsonl = reader.jsonl(top["jsonl"]) if top.get("jsonl") is not None else None
        webhook = reader.webhook(top["webhook"]) if top.get("webhook") is not None else None
        listen = reader.listen(top["listen"]) if top.get("listen") is not None else None
        falco_file = reader.optional_str(top, "outputs", "falco_file")
        fold_window = reader.number(top.get("fold_window", 2.0), "outputs.fold_window", minimum=0.0)
        return cls(console, jsonl, webhook, listen, falco_file, fold_window)


def address_is_plausible(address: str) -> bool:
    """An IP address, or something shaped like a host name (digits and dots alone must be a valid IPv4)."""
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        pass
    labels = address.rstrip(".").split(".")
    return (bool(address) and not all(label.isdigit() for label in labels)
            and all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels))


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part (for logs, alerts and error lines)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after ``whsec_``, else the UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError("a secret starting with 'whsec_' must be base64 after the prefix") from err
    else:
        key = secret.encode()
    if not key:  # `whsec_${UNSET}`: an HMAC under an empty key is one anyone can forge
        raise ValueError("the secret is empty (after 'whsec_'): signatures under an empty key prove nothing")
    return key


T = TypeVar("T")


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{key}: {message}", path=self.source)

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {_kind(value)}")
        return cast(Mapping[str, Any], value)

    def known(self, data: Mapping[str, Any], key: str, allowed: set[str]) -> None:
        for name in data:
            if name not in allowed:
                raise self.fail(f"{key}.{name}", f"unknown key; expected one of {', '.join(sorted(allowed))}")

    def typed(self, value: Any, key: str, kind: type[T], what: str) -> T:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(key, f"expected {what}, got {_kind(value)}")
        return value

    def integer(self, value: Any, key: str, *, minimum: int) -> int:
        number = self.typed(value, key, int, "an integer")
        if number < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {number}")
        return number

    def number(self, value: Any, key: str, *, minimum: float, exclusive: bool = False,
               maximum: float = DAY_SECONDS) -> float:
        """A number in [minimum, maximum] (seconds, mostly: beyond a day they overflow the clocks they are
        added to, and a webhook thread that died of it delivered nothing more)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value}")
        if value < minimum or (exclusive and value == minimum):
            raise self.fail(key, f"must be {'more than' if exclusive else 'at least'} {minimum}, got {value}")
        if value > maximum:
            raise self.fail(key, f"must be at most {maximum:g}, got {value:g}")
        return float(value)

    def string(self, value: Any, key: str) -> str:
        text = self.typed(value, key, str, "a string")
        if not text:
            raise self.fail(key, "must not be empty")
        return text

    def optional_str(self, data: Mapping[str, Any], prefix: str, name: str) -> str | None:
        value = data.get(name)
        return None if value is None else self.string(value, f"{prefix}.{name}")

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        text = self.typed(value, key, str, "a string")
        if text not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    def section(
        self, value: Any, key: str, allowed: set[str], shorthand: str | None = None
    ) -> Mapping[str, Any]:
        # ``jsonl: /path`` is short for ``jsonl: {path: /path}``.
        if shorthand is not None and isinstance(value, str):
            return {shorthand: value}
        data = self.mapping(value, key)
        self.known(data, key, allowed)
        return data

    def console(self, value: Any) -> ConsoleConfig | None:
        if value is None:  # ``console:`` with nothing after it, like any other sink, is off
            return None
        if isinstance(value, bool):
            return ConsoleConfig() if value else None
        data = self.section(value, "outputs.console", {"enabled", "stream", "format"})
        if not self.typed(data.get("enabled", True), "outputs.console.enabled", bool, "true or false"):
            return None
        stream = self.choice(data.get("stream", "stderr"), "outputs.console.stream", ("stderr", "stdout"))
        fmt = self.choice(data.get("format", "text"), "outputs.console.format", ("text", *ALERT_FORMATS))
        return ConsoleConfig(cast(Stream, stream), cast(ConsoleFormat, fmt))

    def format(self, data: Mapping[str, Any], key: str) -> AlertFormat:
        return cast(AlertFormat, self.choice(data.get("format", "falco"), f"{key}.format", ALERT_FORMATS))

    def jsonl(self, value: Any) -> JsonlConfig:
        key = "outputs.jsonl"
        data = self.section(value, key, {"path", "max_bytes", "backups", "format"}, shorthand="path")
        if "path" not in data:
            raise self.fail(f"{key}.path", "missing")
        defaults = JsonlConfig(path="")
        return JsonlConfig(
            path=self.string(data["path"], f"{key}.path"),
            max_bytes=self.integer(
                data.get("max_bytes", defaults.max_bytes), f"{key}.max_bytes", minimum=1024
            ),
            backups=self.integer(data.get("backups", defaults.backups), f"{key}.backups", minimum=0),
            format=self.format(data, key),
        )

    def webhook(self, value: Any) -> WebhookConfig:
        key = "outputs.webhook"
        allowed = {
            "url", "secret", "timeout", "max_attempts", "spool_max", "backoff_base", "backoff_max", "format"
        }
        data = self.section(value, key, allowed, shorthand="url")
        if "url" not in data:
            raise self.fail(f"{key}.url", "missing")
        url = self.string(data["url"], f"{key}.url")
        if not url.startswith(("http://", "https://")):
            raise self.fail(f"{key}.url", f"expected an http:// or https:// URL, got {without_credentials(url)!r}")
        try:
            parsed = urllib.parse.urlsplit(url)
            parsed.port  # noqa: B018  (raises on a port outside 0-65535)
        except ValueError as err:
            raise self.fail(f"{key}.url", f"not a usable URL ({err}): {without_credentials(url)!r}") from None
        if not parsed.hostname or parsed.port == 0:
            raise self.fail(f"{key}.url", f"expected a host and a port of 1-65535, got {without_credentials(url)!r}")
        secret = self.optional_str(data, key, "secret")
        if secret is not None:
            try:
                secret_key(secret)
            except ValueError as err:
                raise self.fail(f"{key}.secret", str(err)) from None
        d = WebhookConfig(url="")
        number: Callable[[str, float], float] = lambda name, default: self.number(  # noqa: E731
            data.get(name, default), f"{key}.{name}", minimum=0.0, exclusive=True
        )
        backoff_base = number("backoff_base", d.backoff_base)
        backoff_max = number("backoff_max", d.backoff_max)
        if backoff_max < backoff_base:
            raise self.fail(f"{key}.backoff_max", f"must be at least backoff_base ({backoff_base})")
        return WebhookConfig(
            url=url,
            secret=secret,
            timeout=number("timeout", d.timeout),
            max_attempts=self.integer(
                data.get("max_attempts", d.max_attempts), f"{key}.max_attempts", minimum=1
            ),
            spool_max=self.integer(data.get("spool_max", d.spool_max), f"{key}.spool_max", minimum=1),
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            format=self.format(data, key),
        )

    def listen(self, value: Any) -> ListenConfig:
        key = "outputs.listen"
        data = self.section(value, key, {"address", "host", "port", "token"})
        if "address" in data and "host" in data:
            raise self.fail(f"{key}.host", "give address or host (the same thing), not both")
        name = "host" if "host" in data else "address"
        address = self.string(data.get(name, LOOPBACK), f"{key}.{name}")
        port = self.integer(data.get("port", DEFAULT_PORT), f"{key}.port", minimum=0)
        if port > 65535:
            raise self.fail(f"{key}.port", f"must be at most 65535, got {port}")
        if not address_is_plausible(address):
            raise self.fail(f"{key}.{name}", f"not an IP address or a host name: {address!r}")
        token = self.optional_str(data, key, "token")
        if token is not None and token != token.strip():  # a client's value is stripped: it could never match
            raise self.fail(f"{key}.token", "must not begin or end with white space")
        config = ListenConfig(address, port, token)
        if token is None and not config.is_loopback:
            raise self.fail(f"{key}.token", f"required when listening on {address} (not a loopback address)")
        return config


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"

"""``sysgram alerts ...``: try the outputs, look into the webhook spool, listen for Falco's alerts."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from agent._argtypes import positive_seconds
from agent.errors import ConfigError, DeliveryError

DEFAULT_STATE_DIR = "/var/lib/sysgram"


def register(subparsers: Any) -> None:
    alerts = subparsers.add_parser("alerts", help="test alert, webhook spool, Falco intake")
    sub = alerts.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)

    test = sub.add_parser("test", help="send one test alert to the console and any --jsonl/--webhook given")
    test.add_argument("--jsonl", metavar="PATH", help="append it to this JSON lines file")
    test.add_argument("--webhook", metavar="URL", help="deliver it to this webhook (through the spool)")
    test.add_argument("--secret", help="whsec_... or raw; or env SYSGRAM_WEBHOOK_SECRET")
    test.add_argument("--format", choices=("falco", "ocsf"), default="falco", help="JSON shape")
    test.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where the spool lives")
    test.add_argument("--timeout", type=positive_seconds, default=10.0, help="seconds to wait for delivery (default 10)")
    test.set_defaults(handler=_test)

    spool = sub.add_parser("spool", help="the webhook spool: depth, dead letters, a disabled endpoint")
    spool.add_argument("state_dir", nargs="?", default=DEFAULT_STATE_DIR, metavar="STATE_DIR")
    spool.add_argument("--enable", action="store_true", help="forget a 410 Gone; deliver again")
    spool.add_argument("--requeue-dead", action="store_true", help="put the dead letters back in line")
    spool.add_argument("--json", action="store_true", help="print the status as JSON")
    spool.set_defaults(handler=_spool)

    listen = sub.add_parser("listen", help="print Falco alerts posted to it (serves /metrics)")
    listen.add_argument("--address", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    listen.add_argument("--port", type=_port, default=8765, help="port 1-65535 (default 8765)")
    listen.add_argument("--token", help="bearer token (required off loopback); env SYSGRAM_LISTEN_TOKEN")
    listen.add_argument("--falco-file", metavar="PATH", help="also follow Falco's file_output")
    listen.add_argument("--seconds", type=positive_seconds, help="stop after this long (default: until Ctrl-C)")
    listen.set_defaults(handler=_listen)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _test(args: argparse.Namespace) -> int:
    from agent.respond import Alert, ConsoleSink, Fanout, JsonlSink, Metrics, WebhookSink, sysgram_fields
    from agent.respond._config import secret_key

    secret = args.secret or os.environ.get("SYSGRAM_WEBHOOK_SECRET")
    if secret is not None:
        try:
            secret_key(secret)
        except ValueError as err:
            raise ConfigError(f"--secret: {err}") from None
    if args.webhook is not None and not args.webhook.startswith(("http://", "https://")):
        raise ConfigError(f"--webhook: expected an http:// or https:// URL, got {args.webhook!r}")
    metrics = Metrics()
    sinks: list[Any] = [ConsoleSink("stdout")]
    if args.jsonl:
        sinks.append(JsonlSink(args.jsonl, fmt=args.format))
    webhook = None
    if args.webhook:
        webhook = WebhookSink(args.webhook, state_dir=args.state_dir, secret=secret, fmt=args.format,
                              metrics=metrics, max_attempts=1)
        sinks.append(webhook)
    fanout = Fanout(sinks, metrics)
    alert = Alert.new(
        "Sysgram test alert", "Notice", "a test alert from `sysgram alerts test`; nothing is wrong",
        {"proc.pid": os.getpid(), "proc.name": "sysgram",
         **sysgram_fields(score=0.0, threshold=1.0, verdict="test", action="none")},
        tags=("sysgram", "test"),
    )
    fanout.emit(alert)
    code = 0
    if webhook is not None:
        delivered = webhook.wait_idle(args.timeout) and metrics.value("sysgram_webhook_deliveries_total") >= 1
        if not delivered:
            code = 1
            rejected = metrics.value("sysgram_webhook_dead_letters_total") >= 1
            where = ("the endpoint rejected it, so it went to the dead letters" if rejected
                     else f"not delivered within {args.timeout:g}s; it stays in the spool")
            print(f"sysgram: webhook {args.webhook}: {where} under {args.state_dir} (`sysgram alerts spool "
                  f"{args.state_dir}`)", file=sys.stderr)
        webhook.close(timeout=0)
    fanout.close()
    return code


def _spool(args: argparse.Namespace) -> int:
    from agent.respond import Spool
    from agent.respond._config import without_credentials
    from agent.respond._spool import SPOOL_NAME, peek
    from agent.respond._webhook import DISABLED_KEY, enable_endpoint

    path = os.path.join(args.state_dir, SPOOL_NAME)
    if not os.path.exists(path):
        raise DeliveryError("no webhook spool here (has a webhook been configured?)", path=path)
    if args.enable or args.requeue_dead:  # changes: only with the spool's lock (the agent stopped)
        try:
            spool = Spool(args.state_dir)
        except DeliveryError as err:
            raise DeliveryError(f"{err.message}; stop the agent to change it (its status can be read while it "
                                "runs: `sysgram alerts spool` without options)", path=err.path) from None
        try:
            if args.enable:
                print("endpoint re-enabled" if enable_endpoint(spool) else "endpoint was not disabled")
            if args.requeue_dead:
                print(f"{spool.requeue_dead()} dead letters put back in line")
        finally:
            spool.close()
    seen = peek(args.state_dir)  # read-only: works while the agent runs and delivers
    status = {
        "spool": path,
        "pending": seen.pending,
        "oldest_pending": _age(seen.oldest_created_ns) if seen.oldest_created_ns is not None else None,
        "dead_letters": seen.dead_letters,
        "overflowed": seen.overflowed,
        "disabled_endpoint": without_credentials(disabled) if (disabled := seen.meta.get(DISABLED_KEY)) else None,
    }
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for key, value in status.items():
            print(f"{key:18} {value if value is not None else '-'}")
    return 0


def _age(created_ns: int) -> str:
    return f"{(time.time_ns() - created_ns) / 1e9:.0f}s ago"


def _listen(args: argparse.Namespace) -> int:
    from agent.respond import ConsoleSink, FalcoAlert, FalcoFileTail, IngestServer, Metrics

    metrics = Metrics()
    console = ConsoleSink("stdout")

    def show(alert: FalcoAlert) -> None:
        console.emit(alert.to_alert())

    token = args.token or os.environ.get("SYSGRAM_LISTEN_TOKEN")
    server = IngestServer(show, metrics, address=args.address, port=args.port, token=token).start()
    tail = FalcoFileTail(args.falco_file, show, metrics).start() if args.falco_file else None
    print(f"listening on {server.url} (POST Falco alerts, GET /metrics)", file=sys.stderr)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait(args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if tail is not None:
            tail.close()
        server.close()
    return 0

"""JSON logs, request ids and Prometheus metrics.

Logs are one JSON object per line so log shippers need no parsing rules. Nothing here ever
receives a token, cookie or session id: callers pass a short hash (``short_hash``) instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["METRICS_CONTENT_TYPE", "Metrics", "configure_logging", "new_request_id", "short_hash"]

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra={...}`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # Exception type and message only: tracebacks go to debug level, never to users.
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ours (JSON, with route and user).
    logging.getLogger("aiohttp.access").disabled = True


def new_request_id() -> str:
    return secrets.token_hex(8)


def short_hash(secret: str | bytes) -> str:
    """A short, non-reversible label for a session id or token, safe to log."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()[:12]


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "oidc_gateway_requests",
            "Requests answered, by route and outcome",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "oidc_gateway_request_duration_seconds",
            "Time to the response headers",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.logins = Counter(
            "oidc_gateway_logins",
            "Completed and failed logins",
            ["result"],
            registry=self.registry,
        )
        self.provider_ready = Gauge(
            "oidc_gateway_provider_ready",
            "1 when the provider's metadata and keys are loaded",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

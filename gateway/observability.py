"""Logs, request ids and Prometheus metrics.

Logs are one JSON object per line (or ``key=value`` text for a terminal) so log shippers need
no parsing rules. Nothing here ever receives a token, cookie or session id: callers pass a
short hash (``short_hash``) instead.

Metrics are cheap per request on purpose: the label children a request touches are bound once
and kept (``Metrics.observe_request``), so the hot path is a dict lookup and two increments,
not ``labels()`` with its argument checks and lock. With ``server.workers`` > 1 every worker
writes its samples to files in a directory the supervisor made, and whichever worker a scrape
reaches adds them all up (prometheus_client's multiprocess mode): counters never jump back
when a scrape lands on another worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from bisect import bisect_left
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__
from gateway.headers import REQUEST_ID_HEADER
from gateway.models import IndexEntry
from gateway.policy import Access

__all__ = [
    "AUDITED",
    "DECISIONS",
    "METRICS_CONTENT_TYPE",
    "REQUEST_ID_HEADER",
    "HeldLines",
    "JsonFormatter",
    "LineStreamHandler",
    "LineTemplate",
    "MeteredStore",
    "Metrics",
    "Outcome",
    "TextFormatter",
    "configure_logging",
    "new_request_id",
    "request_id",
    "short_hash",
]

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}

# A client's (or ingress's) request id is reused only when it looks like an id: UUIDs, hex,
# base64 and dotted or colon-separated trace ids pass; spaces, quotes, angle brackets and
# control characters do not, so the id can go into a header, a log line and an HTML page
# without any of them having to defend against it.
_SAFE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/=@-]{0,127}")

# Every value the ``decision`` label takes. ``endpoint``: one of the gateway's own endpoints
# (/ping, /metrics, /oauth2/*), no access decision. ``error``: the request ended before a
# decision could be made (bad request, no route, session store down).
DECISIONS: Final = (
    "allowed", "denied", "login_redirect", "unauthenticated_401", "public", "error", "endpoint",
)
_STORE_OPERATIONS: Final = ("get", "set", "set_new", "delete", "pop", "ping")
# From 1 ms (a cached page) to 30 s (a slow report); the upstream and the gateway share them so
# the two histograms can be compared bucket by bucket.
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Redis answers in well under a millisecond on a LAN; the store timeout is a second by default.
_STORE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------


class _Clock:
    """``2026-01-31T12:00:00.123Z`` for a record; the part down to the second is made once
    per second (two log lines per request make strftime show up in a profile)."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, record: logging.LogRecord) -> str:
        return self.at(record.created)

    def at(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int((created - second) * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> Iterable[tuple[str, Any]]:
    """The ``extra={...}`` fields of a record, in the order they were given."""
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key[0] != "_":
            yield key, value


# One encoder for every line (json.dumps with options builds a new one per call).
_JSON: Final = json.JSONEncoder(default=str, separators=(",", ":"))
# Line breaks to str.splitlines() and to some log readers, which JSON may carry unescaped.
_LINE_BREAKS: Final = re.compile("[\x85\u2028\u2029]")


def _json_text(out: Any) -> str:
    """One log line's JSON, or one value of it as written inside the line. orjson writes it
    in a tenth of the standard encoder's time (a line per request, issue 7) and escapes what
    must be escaped (quotes, backslash, every control character, so a value can never end the
    line); non-ASCII text stays UTF-8, but for the three characters that some readers take for
    a line break (NEL, U+2028, U+2029), which are escaped as the standard encoder does. What
    orjson refuses (an integer beyond 64 bits, a dict with other keys than strings) takes the
    standard encoder; what neither knows is written as ``str(value)``."""
    try:
        raw = orjson.dumps(out, default=str)
    except (orjson.JSONEncodeError, TypeError):
        return _JSON.encode(out)
    line = raw.decode()
    if not raw.isascii() and _LINE_BREAKS.search(line):
        line = _LINE_BREAKS.sub(lambda match: f"\\u{ord(match.group()):04x}", line)
    return line


def _error_text(formatter: logging.Formatter, record: logging.LogRecord) -> dict[str, str]:
    """Exception type and message; the traceback only at debug level (never to users)."""
    if not record.exc_info or record.exc_info[0] is None:
        return {}
    out = {"error": f"{record.exc_info[0].__name__}: {record.exc_info[1]}"}
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        out["traceback"] = formatter.formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra={...}`` fields become top-level keys.

    ``pid``: add the process id to every line, so the lines of several workers writing to one
    stream can be told apart.
    """

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid
        self._clock = _Clock()

    def clock_text(self, created: float) -> str:
        return self._clock.at(created)

    def _head(
        self, created: float | str, level: str, logger: str, message: str, pid: int | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": created if isinstance(created, str) else self._clock.at(created),
            "level": level,
            "logger": logger,
            "msg": message,
        }
        if self._pid:
            out["pid"] = pid
        return out

    def format(self, record: logging.LogRecord) -> str:
        out = self._head(record.created, record.levelname.lower(), record.name,
                         record.getMessage(), record.process)
        out.update(_extras(record))
        if record.exc_info:
            out.update(_error_text(self, record))
        return _json_text(out)

    def format_fields(
        self, logger: str, message: str, fields: dict[str, Any], *, at: str | None = None
    ) -> str:
        """The line :meth:`format` makes of ``logger.info(message, extra=fields)`` (``at``:
        the time as written, else now)."""
        out = self._head(time.time() if at is None else at, "info", logger, message, _pid)
        out.update(fields)
        return _json_text(out)


# A text value is written bare when it cannot be misread: no spaces, quotes, "=" or controls.
_BARE: Final = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    text = value if isinstance(value, str) else str(value)
    # Quoted with JSON's escapes: a newline in a value can never start a forged log line.
    return text if _BARE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``: the same fields as the JSON format, for
    people reading a terminal. Values with spaces or quotes are quoted; ``-`` is none."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        fields = list(_extras(record))
        if self._pid:
            fields.insert(0, ("pid", record.process))
        fields.extend(_error_text(self, record).items())
        head = f"{self._clock(record)} {record.levelname.lower()} {record.name}: "
        message = record.getMessage()
        tail = " ".join(f"{key}={_text_value(value)}" for key, value in fields)
        # The message is the gateway's own text; a quoted multi-line one stays on one line.
        body = message if "\n" not in message else json.dumps(message)
        return head + body + (" " + tail if tail else "")


class LineStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The StreamHandler of :func:`configure_logging`, which :func:`log_info` can also hand an
    already formatted line.

    Every line is written (and flushed) before the call returns, so a request's access and
    audit lines are out before its answer is: a reader of the log who just got the answer
    finds them there. (Writing once per event-loop turn instead saved about a write(2) per
    request, which did not pay for lines arriving after the answers they describe.)
    """

    def emit_fields(self, line: str) -> None:
        self.emit_lines((line,))

    def emit_lines(self, lines: Sequence[str]) -> None:
        """Write formatted lines with one write(2): the answers of one event-loop turn that
        were decided at once (``app``) write their lines together, before any of them is sent
        (issue 7: a write per line cost a 401 about a fifth of its CPU under load)."""
        terminator = self.terminator
        self.acquire()
        try:
            self.stream.write(terminator.join(lines) + terminator)
            self.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing left to tell
            pass
        finally:
            self.release()


def _plain_path(logger: logging.Logger, root: logging.Logger) -> bool:
    """Whether a record of ``logger`` would reach the root's handler untouched: no logger on
    the way (``gateway.audit``, ``gateway``) has a handler or filter of its own, none is
    disabled, all propagate."""
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or node.filters or node.disabled or not node.propagate:
            return False
        node = node.parent
    return node is root


def _our_handler(logger: logging.Logger) -> tuple[LineStreamHandler, JsonFormatter] | None:
    """The handler and formatter an INFO line of ``logger`` reaches untouched when the logging
    set-up is ours alone (:func:`configure_logging`: one JSON handler on the root, no
    filters); None for any other set-up (a test's log capture, an embedding app's)."""
    root = logging.root
    handlers = root.handlers
    handler = handlers[0] if len(handlers) == 1 else None
    formatter = handler.formatter if handler is not None else None
    if (
        not isinstance(handler, LineStreamHandler)
        or not isinstance(formatter, JsonFormatter)
        or handler.level > logging.INFO
        or handler.filters
        or root.filters
        or not _plain_path(logger, root)
    ):
        return None
    return handler, formatter


class HeldLines:
    """Formatted lines held until :meth:`write`: the lines of answers that the server writes
    at the end of an event-loop turn (``app.TurnWriter``), all with one write(2), before any
    of those answers (a reader of the log who has an answer finds its lines)."""

    __slots__ = ("_handler", "_lines")

    def __init__(self) -> None:
        self._handler: LineStreamHandler | None = None
        self._lines: list[str] = []

    def hold(self, handler: LineStreamHandler, line: str) -> None:
        if handler is not self._handler:  # the logging set-up changed: keep the order
            self.write()
            self._handler = handler
        self._lines.append(line)

    def hold_info(self, logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
        """:func:`log_info`, the line held when the logging set-up is ours alone (any other
        set-up gets it at once)."""
        made = _info_line(logger, message, fields)
        if made is not None:
            self.hold(*made)

    def write(self) -> None:
        if self._lines and self._handler is not None:
            lines, self._lines = self._lines, []
            self._handler.emit_lines(lines)


def log_info(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """``logger.info(message, extra=fields)``, the same line, without a LogRecord.

    The access and audit lines of every request spent most of their cost in the logging
    machinery (the record, its ``__dict__`` scan, the handler chain). When the logging set-up
    is ours alone (:func:`_our_handler`), the line is formatted straight from ``fields``; any
    other set-up takes the standard path.
    """
    made = _info_line(logger, message, fields)
    if made is not None:
        made[0].emit_fields(made[1])


def _info_line(
    logger: logging.Logger, message: str, fields: dict[str, Any]
) -> tuple[LineStreamHandler, str] | None:
    """The line of ``logger.info(message, extra=fields)`` and the handler to write it with,
    when the logging set-up is ours alone; else None: the line went the standard way at once,
    or the level is off."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    ours = _our_handler(logger)
    if ours is None:
        logger.info(message, extra=fields)
        return None
    handler, formatter = ours
    return handler, formatter.format_fields(logger.name, message, fields)


class LineTemplate:
    """The line ``log_info(logger, message, fields)`` writes, for lines that differ only in
    the time and a few ``variables`` of ``fields`` (the audit line of a 401 answered at once:
    same route, path and reason, another request id and duration). Made once, each line is
    then a join of strings: no dict, no encoding of the rest (issue 7: formatting was a
    third of such a line's cost).

    The constant parts are cut from a line made by the formatter itself, with random markers
    in place of the variable values, so the two can never differ.
    """

    __slots__ = ("_formatter", "_pairs", "_parts", "_pid", "fields", "logger", "message",
                 "variables")

    def __init__(
        self, logger: logging.Logger, message: str, fields: dict[str, Any],
        variables: Sequence[str],
    ) -> None:
        self.logger = logger
        self.message = message
        self.fields = fields
        self.variables = tuple(variables)
        self._formatter: JsonFormatter | None = None
        self._pid = 0
        # The text between the variable values; None when the markers could not be told
        # apart from the fields. Then, for each value, which one it is (-1: the time) and the
        # text after it.
        self._parts: tuple[str, ...] | None = None
        self._pairs: tuple[tuple[int, str], ...] = ()

    def line(self, *values: Any) -> tuple[LineStreamHandler, str] | None:
        """The line with these ``values`` of :attr:`variables` and the handler to write it
        with (:meth:`LineStreamHandler.emit_lines`). None when there is nothing to write
        later: the level is off, or the logging set-up is not ours alone and the line went
        the standard way at once (:func:`log_info`)."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return None
        ours = _our_handler(logger)
        parts = None
        if ours is not None:
            formatter = ours[1]
            parts = self._parts
            if formatter is not self._formatter or self._pid != _pid:
                parts = self._build(formatter)
        if ours is None or parts is None:
            log_info(logger, self.message, {**self.fields, **dict(zip(self.variables, values,
                                                                      strict=True))})
            return None
        handler, formatter = ours
        pieces = [parts[0]]
        for slot, part in self._pairs:
            pieces.append(f'"{formatter.clock_text(time.time())}"' if slot < 0
                          else _json_text(values[slot]))
            pieces.append(part)
        return handler, "".join(pieces)

    def _build(self, formatter: JsonFormatter) -> tuple[str, ...] | None:
        marker = secrets.token_hex(16)
        marks = {f"{marker}t": -1, **{f"{marker}{i}": i for i in range(len(self.variables))}}
        fields = dict(self.fields)
        for i, name in enumerate(self.variables):
            fields[name] = f"{marker}{i}"
        text = formatter.format_fields(self.logger.name, self.message, fields,
                                       at=f"{marker}t")
        found: list[tuple[int, str, int]] = []
        for mark, slot in marks.items():
            quoted = f'"{mark}"'
            if text.count(quoted) != 1:  # not again for this formatter and process
                self._formatter, self._pid, self._parts = formatter, _pid, None
                return None
            found.append((text.index(quoted), quoted, slot))
        found.sort()
        parts, slots, start = [], [], 0
        for at, quoted, slot in found:
            parts.append(text[start:at])
            slots.append(slot)
            start = at + len(quoted)
        parts.append(text[start:])
        self._formatter, self._pid = formatter, _pid
        self._parts = tuple(parts)
        self._pairs = tuple(zip(slots, parts[1:], strict=True))
        return self._parts


def configure_logging(level: str, fmt: str, *, pid: bool = False) -> None:
    """Send every log record to stderr in ``fmt`` (``json`` or ``text``) from ``level`` up.

    Called again on a config reload: the handler is replaced, never added to.
    """
    handler = LineStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(pid=pid) if fmt == "json" else TextFormatter(pid=pid))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # What no line shows is not gathered for every record (the logging HOWTO's
    # "Optimization"): the caller's file and line, thread and multiprocessing names. Two lines
    # a request (access and audit) make it worth it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # aiohttp's own access log is replaced by ours (with route, decision and user).
    logging.getLogger("aiohttp.access").disabled = True


class _RequestIds:
    """Request ids cut from one draw of ``secrets`` randomness at a time (256 ids per
    draw): one getrandom(2) per request was a twentieth of a 401's CPU (issue 7). Drawn
    again in a forked child (:func:`_forked`), so that a worker never repeats its parent's."""

    _DRAW: Final = 2048  # bytes: 256 ids of 16 hex digits

    def __init__(self) -> None:
        self._text = ""
        self._at = 0

    def next(self) -> str:
        at = self._at
        if at >= len(self._text):
            self._text, at = secrets.token_hex(self._DRAW), 0
        self._at = at + 16
        return self._text[at:at + 16]

    def forget(self) -> None:
        self._text, self._at = "", 0


_request_ids: Final = _RequestIds()
# This process's id for the log lines: os.getpid() is a system call, and it ran for every
# line (issue 7); renewed, with the request ids, in a forked child.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()
    _request_ids.forget()


os.register_at_fork(after_in_child=_forked)


def new_request_id() -> str:
    """16 hex digits (64 bits) from the system's CSPRNG, each from bytes of its own."""
    return _request_ids.next()


def request_id(sent: str | None, *, trusted: bool) -> str:
    """The id of one request: the ``X-Request-Id`` a trusted proxy sent when it is a safe
    id, so the ingress's log, ours and the app's share it; else a fresh one. A client that is
    not a trusted proxy never chooses its id (it could otherwise make its requests look like
    someone else's in the logs)."""
    if sent is not None and trusted and _SAFE_REQUEST_ID.fullmatch(sent):
        return sent
    return new_request_id()


def short_hash(secret: str | bytes) -> str:
    """A short, non-reversible label for a session id or token, safe to log."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# What was decided about one request
# ---------------------------------------------------------------------------------------------

# The decisions the audit log records (the others are no access decision), and the message
# of their line: "access denied" is what an operator greps for.
AUDITED: Final = {
    "allowed": "access allowed",
    "denied": "access denied",
    "login_redirect": "sign-in needed: sent to the provider",
    "unauthenticated_401": "sign-in needed: answered 401",
    "public": "public access",
}


@dataclass(slots=True)
class Outcome:
    """The access decision on one request, for its access line, audit line and metrics.

    Filled in where the policy is applied (:meth:`record`); ``decision`` stays None for the
    gateway's own endpoints and for requests that end before any decision (errors).
    """

    decision: str | None = None
    reason: str = "-"
    rule: str | None = None
    user: str | None = None
    # How the user was authenticated: "session" (cookie) or "bearer" (API token); None when
    # nobody was. Logged, never the credential itself.
    auth: str | None = None

    def record(self, auth: str, access: Access) -> None:
        """Note what ``policy.authorize`` answered on a route whose ``auth`` is given.

        ``login_needed`` is noted as ``login_needed``; the caller's answer (302 or 401) says
        which of ``login_redirect`` and ``unauthenticated_401`` it became.
        """
        decided = access.decision
        if decided is not None:
            self.reason = decided.reason
            self.rule = str(decided.rule) if decided.rule is not None else None
        if access.login_needed:
            self.decision, self.reason = "login_needed", "no session"
        elif not access.forward:
            self.decision = "denied"
        elif auth == "public":
            self.decision, self.reason = "public", "public route"
        elif access.identity is None:
            self.decision, self.reason = "public", "optional route, no session"
        else:
            self.decision = "allowed"
            if decided is None:
                self.reason = "optional route, signed in"

    def final(self, status: int, *, own_endpoint: bool) -> str:
        """The ``decision`` label once the answer's status is known."""
        if self.decision == "login_needed":
            return "login_redirect" if status == 302 else "unauthenticated_401"
        if self.decision is None:
            return "endpoint" if own_endpoint else "error"
        return self.decision


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class _PendingCount:
    """Requests of one label set counted since the last flush."""

    __slots__ = ("child", "count")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.count = 0

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self.child.inc(count)


class _PendingHistogram:
    """Observations of one histogram child since the last flush, by bucket.

    prometheus-client has no public way to add many observations at once, so the flush adds
    to the child's bucket and sum values as its own ``observe()`` does (one value per bucket,
    not cumulative; the exposition adds them up). ``tests/unit/test_metrics_tally.py``
    checks the result against prometheus-client's own per-observation updates.
    """

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= seconds (the last one is +Inf).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        buckets = self.child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        total, self.total = self.total, 0.0
        self.child._sum.inc(total)


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (one per process).

    One instance outlives config reloads, so counters keep counting across them.
    ``multiprocess_dir``: the directory the workers of ``server.workers`` share; when set,
    :meth:`render` adds up every worker's samples found there.
    """

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        registry = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "oidc_gateway_requests",
            "Requests answered, by route (or own endpoint), status class and access decision",
            ["route", "status", "decision"], registry=registry,
        )
        self.request_duration = Histogram(
            "oidc_gateway_request_duration_seconds",
            "Time from a request's arrival until its answer is complete, by route",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.upstream_duration = Histogram(
            "oidc_gateway_upstream_duration_seconds",
            "Time from sending a request to the upstream until its response headers, by route",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "oidc_gateway_requests_in_flight", "Requests being answered now",
            registry=registry, multiprocess_mode="livesum",
        )
        self.logins = Counter(
            "oidc_gateway_logins", "Completed (ok) and failed logins at the callback",
            ["result"], registry=registry,
        )
        self.logouts = Counter(
            "oidc_gateway_logouts", "Sign-outs that ended a session (ok) or could not (failed)",
            ["result"], registry=registry,
        )
        self.refreshes = Counter(
            "oidc_gateway_refreshes", "Token refreshes at the provider, by result",
            ["result"], registry=registry,
        )
        self.store_duration = Histogram(
            "oidc_gateway_session_store_duration_seconds",
            "Session store operations, by operation (errors included)",
            ["operation"], buckets=_STORE_BUCKETS, registry=registry,
        )
        self.store_errors = Counter(
            "oidc_gateway_session_store_errors",
            "Session store operations that failed (each one a 503 or a degraded answer)",
            ["operation"], registry=registry,
        )
        self.provider_ready = Gauge(
            "oidc_gateway_provider_ready",
            "1 when the provider's metadata and keys are loaded (every worker: the lowest)",
            registry=registry, multiprocess_mode="livemin",
        )
        self.draining = Gauge(
            "oidc_gateway_draining", "1 from SIGTERM on, while in-flight requests finish",
            registry=registry, multiprocess_mode="livemax",
        )
        self.session_cache = Counter(
            "oidc_gateway_session_cache",
            "Session reads served from this process's cache (hit) or from the store (miss)",
            ["result"], registry=registry,
        )
        self.session_cache_live = Gauge(
            "oidc_gateway_session_cache_live",
            "1 while the session cache's invalidation channel is confirmed alive and the "
            "cache is used; 0 while every session read goes to the store (every worker: "
            "the lowest)",
            registry=registry, multiprocess_mode="livemin",
        )
        self.config_reloads = Counter(
            "oidc_gateway_config_reloads", "Config reloads (SIGHUP or file change), by result",
            ["result"], registry=registry,
        )
        self.config_reload_ok = Gauge(
            "oidc_gateway_config_last_reload_successful",
            "0 while the config file on disk is invalid and the previous config is served",
            registry=registry, multiprocess_mode="livemin",
        )
        self.config_loaded_at = Gauge(
            "oidc_gateway_config_last_reload_success_timestamp_seconds",
            "When the config being served was loaded (Unix time)",
            registry=registry, multiprocess_mode="livemax",
        )
        build = Gauge(
            "oidc_gateway_build_info", "The running version (always 1)", ["version"],
            registry=registry, multiprocess_mode="max",
        )
        build.labels(__version__).set(1)
        self.config_reload_ok.set(1)
        self.config_loaded_at.set(time.time())
        # Every series that can be known up front starts at 0, so rate() and alerts work from
        # the first scrape instead of from the first failure.
        for result in ("ok", "failed"):
            self.logins.labels(result)
            self.logouts.labels(result)
            self.refreshes.labels(result)
            self.config_reloads.labels(result)
        self.store_timers = {op: self.store_duration.labels(op) for op in _STORE_OPERATIONS}
        self.store_failures = {op: self.store_errors.labels(op) for op in _STORE_OPERATIONS}
        # Per-request observations wait here until flush() (see observe_request).
        self._counts: dict[tuple[str, int, str], _PendingCount] = {}
        self._durations: dict[str, _PendingHistogram] = {}
        self._upstream: dict[str, _PendingHistogram] = {}
        # Requests being answered now: a plain count, set on the gauge by flush().
        self.answering = 0
        # Session cache hits (one per signed-in request): counted like the requests.
        self.cache_hits = _PendingCount(self.session_cache.labels("hit"))

    def observe_request(self, route: str, status: int, decision: str, seconds: float) -> None:
        """Count one answered request. ``route`` is a configured route's name or an own
        endpoint's path, so the label values stay as few as the config makes them.

        Kept in plain numbers until :meth:`flush`, which the scrape itself calls and the
        server every second (issue 7): prometheus-client's own updates take a lock each, and
        with ``server.workers`` > 1 a ``getpid()`` and a write to a shared memory map each,
        four to five of them for every request. A scrape thus counts every request its own
        process has answered, and another worker's up to a second late.
        """
        key = (route, status // 100, decision)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = _PendingCount(
                self.requests.labels(route, f"{key[1]}xx", decision))
        count.count += 1
        histogram = self._durations.get(route)
        if histogram is None:
            histogram = self._pending(self._durations, self.request_duration, route)
        histogram.add(seconds)

    def observe_upstream(self, route: str, seconds: float) -> None:
        histogram = self._upstream.get(route)
        if histogram is None:
            histogram = self._pending(self._upstream, self.upstream_duration, route)
        histogram.add(seconds)

    @staticmethod
    def _pending(
        table: dict[str, _PendingHistogram], family: Histogram, route: str
    ) -> _PendingHistogram:
        """The pending observations of ``family``'s child for ``route``, made on first use."""
        histogram = table[route] = _PendingHistogram(family.labels(route))
        return histogram

    def flush(self) -> None:
        """Hand what :meth:`observe_request`, :meth:`observe_upstream` and
        :attr:`cache_hits` kept to the metrics, and set the in-flight gauge from
        :attr:`answering`."""
        for count in self._counts.values():
            count.flush()
        for histogram in self._durations.values():
            histogram.flush()
        for histogram in self._upstream.values():
            histogram.flush()
        self.cache_hits.flush()
        self.in_flight.set(self.answering)

    def render(self) -> bytes:
        self.flush()
        if self.multiprocess_dir:
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------
# The session store, timed
# ---------------------------------------------------------------------------------------------


_T = TypeVar("_T")


class _Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl: float) -> None: ...
    async def set_new(self, key: str, value: bytes, ttl: float) -> bool: ...
    async def set_new_indexed(
        self, key: str, value: bytes, ttl: float, index: Sequence[IndexEntry]
    ) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def pop(self, key: str) -> bytes | None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class MeteredStore:
    """A session store that times every operation and counts the failed ones.

    A wrapper rather than code in each store: the memory and Redis stores (and any future one)
    are measured alike, and the stores stay free of Prometheus. Anything else asked of it
    goes to the wrapped store unmeasured.
    """

    def __init__(self, inner: _Store, metrics: Metrics) -> None:
        self.inner = inner
        self._timers = metrics.store_timers
        self._failures = metrics.store_failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _timed(self, op: str, call: Awaitable[_T]) -> _T:
        """Await ``call``, timed as the store operation ``op`` and counted when it fails."""
        started = time.perf_counter()
        try:
            return await call
        except Exception:
            self._failures[op].inc()
            raise
        finally:
            self._timers[op].observe(time.perf_counter() - started)

    async def get(self, key: str) -> bytes | None:
        return await self._timed("get", self.inner.get(key))

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._timed("set", self.inner.set(key, value, ttl))

    async def set_new(self, key: str, value: bytes, ttl: float) -> bool:
        return await self._timed("set_new", self.inner.set_new(key, value, ttl))

    async def set_new_indexed(
        self, key: str, value: bytes, ttl: float, index: Sequence[IndexEntry]
    ) -> bool:
        # Timed and counted as a set_new: the index entries ride in its round trip.
        return await self._timed("set_new", self.inner.set_new_indexed(key, value, ttl, index))

    async def delete(self, key: str) -> None:
        await self._timed("delete", self.inner.delete(key))

    async def pop(self, key: str) -> bytes | None:
        return await self._timed("pop", self.inner.pop(key))

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()

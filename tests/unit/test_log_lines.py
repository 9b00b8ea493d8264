"""The fast path for access and audit lines writes exactly what the logging module would."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.observability import JsonFormatter, LineStreamHandler, log_info


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    handler = LineStreamHandler(out)
    handler.setFormatter(JsonFormatter(pid=True))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


FIELDS = {"request_id": "abc", "status": 200, "user": "alice", "client_ip": None,
          "duration_ms": 1.25, "note": "naïve \"quoted\"\nline"}


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_the_fast_line_equals_the_standard_one_but_for_the_time(stream: io.StringIO) -> None:
    # pytest adds its own capture handlers to the root once a test runs: take them out again,
    # so that the set-up is the gateway's alone, as in a gateway process.
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, LineStreamHandler)]
    logging.getLogger("gateway")  # the parent the gateway's own loggers have
    logger = logging.getLogger("gateway.audit")
    logger.info("access allowed", extra=FIELDS)
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    logging.setLogRecordFactory(counting)
    try:
        log_info(logger, "access allowed", dict(FIELDS))
    finally:
        logging.setLogRecordFactory(factory)
    assert made == []  # the fast path: no LogRecord at all
    standard, fast = lines(stream)
    assert isinstance(standard.pop("time"), str)
    assert isinstance(fast.pop("time"), str)
    assert fast == standard
    assert list(fast) == list(standard)  # same key order: the lines diff cleanly
    assert len(stream.getvalue().splitlines()) == 2  # one line each, the newline escaped


def test_a_logger_below_info_writes_nothing(stream: io.StringIO) -> None:
    logger = logging.getLogger("gateway.quiet-test")
    logger.setLevel(logging.WARNING)
    try:
        log_info(logger, "request", dict(FIELDS))
    finally:
        logger.setLevel(logging.NOTSET)
    assert stream.getvalue() == ""


def test_any_other_logging_set_up_takes_the_standard_path(stream: io.StringIO) -> None:
    """A filter someone added (e.g. to redact) must still see every line."""
    seen: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    logger = logging.getLogger("gateway.access")
    logger.addFilter(keep)
    try:
        log_info(logger, "request", dict(FIELDS))
    finally:
        logger.removeFilter(keep)
    assert len(seen) == 1
    assert lines(stream)[0]["user"] == "alice"


class Opaque:
    def __str__(self) -> str:
        return "opaque-value"


def test_every_value_makes_one_line_of_json(stream: io.StringIO) -> None:
    """Whatever a field holds, the line is one valid JSON line: controls escaped (no forged
    next line), non-ASCII text kept, integers beyond 64 bits and unknown objects written
    (the first by the standard encoder, the second as text)."""
    logger = logging.getLogger("gateway.audit")
    odd = {"user": "Jörg\r\n{\"level\":\"error\"}\x1b[31m\u2028", "big": 2**70,
           "thing": Opaque(), "keys": {1: "one"}, "nan": float("nan")}
    for name, value in odd.items():
        log_info(logger, "odd", {name: value})
    written = stream.getvalue().splitlines()
    assert len(written) == len(odd)
    parsed = [json.loads(line) for line in written]
    assert parsed[0]["user"] == odd["user"]
    assert "\r" not in written[0]
    assert "\x1b" not in written[0]
    assert parsed[1]["big"] == 2**70
    assert parsed[2]["thing"] == "opaque-value"
    assert parsed[3]["keys"] == {"1": "one"}
    assert parsed[4]["nan"] is None  # not the bare NaN that is no JSON


def _gateway_handlers_only() -> None:
    """Take pytest's capture handlers off the root, as in a gateway process: log_info then
    takes its fast path."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, LineStreamHandler)]


def test_each_line_has_its_own_message_time_and_pid(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head of a line (level, logger, message, pid) is encoded once per message and
    process: lines of two messages, and lines after the process id changed (a fork), each
    carry their own."""
    _gateway_handlers_only()
    audit, access = logging.getLogger("gateway.audit"), logging.getLogger("gateway.access")
    log_info(audit, "access allowed", {"status": 200})
    log_info(access, "request", {"status": 404})
    monkeypatch.setattr("gateway.observability.os.getpid", lambda: 424242)
    log_info(audit, "access allowed", {"status": 201})
    first, second, third = lines(stream)
    assert (first["logger"], first["msg"], first["status"]) == (
        "gateway.audit", "access allowed", 200)
    assert (second["logger"], second["msg"], second["status"]) == (
        "gateway.access", "request", 404)
    assert third["pid"] == 424242 != first["pid"]
    assert list(first) == ["time", "level", "logger", "msg", "pid", "status"]
    assert all(isinstance(line["time"], str) and line["time"].endswith("Z")
               for line in (first, second, third))


def test_a_field_named_like_the_head_replaces_it_once(stream: io.StringIO) -> None:
    """A field called ``msg``, ``level``, ``time``, ``logger`` or ``pid`` replaces the head's
    value, as it always did: one key each, never two (a reader would take either)."""
    _gateway_handlers_only()
    logger = logging.getLogger("gateway.audit")
    log_info(logger, "access allowed", {"msg": "from a field", "level": "custom", "user": "a"})
    written = stream.getvalue()
    assert written.count('"msg"') == 1
    assert written.count('"level"') == 1
    (line,) = lines(stream)
    assert (line["msg"], line["level"], line["user"]) == ("from a field", "custom", "a")


def test_a_line_without_fields_is_its_head(stream: io.StringIO) -> None:
    _gateway_handlers_only()
    log_info(logging.getLogger("gateway.audit"), "bare", {})
    (line,) = lines(stream)
    assert list(line) == ["time", "level", "logger", "msg", "pid"]
    assert line["msg"] == "bare"

"""The fast path for access and audit lines writes exactly what the logging module would."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.observability import (
    JsonFormatter,
    LineStreamHandler,
    LineTemplate,
    log_info,
    new_request_id,
)


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
    monkeypatch.setattr("gateway.observability._pid", 424242)
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


# --------------------------------------------------------------------- LineTemplate

VARIABLES = ("request_id", "duration_ms")


def _with(values: tuple[object, ...]) -> dict[str, object]:
    return {**FIELDS, **dict(zip(VARIABLES, values, strict=True))}


@pytest.mark.parametrize("values", [
    ("0123456789abcdef", 0.02), ("trace:1/2=3@x", 0.0), ("id", 1234.5),
    ("Jörg\u2028\r\n\"", 12), (None, None),
])
def test_a_template_writes_the_line_log_info_writes(
    stream: io.StringIO, values: tuple[object, ...]
) -> None:
    """Byte for byte, but for the time: the fields in the same order, the same escapes
    (quotes, controls, the line separators some readers break on), whatever the values."""
    _gateway_handlers_only()
    logger = logging.getLogger("gateway.audit")
    template = LineTemplate(logger, "access allowed", dict(FIELDS), VARIABLES)
    made = template.line(*values)
    assert made is not None
    handler, line = made
    assert handler is logging.getLogger().handlers[0]
    log_info(logger, "access allowed", _with(values))
    (standard,) = stream.getvalue().splitlines()
    cut = len('{"time":"2026-01-31T12:00:00.123Z"')
    assert line[cut:] == standard[cut:]
    assert json.loads(line)["time"].endswith("Z")
    assert "\n" not in line
    assert "\u2028" not in line


def test_each_line_of_a_template_has_its_own_time(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    _gateway_handlers_only()
    template = LineTemplate(logging.getLogger("gateway.audit"), "m", dict(FIELDS), VARIABLES)
    monkeypatch.setattr("gateway.observability.time.time", lambda: 1_800_000_000.25)
    first = template.line("a", 1.0)
    monkeypatch.setattr("gateway.observability.time.time", lambda: 1_800_000_061.5)
    second = template.line("b", 2.0)
    assert first is not None
    assert second is not None
    assert json.loads(first[1])["time"] == "2027-01-15T08:00:00.250Z"
    assert json.loads(second[1])["time"] == "2027-01-15T08:01:01.500Z"


def test_a_template_follows_a_new_formatter_and_a_new_process(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reload (configure_logging: a new formatter, pid on or off) or a fork, the
    lines are those of the formatter and process writing them."""
    _gateway_handlers_only()
    template = LineTemplate(logging.getLogger("gateway.audit"), "m", {"a": 1}, ("b",))
    first = template.line(2)
    assert first is not None
    assert "pid" in json.loads(first[1])
    monkeypatch.setattr("gateway.observability._pid", 424242)
    forked = template.line(2)
    assert forked is not None
    assert json.loads(forked[1])["pid"] == 424242
    logging.getLogger().handlers[0].setFormatter(JsonFormatter(pid=False))
    plain = template.line(3)
    assert plain is not None
    assert list(json.loads(plain[1])) == ["time", "level", "logger", "msg", "a", "b"]


def test_a_template_whose_marker_shows_in_a_field_logs_the_standard_way(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The constant parts are cut at random markers: should a field hold one (it cannot be
    guessed, but still), the line is written at once the standard way, never cut wrong."""
    _gateway_handlers_only()
    monkeypatch.setattr("gateway.observability.secrets.token_hex", lambda n: "f" * 2 * n)
    fields = {"path": "f" * 32 + "0", "user": "u"}
    template = LineTemplate(logging.getLogger("gateway.audit"), "m", fields, ("request_id",))
    assert template.line("rid") is None
    (line,) = lines(stream)
    assert (line["path"], line["request_id"]) == (fields["path"], "rid")
    made: list[int] = []

    def drawn(n: int) -> str:
        made.append(n)
        return "f" * 2 * n

    monkeypatch.setattr("gateway.observability.secrets.token_hex", drawn)
    assert template.line("again") is None
    assert made == []  # not cut again for every line
    assert lines(stream)[1]["request_id"] == "again"


def test_a_template_under_another_set_up_or_level_logs_the_standard_way(
    stream: io.StringIO,
) -> None:
    """A test's log capture or an operator's filter sees every line, at once; a level above
    INFO writes none."""
    seen: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    logger = logging.getLogger("gateway.access")
    template = LineTemplate(logger, "request", dict(FIELDS), VARIABLES)
    logger.addFilter(keep)
    try:
        assert template.line("rid", 0.5) is None
    finally:
        logger.removeFilter(keep)
    assert [(r.request_id, r.duration_ms) for r in seen] == [("rid", 0.5)]  # type: ignore[attr-defined]
    assert lines(stream)[0]["request_id"] == "rid"
    logger.setLevel(logging.WARNING)
    try:
        assert template.line("quiet", 0.5) is None
    finally:
        logger.setLevel(logging.NOTSET)
    assert len(lines(stream)) == 1


def test_lines_written_together_are_one_line_each(stream: io.StringIO) -> None:
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, LineStreamHandler)
    handler.emit_lines(['{"a":1}', '{"b":2}'])
    assert stream.getvalue() == '{"a":1}\n{"b":2}\n'


def test_request_ids_are_fresh_across_draws_and_in_a_forked_child() -> None:
    """Ids are cut from one draw of randomness at a time (observability._RequestIds): none
    repeats across draws, and a forked worker never hands out its parent's next ids."""
    ids = [new_request_id() for _ in range(1000)]  # about four draws
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, "".join(new_request_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = "".join(new_request_id() for _ in range(4))
    assert len(child) == 64
    assert child != parent


def test_a_forked_child_writes_its_own_pid(stream: io.StringIO) -> None:
    """The pid of the log lines is kept, not asked of the system per line: a forked worker's
    lines, standard and from a template made in the parent, carry the worker's pid."""
    _gateway_handlers_only()
    audit = logging.getLogger("gateway.audit")
    template = LineTemplate(audit, "m", {"a": 1}, ("b",))
    parent = template.line(1)
    assert parent is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        made = template.line(2)
        formatter = logging.getLogger().handlers[0].formatter
        assert isinstance(formatter, JsonFormatter)
        standard = formatter.format_fields("gateway.audit", "m", {"a": 1})
        os.write(write, ((made[1] if made else "") + "\n" + standard).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        from_template, standard = pipe.read().split("\n")
    assert json.loads(parent[1])["pid"] == os.getpid()
    assert json.loads(from_template)["pid"] == pid
    assert json.loads(standard)["pid"] == pid

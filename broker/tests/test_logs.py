"""Log lines: text by default, JSON on request; component, stream and partition; no line breaks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from flux_broker import logs

#: A text line: time, level, component, optional [stream/partition], message.
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"(?P<component>\S+)(?: \[(?P<where>[^\]]*)\])?: (?P<message>.*)$"
)
UNTRUSTED = "evil\nline\r\x1b[31m\x00\x85\u2028\u2029end"


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of the broker's package that reaches only the handler under test."""
    log = logging.getLogger("flux_broker.streams.partition.test")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    log.handlers.clear()
    log.propagate = True


def capture(log: logging.Logger, log_format: logs.LogFormat) -> io.StringIO:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.formatter(log_format))
    log.handlers = [handler]
    return out


def test_text_lines_name_the_component_and_escape_control_characters(
    logger: logging.Logger,
) -> None:
    out = capture(logger, logs.LogFormat.TEXT)
    logger.warning("inbox %s refused", UNTRUSTED)
    logger.info("about a partition", extra=logs.partition_fields("orders", 3))
    logger.info("about a stream", extra=logs.partition_fields("orders"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    first, second, third = (TEXT_LINE.match(line) for line in lines)
    assert first is not None, lines
    assert second is not None, lines
    assert third is not None, lines
    assert first["component"] == "streams.partition.test"
    assert first["where"] is None
    assert first["message"] == f"inbox {repr(UNTRUSTED)[1:-1]} refused"
    assert second["where"] == "orders/3"
    assert third["where"] == "orders"


def test_json_lines_carry_time_level_component_stream_partition_message(
    logger: logging.Logger,
) -> None:
    out = capture(logger, logs.LogFormat.JSON)
    logger.warning("inbox %s refused", UNTRUSTED, extra=logs.partition_fields("orders", 3))
    logger.info("plain")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["level"] == "warning"
    assert first["component"] == "streams.partition.test"
    assert (first["stream"], first["partition"]) == ("orders", 3)
    assert first["message"] == f"inbox {UNTRUSTED} refused"
    assert list(second) == ["time", "level", "component", "message"]


def test_a_traceback_stays_inside_its_json_line(logger: logging.Logger) -> None:
    out = capture(logger, logs.LogFormat.JSON)
    try:
        raise ValueError(UNTRUSTED)
    except ValueError:
        logger.exception("failed")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "failed"
    assert "ValueError" in record["exception"]
    assert UNTRUSTED in record["exception"]


async def test_the_partition_context_reaches_threads_and_tasks(logger: logging.Logger) -> None:
    out = capture(logger, logs.LogFormat.JSON)

    async def later() -> None:
        await asyncio.sleep(0)
        logger.info("from a task")

    with logs.partition_context("s", 1):
        await asyncio.to_thread(logger.info, "from a thread")
        task = asyncio.create_task(later())
        logger.info("overridden", extra=logs.partition_fields("t", 2))
    await task
    logger.info("outside")
    where = {
        line["message"]: (line.get("stream"), line.get("partition"))
        for line in map(json.loads, out.getvalue().splitlines())
    }
    assert where == {
        "from a thread": ("s", 1),
        "from a task": ("s", 1),
        "overridden": ("t", 2),
        "outside": (None, None),
    }


async def test_in_partition_context_marks_a_gathered_coroutine(logger: logging.Logger) -> None:
    out = capture(logger, logs.LogFormat.JSON)

    async def work(n: int) -> int:
        logger.info("work %d", n)
        return n

    results = await asyncio.gather(*(logs.in_partition_context("s", n, work(n)) for n in (0, 1)))
    assert results == [0, 1]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted((line["message"], line["partition"]) for line in lines) == [
        ("work 0", 0),
        ("work 1", 1),
    ]


@pytest.mark.parametrize(
    ("name", "component"),
    [
        ("flux_broker", "broker"),
        ("flux_broker.server", "server"),
        ("flux_broker.log.segment", "log.segment"),
        ("flux_broker.nats.embedded.server", "nats.embedded.server"),
        ("nats.aio.client", "nats.aio.client"),
    ],
)
def test_components_drop_the_package_prefix(name: str, component: str) -> None:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, "m", None, None)
    assert json.loads(logs.JsonFormatter().format(record))["component"] == component


def test_configure_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    level = root.level
    others = list(root.handlers)
    try:
        first = logs.configure(logs.LogFormat.TEXT, logging.INFO, io.StringIO())
        second = logs.configure(logs.LogFormat.JSON, logging.WARNING, io.StringIO())
        assert first not in root.handlers
        assert second in root.handlers
        assert isinstance(second.formatter, logs.JsonFormatter)
        assert all(handler in root.handlers for handler in others)
        assert root.level == logging.WARNING
    finally:
        for handler in [h for h in root.handlers if h not in others]:
            root.removeHandler(handler)
        root.setLevel(level)

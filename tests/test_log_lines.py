"""The process's stderr handler (herder.clients.logs.Stderr): lines written without a LogRecord keep
their order with records logged the usual way, read like the formatters' own, and step aside for a
handler someone else added."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from herder.clients import logs

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def configured() -> Iterator[None]:
    saved = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = saved[0]
    logging.root.setLevel(saved[1])


def _stderr(format: str) -> tuple[logs.Stderr, io.StringIO]:
    logs.configure("info", format)
    handler = logging.root.handlers[0]
    assert isinstance(handler, logs.Stderr)
    stream = io.StringIO()
    handler.setStream(stream)
    return handler, stream


def test_lines_go_out_before_a_later_record_and_at_flush(configured: None) -> None:
    async def write() -> str:
        handler, stream = _stderr("text")
        handler.line("herder.tasks", "first")
        handler.line("herder.tasks", "second")
        assert stream.getvalue() == ""  # held for one write
        logging.getLogger("herder.tasks").warning("third")
        return stream.getvalue()

    text = asyncio.run(write())
    lines = text.splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["first", "second", "third"]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(rf"{stamp} INFO herder.tasks: first", lines[0]), lines[0]
    assert re.fullmatch(rf"{stamp} WARNING herder.tasks: third", lines[2]), lines[2]


def test_lines_held_on_an_event_loop_are_written_within_the_linger(configured: None) -> None:
    async def write() -> str:
        handler, stream = _stderr("text")
        handler.line("herder.tasks", "alone")
        await asyncio.sleep(0.2)
        return stream.getvalue()

    assert asyncio.run(write()).endswith("INFO herder.tasks: alone\n")


def test_json_lines_have_the_formatters_keys_and_the_fields(configured: None) -> None:
    handler, stream = _stderr("json")
    handler.line("herder.tasks", "task x running", {"task_id": "x", "attempt": 1})
    logging.getLogger("herder.tasks").info("by record", extra={"fields": {"task_id": "y"}})
    direct, recorded = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(direct)[:4] == list(recorded)[:4] == ["time", "level", "logger", "message"]
    assert direct["level"] == "info" and direct["task_id"] == "x" and direct["attempt"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", direct["time"])


def test_direct_only_while_the_root_handler_alone_would_see_the_line(configured: None) -> None:
    _stderr("text")
    tasks = logging.getLogger("herder.tasks")
    assert logs.direct(tasks) is logging.root.handlers[0]
    captured = logging.Handler()
    tasks.addHandler(captured)  # as a test's log capture does
    try:
        assert logs.direct(tasks) is None
    finally:
        tasks.removeHandler(captured)
    logging.root.addHandler(captured)
    assert logs.direct(tasks) is None

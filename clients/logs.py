"""How a Herder process logs: to stderr, as text or one JSON object per line, at a chosen level."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"))


def configure(level: str, format: str = "text") -> None:
    """Send the root logger's records to stderr at `level` (debug, info, ...) as text or json."""
    # Neither format shows the caller, thread or process: not looking them up makes every record
    # ~20% cheaper, which counts at info (a line per task state change, herder.server.metrics).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = Stderr(json=format == "json")
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# How long a line waits to go out with others: one write a turn still cost ~5% of a busy coordinator's CPU.
_LINGER = 0.02


class Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """The process's stderr handler, which also takes lines a hot path writes without a LogRecord.

    The coordinator logs a line per task state change, four a task. Through `Logger.info` each costs
    ~7 us (a LogRecord, the formatter, a write and a flush), and on a busy event loop that time came
    back about fourfold as smaller batches downstream: +30% CPU a task. `line` formats the same text
    or JSON itself (~1.5 us) and the lines of 20 ms go out in one write. A record logged the usual
    way writes the pending lines first, so the order on stderr holds; a process killed loses at most
    the last 20 ms of lines.
    """

    def __init__(self, json: bool = False) -> None:
        super().__init__(sys.stderr)
        self.json = json
        self.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
        self._pending: list[str] = []
        self._second = -1
        self._stamp = ""

    def line(self, logger: str, message: str, fields: dict[str, object] | None = None) -> None:
        """Write an INFO line for `logger` as `emit` would (the level already checked by the caller)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = (
                datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
                if self.json
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            )
        millis = int((now - second) * 1000)
        if self.json:
            document: dict[str, object] = {
                "time": f"{self._stamp}.{millis:03d}+00:00",
                "level": "info",
                "logger": logger,
                "message": message,
            }
            if fields:
                document.update(fields)
            text = json.dumps(document, separators=(",", ":"))
        else:
            text = f"{self._stamp},{millis:03d} INFO {logger}: {message}"
        self._pending.append(text)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_later(_LINGER, self.flush)
            except RuntimeError:  # no event loop in this thread: nothing would come back to write it
                self.flush()
        elif len(self._pending) >= 1024:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                pending, self._pending = self._pending, []
                self.stream.write("\n".join(pending) + "\n")
            super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self.flush()
        super().emit(record)


def direct(logger: logging.Logger) -> Stderr | None:
    """The Stderr handler that `logger`'s INFO records would reach and nothing else would, or None
    (a handler or filter added, as by a test's log capture): then log the usual way."""
    root = logging.root
    if logger.handlers or logger.filters or root.filters or len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    if type(handler) is not Stderr or handler.filters or handler.level > logging.INFO:
        return None
    parent = logger.parent
    while parent is not None and parent is not root:
        if parent.handlers or parent.filters or not parent.propagate:
            return None
        parent = parent.parent
    return handler


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """Stderr for the `herder` logger while the application has configured no logging (the logger
    does not propagate meanwhile). Once the root logger has a handler it steps aside: it restores
    the logger's level and propagation and hands the record to the root logger, if its level lets
    it through, so no line is shown twice or against the application's level."""

    set_level = False

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        if not root.handlers:
            super().emit(record)
            return
        herder = logging.getLogger("herder")
        herder.removeHandler(self)
        if self.set_level:
            herder.setLevel(logging.NOTSET)
        herder.propagate = True
        if record.levelno >= root.getEffectiveLevel():
            root.handle(record)


def show_when_unconfigured() -> None:
    """Show the `herder` logger's INFO lines on stderr when neither it nor the root logger has a
    handler (Python's last resort shows only warnings), so a Worker says when it connects,
    reconnects and stops without the user configuring logging. Does nothing otherwise."""
    herder = logging.getLogger("herder")
    if herder.handlers or logging.getLogger().handlers:
        return
    handler = _UntilConfigured(sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.set_level = herder.level == logging.NOTSET  # a level the application chose stays
    herder.addHandler(handler)
    herder.propagate = False
    if handler.set_level:
        herder.setLevel(logging.INFO)

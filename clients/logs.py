"""How a Herder process logs: to stderr, as text or one JSON object per line, at a chosen level."""

from __future__ import annotations

import json
import logging
import sys
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


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

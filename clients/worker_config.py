"""The [worker] settings: what a Worker process reads from HERDER_* variables and the config file.

`Worker.from_config()` builds a Worker from them; `python -m herder.clients.examples` and
`herder worker` resolve them with their flags first (see herder.clients.settings for the order).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from herder.clients.endpoints import DEFAULT_ADDRESS, address_setting
from herder.clients.engine import WorkerSettings
from herder.clients.resources import MAX_INTERVAL, MIN_INTERVAL
from herder.clients.settings import Setting, Settings, integer, log_settings, resolve, seconds, text

_DEFAULTS = WorkerSettings()


SETTINGS: list[Setting] = [
    Setting("coordinator", address_setting, DEFAULT_ADDRESS, "coordinator replicas, HOST:PORT[,...]", metavar="ADDR"),
    Setting("worker_id", text, "", "worker id (default host-pid-random)", metavar="ID"),
    Setting("slots", integer(1), 8, "tasks run at once", metavar="N"),
    Setting(
        "shutdown_grace",
        seconds(0),
        _DEFAULTS.shutdown_grace,
        "seconds running tasks may finish after SIGINT/SIGTERM before they are cancelled",
        metavar="S",
    ),
    Setting(
        "connect_timeout",
        seconds(0, above=True),
        _DEFAULTS.connect_timeout,
        "seconds for registering task types and for the coordinator's welcome",
        metavar="S",
    ),
    Setting(
        "resource_interval",
        seconds(MIN_INTERVAL, MAX_INTERVAL),
        _DEFAULTS.resource_interval,
        f"seconds between resource samples sent with heartbeats, {MIN_INTERVAL:g} to {MAX_INTERVAL:g}",
        metavar="S",
    ),
    *log_settings(),
]


def worker_settings(flags: Mapping[str, Any] | None = None, *, config_file: str | None = None) -> Settings:
    """The [worker] settings: `flags` (text, None when not given), HERDER_*, the file, defaults.

    Raises SettingsError naming a bad setting and its source.
    """
    return resolve("worker", SETTINGS, flags, config_file=config_file)


def worker_arguments(settings: Settings) -> dict[str, Any]:
    """Worker(...)'s keyword arguments (address included) from resolved [worker] settings."""
    return {
        "address": settings["coordinator"],
        "worker_id": settings["worker_id"] or None,
        "slots": settings["slots"],
        "settings": WorkerSettings(
            shutdown_grace=settings["shutdown_grace"],
            connect_timeout=settings["connect_timeout"],
            resource_interval=settings["resource_interval"],
        ),
    }

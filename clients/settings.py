"""Settings of every Herder command, from a flag, a HERDER_* variable or a TOML file, in that order.

One rule: a command declares each setting once (a `Setting`) and `resolve` takes its value from
the first of: the command-line flag, the environment variable, the command's table in the config
file (`--config PATH` or HERDER_CONFIG), the default. Every value remembers where it came from,
so `herder config show` can say so and an error names the setting and its source. Any bad value,
an unknown key in the command's table or an unknown table is a `SettingsError` before anything
starts. A secret's value is never shown: `***` in tables and errors alike.

The file holds one table per command; keys are the settings' names (`herder config show
COMMAND` lists them):

    [coordinator]
    etcd = "10.0.0.1:2379,10.0.0.2:2379"
    heartbeat_timeout = 10

    [supervisor]
    slots = 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from herder.clients.metrics_setup import parse_address

FILE_ENV = "HERDER_CONFIG"
FILE_FLAG = "--config"
# The tables a config file may have: one per command.
COMMANDS = ("coordinator", "supervisor", "worker", "cli")
MASK = "***"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class SettingsError(ValueError):
    """A bad setting; the message names it and where its value came from, never a secret's value."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting of a command.

    `parse` turns text (a flag's, a variable's, or a file value written as text) into the value,
    raising ValueError saying what is wrong. The flag is --NAME-WITH-DASHES and the variable
    HERDER_NAME unless given; None means there is none (a password has no flag: flags show in `ps`).
    A `switch` is a flag without a value; a `repeated` setting is a list: the flag repeats, the
    variable is comma-separated and the file value an array. A `structured` setting lives in the
    file only (an array of tables, say): `parse` gets the TOML value as it is, and what it returns
    is shown item by item with str().
    """

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    flag: str | None = ""
    env: str | None = ""
    in_file: bool = True
    secret: bool = False
    switch: bool = False
    repeated: bool = False
    structured: bool = False
    metavar: str | None = None

    @property
    def flag_name(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.flag == "" else self.flag

    @property
    def env_name(self) -> str | None:
        return "HERDER_" + self.name.upper() if self.env == "" else self.env


@dataclass(frozen=True, slots=True)
class Value:
    """A setting's effective value and where it came from ("flag --slots", "env HERDER_SLOTS", ...)."""

    setting: Setting
    value: Any
    source: str

    @property
    def shown(self) -> str:
        """The value as `config show` prints it: secrets that are set become ***."""
        if self.setting.secret and self.value not in (None, "", [], ()):
            return MASK
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        if isinstance(self.value, list | tuple):
            return ",".join(str(v) for v in self.value)
        return "" if self.value is None else str(self.value)


class Settings(Mapping[str, Any]):
    """A command's resolved settings: `settings["slots"]` is the value, `where("slots")` says its source."""

    def __init__(self, command: str, values: Mapping[str, Value], file: str | None) -> None:
        self.command = command
        self.resolved = dict(values)
        self.file = file

    def __getitem__(self, name: str) -> Any:
        return self.resolved[name].value

    def __iter__(self) -> Iterator[str]:
        return iter(self.resolved)

    def __len__(self) -> int:
        return len(self.resolved)

    def where(self, name: str) -> str:
        """ "slots (env HERDER_SLOTS)": how an error names a setting."""
        return f"{name} ({self.resolved[name].source})"

    def rows(self) -> list[tuple[str, str, str]]:
        """(setting, value as shown, source) for every setting, in declaration order."""
        return [(name, v.shown, v.source) for name, v in self.resolved.items()]


def add_flags(parser: argparse.ArgumentParser, settings: Sequence[Setting], *, absent: Any = None) -> None:
    """Add --config and each setting's flag; a flag not given is `absent` (None), so a variable or file can fill it."""
    parser.add_argument(
        FILE_FLAG, dest="config_file", metavar="PATH", default=absent, help=f"TOML config file (env {FILE_ENV})"
    )
    for setting in settings:
        if setting.flag_name is None:
            continue
        where = f" (env {setting.env_name})" if setting.env_name else ""
        shown = Value(setting, setting.default, "default").shown
        default = f"; default {shown}" if setting.default not in (None, "", [], (), False) else ""
        help_text = f"{setting.help}{where}{default}"
        if setting.switch:
            parser.add_argument(
                setting.flag_name, dest=setting.name, action="store_const", const="true", default=absent, help=help_text
            )
        else:
            parser.add_argument(
                setting.flag_name,
                dest=setting.name,
                action="append" if setting.repeated else "store",
                default=absent,
                metavar=setting.metavar or setting.name.upper(),
                help=help_text,
            )


def resolve(
    command: str,
    settings: Sequence[Setting],
    flags: argparse.Namespace | Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Each setting's value from its flag, variable, the file's [command] table or its default.

    `flags` holds what the flags gave (None: not given); the file is `config_file`, else the
    namespace's --config, else HERDER_CONFIG. Raises SettingsError naming every bad setting.
    """
    environ = os.environ if environ is None else environ
    given = dict(vars(flags) if isinstance(flags, argparse.Namespace) else (flags or {}))
    path = config_file or given.get("config_file") or environ.get(FILE_ENV) or None
    named_by = "argument" if config_file else "flag --config" if given.get("config_file") else f"env {FILE_ENV}"
    table, problems = _file_table(command, settings, path, named_by)
    values: dict[str, Value] = {}
    for setting in settings:
        try:
            values[setting.name] = _resolve_one(setting, given.get(setting.name), environ, table, path, command)
        except SettingsError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError("; ".join(problems))
    return Settings(command, values, path)


def _resolve_one(
    setting: Setting, flag: Any, environ: Mapping[str, str], table: Mapping[str, Any], path: str | None, command: str
) -> Value:
    if flag is not None and setting.flag_name:
        texts = list(flag) if setting.repeated else [flag]
        return Value(setting, _parse(setting, texts, f"flag {setting.flag_name}"), f"flag {setting.flag_name}")
    env_value = environ.get(setting.env_name) if setting.env_name else None
    if env_value is not None and (env_value != "" or not setting.repeated):
        source = f"env {setting.env_name}"
        texts = [t.strip() for t in env_value.split(",") if t.strip()] if setting.repeated else [env_value]
        return Value(setting, _parse(setting, texts, source), source)
    if setting.name in table:
        source = f"file {path} [{command}] {setting.name}"
        raw = table[setting.name]
        if setting.structured:
            try:
                return Value(setting, setting.parse(raw), source)
            except ValueError as exc:
                raise SettingsError(f"{setting.name} ({source}): {exc}") from None
        try:
            if setting.repeated and not isinstance(raw, list):
                raise ValueError("must be an array")
            texts = [_text(item) for item in raw] if setting.repeated else [_text(raw)]
        except ValueError as exc:
            raise SettingsError(f"{setting.name} ({source}): {exc}") from None
        return Value(setting, _parse(setting, texts, source), source)
    return Value(setting, setting.default, "default")


def _parse(setting: Setting, texts: list[str], source: str) -> Any:
    parsed, problems = [], []
    for text in texts:
        try:
            parsed.append(setting.parse(text))
        except ValueError as exc:
            problems.append("bad value (not shown: a secret)" if setting.secret else str(exc))
    if problems:  # every bad item of a list at once, not one per try
        raise SettingsError(f"{setting.name} ({source}): {'; '.join(problems)}")
    return parsed if setting.repeated else parsed[0]


def _text(raw: Any) -> str:
    """A TOML value as the text a flag would give (true, 4, 0.5, "x")."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float | str):
        return str(raw)
    raise ValueError(f"must be a string, number or boolean, not a TOML {type(raw).__name__}")


def _file_table(
    command: str, settings: Sequence[Setting], path: str | None, named_by: str
) -> tuple[dict[str, Any], list[str]]:
    """The [command] table of the file at `path` ({} without a file), and problems with the file."""
    if not path:
        return {}, []
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except OSError as exc:
        raise SettingsError(f"config file {path} ({named_by}): cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} ({named_by}): not valid TOML: {exc}") from None
    problems = []
    for key, value in document.items():
        if key not in COMMANDS or not isinstance(value, dict):
            problems.append(f"config file {path}: unknown table or key {key!r} (tables: {', '.join(COMMANDS)})")
    table = document.get(command, {})
    if not isinstance(table, dict):
        return {}, problems
    known = {s.name for s in settings if s.in_file}
    for key in table:
        if key not in known:
            problems.append(f"config file {path} [{command}]: unknown setting {key!r}")
    return {k: v for k, v in table.items() if k in known}, problems


# --- parsers: text to value, ValueError saying what is wrong ---


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"not a whole number: {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"must be {_bounds(low, high)}, got {value}")
        return value

    return parse


def seconds(low: float = 0.0, high: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """A number of seconds >= low (> low when `above`) and <= high."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"not a number of seconds: {text!r}") from None
        too_low = value <= low if above else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            floor = f"more than {low:g}" if above else f"at least {low:g}"
            ceiling = f" and at most {high:g}" if high is not None else ""
            raise ValueError(f"must be {floor}{ceiling} seconds, got {text.strip()}")
        return value

    return parse


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not true or false: {text!r}")


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return value

    return parse


def text(value: str) -> str:
    """Any text, surrounding spaces removed."""
    return value.strip()


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def log_settings() -> list[Setting]:
    """--log-level and --log-format, the same for every long-running command."""
    return [
        Setting("log_level", choice(*LOG_LEVELS), "info", f"log level: {', '.join(LOG_LEVELS)}", metavar="LEVEL"),
        Setting(
            "log_format",
            choice(*LOG_FORMATS),
            "text",
            "log lines as text, or one JSON object per line",
            metavar="FORMAT",
        ),
    ]


def metrics_setting() -> Setting:
    """--metrics ADDR: the Prometheus scrape endpoint of a long-running command (off when empty)."""
    return Setting(
        "metrics",
        parse_address,
        "",
        "serve Prometheus metrics at HOST:PORT, e.g. 127.0.0.1:9464 (default: off)",
        metavar="ADDR",
    )


# --- a command's start: flags, resolution, `--show-config`, one-line errors ---


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2 (not a usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def load(
    prog: str,
    command: str,
    settings: Sequence[Setting],
    argv: Sequence[str] | None,
    *,
    description: str,
    check: Callable[[Settings], list[str]] | None = None,
) -> Settings:
    """A command's settings from argv, the environment and the config file, checked by `check`.

    Exits 2 with one line naming every bad setting. With --show-config it prints the settings
    (secrets masked) and exits: 0, or 2 after the table when `check` finds problems.
    """
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False)
    add_flags(parser, settings)
    parser.add_argument(
        "--show-config",
        nargs="?",
        const="table",
        choices=("table", "json"),
        help="print each setting's effective value and source (secrets masked) and exit",
    )
    args = parser.parse_args(argv)
    try:
        resolved = resolve(command, settings, args)
    except SettingsError as exc:
        parser.error(str(exc))
    problems = check(resolved) if check is not None else []
    if args.show_config:
        print(render(resolved, args.show_config), flush=True)
        if not problems:
            parser.exit(0)
    if problems:
        parser.error("; ".join(problems))
    return resolved


def render(settings: Settings, output: str = "table") -> str:
    """`config show`'s output: aligned columns setting, value, source; or a JSON document."""
    rows = settings.rows()
    if output == "json":
        document = {
            "command": settings.command,
            "file": settings.file,
            "settings": [{"name": n, "value": v, "source": s} for n, v, s in rows],
        }
        return json.dumps(document, indent=2)
    rows = [("SETTING", "VALUE", "SOURCE"), *rows]
    name_width = max(len(r[0]) for r in rows)
    value_width = min(max(len(r[1]) for r in rows), 40)
    return "\n".join(f"{n:<{name_width}}  {v:<{value_width}}  {s}" for n, v, s in rows)

"""`herder config show [coordinator|supervisor|worker|cli] [--json] [FLAGS...]`: the settings a
command would start with, each with its source, secrets masked.

The coordinator and the supervisor resolve their own: this process is replaced by theirs, run
with --show-config, so what is shown is exactly what they would use (and the CLI never imports
herder.server). The worker's and the CLI's are resolved here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from herder.clients.settings import OneLineParser, Setting, SettingsError, add_flags, render, resolve
from herder.clients.worker_config import SETTINGS as WORKER_SETTINGS

USAGE = "usage: herder config show [coordinator|supervisor|worker|cli] [--json] [FLAGS...]"
# The program that resolves each command's settings itself (None: resolved here).
PROGRAMS = {"coordinator": "herder.server", "supervisor": "herder.supervisor", "worker": None, "cli": None}


def show_config(
    argv: Sequence[str], cli_settings: Sequence[Setting], cli_given: Mapping[str, Any], config_file: str | None
) -> int:
    """Print the settings `argv` (what follows `herder config`) asks for; returns the exit code.

    `cli_given` holds the CLI's global options given before `config` (None when not given) and
    `config_file` its --config. Raises SettingsError for bad usage or a bad setting.
    """
    rest = list(argv)
    if rest[:1] != ["show"]:
        raise SettingsError(USAGE)
    target = rest[1] if len(rest) > 1 and rest[1] in PROGRAMS else "cli"
    rest = rest[2:] if len(rest) > 1 and rest[1] == target else rest[1:]
    output = "json" if "--json" in rest else "table"
    rest = [a for a in rest if a != "--json"]
    if config_file is not None and not any(a == "--config" or a.startswith("--config=") for a in rest):
        rest = ["--config", config_file, *rest]
    module = PROGRAMS[target]
    if module is not None:
        os.execv(sys.executable, [sys.executable, "-m", module, "--show-config", output, *rest])
    declared = cli_settings if target == "cli" else WORKER_SETTINGS
    parser = OneLineParser(prog=f"herder config show {target}", allow_abbrev=False)
    add_flags(parser, declared)
    flags = parser.parse_args(rest)
    if target == "cli":
        # Global options given before `config` are flags too.
        for name, value in cli_given.items():
            if getattr(flags, name, None) is None:
                setattr(flags, name, value)
    print(render(resolve(target, declared, flags), output))
    return 0

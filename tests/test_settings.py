"""The settings loader in-process: list-valued and switch settings, secrets in errors, file problems."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from herder.clients.settings import MASK, Setting, SettingsError, add_flags, boolean, integer, resolve, text

pytestmark = pytest.mark.timeout(10)

SETTINGS = [
    Setting("alert", text, [], "repeatable NAME.FIELD=VALUE", repeated=True),
    Setting("verbose", boolean, False, "a switch", switch=True),
    Setting("token", integer(1), 0, "a secret", flag=None, in_file=False, secret=True),
]


def _resolve(argv: list[str], env: dict[str, str] | None = None, file: str = "") -> dict[str, tuple[object, str]]:
    parser = argparse.ArgumentParser()
    add_flags(parser, SETTINGS)
    settings = resolve("supervisor", SETTINGS, parser.parse_args(argv), environ=env or {}, config_file=file or None)
    return {name: (settings[name], value.source) for name, value in settings.resolved.items()}


def test_a_repeated_setting_is_a_list_from_each_source(tmp_path: Path) -> None:
    config = tmp_path / "herder.toml"
    config.write_text('[supervisor]\nalert = ["a.b=1", "c.d=2"]\n')
    assert _resolve(["--alert", "x=1", "--alert", "y=2"])["alert"] == (["x=1", "y=2"], "flag --alert")
    assert _resolve([], {"HERDER_ALERT": "x=1, y=2"})["alert"] == (["x=1", "y=2"], "env HERDER_ALERT")
    assert _resolve([], file=str(config))["alert"][0] == ["a.b=1", "c.d=2"]
    assert _resolve([])["alert"] == ([], "default")


def test_a_switch_takes_no_value_and_its_variable_is_a_boolean() -> None:
    assert _resolve(["--verbose"])["verbose"] == (True, "flag --verbose")
    assert _resolve([], {"HERDER_VERBOSE": "yes"})["verbose"] == (True, "env HERDER_VERBOSE")
    with pytest.raises(SettingsError, match=r"verbose \(env HERDER_VERBOSE\): not true or false"):
        _resolve([], {"HERDER_VERBOSE": "maybe"})


def test_a_bad_secret_is_named_but_its_value_is_not_repeated() -> None:
    with pytest.raises(SettingsError) as caught:
        _resolve([], {"HERDER_TOKEN": "hunter2"})
    assert "token (env HERDER_TOKEN)" in str(caught.value) and "hunter2" not in str(caught.value)


def test_a_secret_has_no_flag_and_no_file_key(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, SETTINGS)
    assert "--token" not in parser.format_help()
    config = tmp_path / "herder.toml"
    config.write_text("[supervisor]\ntoken = 5\n")
    with pytest.raises(SettingsError, match="unknown setting 'token'"):
        _resolve([], file=str(config))


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "herder.toml"
    config.write_text("[supervisr]\nalert = []\n")
    with pytest.raises(SettingsError, match=r"unknown table or key 'supervisr'"):
        _resolve([], file=str(config))
    config.write_text("[supervisor\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        _resolve([], file=str(config))
    with pytest.raises(SettingsError, match=r"config file .*missing.toml \(argument\): cannot read it"):
        _resolve([], file=str(tmp_path / "missing.toml"))
    config.write_text("[supervisor]\nverbose = [true]\nalert = 1\n")
    with pytest.raises(SettingsError) as caught:
        _resolve([], file=str(config))
    assert "alert (file" in str(caught.value) and "must be an array" in str(caught.value)
    assert "verbose (file" in str(caught.value) and "not a TOML list" in str(caught.value)


def test_a_masked_value_is_shown_as_stars() -> None:
    settings = resolve("supervisor", SETTINGS, None, environ={"HERDER_TOKEN": "7"})
    assert ("token", MASK, "env HERDER_TOKEN") in settings.rows()


def _names(raw: object) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(t, dict) and "name" in t for t in raw):
        raise ValueError("must be tables with a name")
    return [str(t["name"]) for t in raw]


def test_a_structured_setting_gets_the_toml_value_from_the_file_only(tmp_path: Path) -> None:
    declared = [Setting("kinds", _names, [], "tables", flag=None, env=None, structured=True)]
    config = tmp_path / "herder.toml"
    config.write_text('[[coordinator.kinds]]\nname = "a"\n[[coordinator.kinds]]\nname = "b"\n')
    settings = resolve("coordinator", declared, {}, environ={"HERDER_KINDS": "x"}, config_file=str(config))
    assert settings["kinds"] == ["a", "b"] and settings.where("kinds") == f"kinds (file {config} [coordinator] kinds)"
    config.write_text('[coordinator]\nkinds = "a"\n')
    with pytest.raises(SettingsError, match=r"^kinds \(file .*\[coordinator\] kinds\): must be tables with a name$"):
        resolve("coordinator", declared, {}, environ={}, config_file=str(config))

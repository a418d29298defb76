"""Configuration as the programs see it: flag beats HERDER_* beats the config file beats the default,
a secret is never shown, and a bad value is one line naming the setting and its source (exit 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import HERDER
from _cluster import Coordinator
from _helpers import echo_spec, echo_stub, get

from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.settings import MASK
from herder.clients.worker import Worker

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parent.parent / "README.md"


def _herder(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`herder ARGS` without the developer's HERDER_* variables, with `env` added."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    return subprocess.run(
        [HERDER, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=30, check=False, cwd=cwd
    )


def _shown(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """`herder config show ARGS --json` as {setting: {"value": ..., "source": ...}}."""
    done = _herder("config", "show", *args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json.loads(done.stdout)["settings"]}


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default(tmp_path: Path) -> None:
    config = tmp_path / "herder.toml"
    config.write_text('[supervisor]\nslots = 5\nshutdown_grace = 11\nresource_interval = 2\nhandler = "h:1"\n')
    env = {"HERDER_SLOTS": "6", "HERDER_SHUTDOWN_GRACE": "12", "HERDER_CONFIG": str(config)}
    shown = _shown("supervisor", "--slots", "7", env=env)
    assert shown["slots"] == {"name": "slots", "value": "7", "source": "flag --slots"}
    assert shown["shutdown_grace"]["value"] == "12.0"
    assert shown["shutdown_grace"]["source"] == "env HERDER_SHUTDOWN_GRACE"
    assert shown["resource_interval"]["value"] == "2.0"
    assert shown["resource_interval"]["source"] == f"file {config} [supervisor] resource_interval"
    assert shown["disk_path"] == {"name": "disk_path", "value": ".", "source": "default"}


def test_the_cli_reads_its_own_table_and_flags_before_the_command_count(tmp_path: Path) -> None:
    config = tmp_path / "herder.toml"
    config.write_text('[cli]\noutput = "json"\nrpc_timeout = 3\n')
    shown = _shown("cli", env={"HERDER_CONFIG": str(config), "HERDER_COORDINATOR": "10.0.0.9:7"})
    assert (shown["output"]["value"], shown["output"]["source"]) == ("json", f"file {config} [cli] output")
    assert shown["coordinator"]["source"] == "env HERDER_COORDINATOR"
    done = _herder("--output", "table", "config", "show", "--json", env={"HERDER_CONFIG": str(config)})
    assert {r["name"]: r["source"] for r in json.loads(done.stdout)["settings"]}["output"] == "flag --output"


def test_config_show_masks_the_etcd_password() -> None:
    password = "s3cret-Pa55word"
    done = _herder("config", "show", "coordinator", "--etcd-user", "root", env={"HERDER_ETCD_PASSWORD": password})
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("etcd_password ")]
    assert row.split()[1:] == [MASK, "env", "HERDER_ETCD_PASSWORD"]


def _one_line(done: subprocess.CompletedProcess[str], prog: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_a_bad_value_is_one_line_naming_the_setting_and_its_source(source: str, tmp_path: Path) -> None:
    config = tmp_path / "herder.toml"
    config.write_text('[supervisor]\nslots = "many"\n' if source == "file" else "")
    args = ["supervisor", "--handler", "127.0.0.1:1", "--config", str(config)]
    env = {"HERDER_SLOTS": "many"} if source == "env" else {}
    if source == "flag":
        args += ["--slots", "many"]
    line = _one_line(_herder(*args, env=env), "herder supervisor")
    where = {"flag": "flag --slots", "env": "env HERDER_SLOTS", "file": f"file {config} [supervisor] slots"}[source]
    assert f"slots ({where}): not a whole number: 'many'" in line


def test_an_unknown_key_in_the_file_is_an_error_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "herder.toml"
    config.write_text("[coordinator]\nheartbeat_timout = 3\n")
    # The etcd named does not exist: the error must come before any connection is tried.
    line = _one_line(_herder("coordinator", "--config", str(config), "--etcd", "127.0.0.1:1"), "herder coordinator")
    assert "unknown setting 'heartbeat_timout'" in line and str(config) in line


def test_a_bad_secret_is_named_without_its_value(tmp_path: Path) -> None:
    line = _one_line(
        _herder("coordinator", "--etcd-password-file", str(tmp_path / "missing"), "--etcd-user", "root"),
        "herder coordinator",
    )
    assert "etcd_password_file (flag --etcd-password-file): cannot read it" in line


def test_worker_from_config_reads_the_environment_then_the_worker_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "herder.toml"
    config.write_text('[worker]\nworker_id = "from-file"\nslots = 2\ncoordinator = "127.0.0.1:7"\n')
    monkeypatch.setenv("HERDER_CONFIG", str(config))
    monkeypatch.setenv("HERDER_SLOTS", "3")
    monkeypatch.delenv("HERDER_COORDINATOR", raising=False)
    worker = Worker.from_config()
    assert worker.worker_id == "from-file"
    assert worker.slots == 3
    monkeypatch.setenv("HERDER_SLOTS", "0")
    with pytest.raises(ValueError, match=r"slots \(env HERDER_SLOTS\): must be at least 1"):
        Worker.from_config()


def _readme_config() -> str:
    section = README.read_text().split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.parametrize("command", ["coordinator", "supervisor", "worker", "cli"])
def test_the_readme_example_file_loads(command: str, tmp_path: Path) -> None:
    password = tmp_path / "etcd-password"
    password.write_text("not shown\n")
    config = tmp_path / "herder.toml"
    config.write_text(_readme_config().replace("/run/secrets/etcd-password", str(password)))
    shown = _shown(command, "--config", str(config))
    assert any(row["source"].startswith(f"file {config} [{command}]") for row in shown.values())


async def test_a_small_commit_batch_still_stores_a_big_submission(etcd: EmbeddedEtcd, namespace: str) -> None:
    node = Coordinator(etcd.endpoint, namespace, extra_args=["--commit-max-ops", "16", "--commit-timeout", "5"])
    try:
        node.start()
        async with echo_stub(node.address) as stub:
            reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=[echo_spec(f"t{i}") for i in range(50)]))
            assert all(result.created for result in reply.results) and len(reply.results) == 50
            stored = await get(stub, reply.results[-1].task.id)
            assert stored.id == reply.results[-1].task.id
    finally:
        node.kill()
        node.log_path.unlink(missing_ok=True)


@pytest.mark.parametrize("module", ["herder.server", "herder.supervisor"])
def test_help_describes_every_flag_with_its_variable_and_default(module: str) -> None:
    settings = __import__(f"{module}.__main__", fromlist=["SETTINGS"]).SETTINGS
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    # argparse wraps lines: compare with single spaces.
    text = " ".join(done.stdout.split())
    for setting in settings:
        if setting.flag_name is None:
            continue
        start = text.index(f" {setting.flag_name} ", text.index("options:"))
        entry = text[start : start + 600]
        assert setting.help.split()[0] in entry, setting.name
        if setting.env_name:
            assert f"env {setting.env_name}" in entry, setting.name
        if setting.default not in (None, "", [], (), False, 0):
            assert "; default " in entry, setting.name
    assert "default ('" not in text  # a list default reads as a flag value would, not as a Python tuple

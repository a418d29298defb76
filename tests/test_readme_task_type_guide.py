"""The README's "Your own task type" guide, run as written against a test coordinator: generate
code, register the type before any worker, run the worker, submit from Python, the CLI and grpcurl."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cluster import Coordinator

from herder.clients.client import SyncClient
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
GREETER = REPO / "examples" / "greeter"
README = (REPO / "README.md").read_text()
_START = README.index("## Your own task type\n")
GUIDE = README[_START : README.index("\n## ", _START + 1)]
# Where the guide's commands say the coordinator is.
GUIDE_ADDRESS = "127.0.0.1:50051"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE, re.S)


def _python_block(containing: str) -> str:
    [block] = [b for b in _blocks("python") if containing in b]
    return block


def test_the_example_files_are_the_guides_blocks() -> None:
    [proto] = _blocks("proto")
    assert proto == (GREETER / "protos" / "greeter" / "v1" / "greeter.proto").read_text()
    assert _python_block("run_worker(worker)") == (GREETER / "worker.py").read_text()
    assert _python_block('GreetRequest(name="Ada")') == (GREETER / "submit.py").read_text()


def test_the_guide_runs_as_written(coordinator: Coordinator, tmp_path: Path) -> None:
    # A copy, so the generated code and the files it writes stay out of the repository.
    def generated(directory: str, names: list[str]) -> set[str]:  # from a run of the guide in the repository
        return {"__pycache__"} | ({"greeter"} if Path(directory) == GREETER else set())

    shutil.copytree(GREETER, tmp_path / "examples" / "greeter", ignore=generated)
    generate_and_register, run_and_submit = _blocks("sh")
    sdk = _python_block("register_task_type")
    script = "\n".join(
        [
            "set -e",
            generate_and_register,
            "python - <<'PYTHON'",
            sdk + "PYTHON",
            "herder types",
            run_and_submit,
        ]
    ).replace(GUIDE_ADDRESS, coordinator.address)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}", "HERDER_COORDINATOR": coordinator.address}
    log = tmp_path / "guide.log"
    with open(log, "wb") as out:
        shell = subprocess.Popen(
            ["bash", "-c", script], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        code = shell.wait(timeout=90)
        assert code == 0, log.read_text()
        with SyncClient(coordinator.address) as client:
            # Grace's task, submitted before any worker, and grpcurl's run too.
            deadline = time.monotonic() + 30
            while {t.state for t in client.list(type="greeter.greet")[0]} != {task_pb2.TASK_STATE_SUCCEEDED}:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert len(client.list(type="greeter.greet")[0]) == 4
    finally:
        # The worker the guide left running in the background.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
    text = log.read_text()
    assert "registered task type greeter.greet" in text and "QUEUED" in text
    assert "Hello, Ada!" in text and "Hello, Linus!" in text and '"created": true' in text


def test_the_guides_config_file_declares_the_type(etcd: EmbeddedEtcd, namespace: str, tmp_path: Path) -> None:
    [declaration] = [b for b in _blocks("toml") if "coordinator.task_types" in b]
    # Its proto_path is relative to the working directory, the repository's root in the guide.
    config = tmp_path / "herder.toml"
    config.write_text(declaration.replace('"examples/greeter/protos"', f'"{GREETER / "protos"}"'))
    with (
        Coordinator(etcd.endpoint, namespace, extra_args=["--config", str(config)]) as coordinator,
        SyncClient(coordinator.address) as client,
    ):
        [declared] = [t for t in client.task_types() if t.name == "greeter.greet"]
    assert (declared.input_type, declared.output_type) == ("greeter.v1.GreetRequest", "greeter.v1.Greeting")
    assert declared.description == "say hello"

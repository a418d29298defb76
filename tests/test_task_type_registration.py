"""Task types registered without any worker: `herder types register` from .proto files or a
descriptor set, the SDK, and the coordinator's config file; bad input is one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import run
from _cluster import Coordinator

from herder.clients.client import SyncClient
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2
from herder.clients.proto_sources import compile_protos

pytestmark = pytest.mark.timeout(90)

BIN = Path(sys.executable).parent
REPO = Path(__file__).parent.parent
EXAMPLE_PROTOS = REPO / "protos"
EXAMPLES_FILE = "herder/examples/v1/examples.proto"
# A contract of its own, importing a well-known type (found without any --proto-path for it).
IMAGES_PROTO = """syntax = "proto3";
package images.v1;
import "google/protobuf/duration.proto";
message ResizeRequest { string url = 1; int32 width = 2; google.protobuf.Duration budget = 3; }
message ResizeResult { string url = 1; }
"""


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A proto path holding images/v1/images.proto."""
    (tmp_path / "protos" / "images" / "v1").mkdir(parents=True)
    (tmp_path / "protos" / "images" / "v1" / "images.proto").write_text(IMAGES_PROTO)
    return tmp_path / "protos"


def _register(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> tuple[int, str, str]:
    return run(capsys, "--coordinator", address, "types", "register", *args)


def _wait_state(address: str, task_id: str, state: int, timeout: float) -> None:
    with SyncClient(address) as client:
        deadline = time.monotonic() + timeout
        while (seen := client.get(task_id).state) != state:
            assert time.monotonic() < deadline, f"task {task_id} is {seen}, not {state}, after {timeout}s"
            time.sleep(0.05)


def test_registered_from_proto_files_a_type_queues_tasks_before_any_worker(
    capsys: pytest.CaptureFixture[str], coordinator: Coordinator
) -> None:
    code, out, err = _register(
        capsys, coordinator.address, "examples.echo", "--input", "herder.examples.v1.EchoRequest",
        "--output", "herder.examples.v1.EchoResponse", "--proto-path", str(EXAMPLE_PROTOS), EXAMPLES_FILE,
        "--description", "says it back",
    )  # fmt: skip
    assert code == 0, err
    assert "registered task type examples.echo" in out and "herder.examples.v1.EchoResponse" in out
    code, out, err = run(
        capsys, "--coordinator", coordinator.address, "--output", "json", "submit", "examples.echo",
        "--json", '{"text": "early"}',
    )  # fmt: skip
    assert code == 0, err
    task = json.loads(out)
    assert task["state"] == "TASK_STATE_QUEUED"
    # Now a worker comes up and runs what waited for it.
    worker = subprocess.Popen(
        [str(BIN / "herder"), "worker", "--coordinator", coordinator.address, "--slots", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_state(coordinator.address, task["id"], task_pb2.TASK_STATE_SUCCEEDED, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


def test_json_output_and_well_known_imports(
    capsys: pytest.CaptureFixture[str], coordinator: Coordinator, images: Path
) -> None:
    code, out, err = run(
        capsys, "--coordinator", coordinator.address, "--output", "json", "types", "register", "images.resize",
        "--input", "images.v1.ResizeRequest", "--output", "images.v1.ResizeResult",
        "-I", str(images), str(images / "images" / "v1" / "images.proto"),
    )  # fmt: skip
    assert code == 0, err
    document = json.loads(out)
    assert document["name"] == "images.resize" and document["input_type"] == "images.v1.ResizeRequest"
    assert document["descriptor_files"] == 2  # images.proto and the duration.proto it imports
    code, out, err = run(
        capsys, "--coordinator", coordinator.address, "--output", "json", "submit", "images.resize",
        "--json", '{"url": "a.png", "width": 64, "budget": "2s"}',
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["state"] == "TASK_STATE_QUEUED"


@pytest.mark.parametrize("suffix", ["binpb", "json"])
def test_registered_from_a_buf_descriptor_set(
    capsys: pytest.CaptureFixture[str], coordinator: Coordinator, images: Path, tmp_path: Path, suffix: str
) -> None:
    built = tmp_path / f"images.{suffix}"  # buf picks the format by the extension
    done = subprocess.run(
        [str(BIN / "buf"), "build", str(images), "-o", str(built)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    code, _, err = _register(
        capsys, coordinator.address, "images.resize", "--input", "images.v1.ResizeRequest",
        "--output", "images.v1.ResizeResult", "--descriptor-set", str(built),
    )  # fmt: skip
    assert code == 0, err
    with SyncClient(coordinator.address) as client:
        [task_type] = [t for t in client.task_types() if t.name == "images.resize"]
        assert task_type.output_type == "images.v1.ResizeResult"
        handle = client.submit("images.resize", json={"url": "b.png", "width": 32})
        assert handle.task.state == task_pb2.TASK_STATE_QUEUED


def test_sdk_registers_from_message_classes_and_from_names(coordinator: Coordinator, images: Path) -> None:
    with SyncClient(coordinator.address) as client:
        stored = client.register_task_type("sdk.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        assert stored.input_type == "herder.examples.v1.EchoRequest" and stored.descriptors.file
        client.register_task_type(
            "sdk.resize",
            "images.v1.ResizeRequest",
            "images.v1.ResizeResult",
            descriptors=compile_protos(["images/v1/images.proto"], [str(images)]),
        )
        assert {"sdk.echo", "sdk.resize"} <= {t.name for t in client.task_types()}
        assert client.submit("sdk.resize", json={"width": 1}).task.state == task_pb2.TASK_STATE_QUEUED
        with pytest.raises(TypeError, match="descriptors"):
            client.register_task_type("sdk.bad", "images.v1.ResizeRequest", "images.v1.ResizeResult")


def test_a_type_declared_in_the_config_file_exists_from_the_first_start(
    etcd: EmbeddedEtcd, namespace: str, images: Path, tmp_path: Path
) -> None:
    config = tmp_path / "herder.toml"
    config.write_text(
        f"""
[[coordinator.task_types]]
name = "images.resize"
input = "images.v1.ResizeRequest"
output = "images.v1.ResizeResult"
proto_path = ["{images}"]
protos = ["images/v1/images.proto"]
description = "declared"
"""
    )
    arguments = ["--config", str(config)]
    with Coordinator(etcd.endpoint, namespace, extra_args=arguments) as first, SyncClient(first.address) as client:
        assert not client.nodes()  # no worker anywhere
        [declared] = [t for t in client.task_types() if t.name == "images.resize"]
        assert declared.description == "declared" and declared.input_type == "images.v1.ResizeRequest"
        assert client.submit("images.resize", json={"url": "c"}).task.state == task_pb2.TASK_STATE_QUEUED
    # The next leader (a fresh port: another process may have taken the first) finds the same contract in etcd
    # and writes nothing.
    with Coordinator(etcd.endpoint, namespace, extra_args=arguments) as second, SyncClient(second.address) as client:
        [again] = [t for t in client.task_types() if t.name == "images.resize"]
        assert again.register_time == declared.register_time


def test_a_bad_declaration_stops_the_coordinator_with_one_line(tmp_path: Path, images: Path) -> None:
    config = tmp_path / "herder.toml"
    config.write_text(
        f"""
[[coordinator.task_types]]
name = "images.resize"
input = "images.v1.ResizeRequest"
output = "images.v1.Nope"
proto_path = ["{images}"]
protos = ["images/v1/images.proto"]
"""
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "herder.server", "--config", str(config), "--etcd", "127.0.0.1:1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "task_types[0] 'images.resize'" in done.stderr and "no message 'images.v1.Nope'" in done.stderr
    assert "images.v1.ResizeResult" in done.stderr  # what the files do define
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("syntax", "images.proto:2:"),
        ("message", "no message 'images.v1.Missing'"),
        ("not-a-set", "is not a descriptor set"),
        ("missing-file", "no such file"),
        ("both", "one of the two"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], images: Path, tmp_path: Path, case: str, expected: str
) -> None:
    proto = images / "images" / "v1" / "images.proto"
    output = "images.v1.ResizeResult"
    sources = ["-I", str(images), str(proto)]
    if case == "syntax":
        proto.write_text('syntax = "proto3";\npackage images.v1 oops\n')
    elif case == "message":
        output = "images.v1.Missing"
    elif case == "not-a-set":
        sources = ["--descriptor-set", str(proto)]
    elif case == "missing-file":
        sources = ["-I", str(images), "images/v1/absent.proto"]
    elif case == "both":
        sources = [*sources, "--descriptor-set", str(proto)]
    # Nothing is asked of a coordinator: the address answers nothing.
    code, out, err = run(
        capsys, "--coordinator", "127.0.0.1:1", "types", "register", "images.resize",
        "--input", "images.v1.ResizeRequest", "--output", output, *sources,
    )  # fmt: skip
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("herder: ") and expected in err, err
    assert "Traceback" not in err and out == ""


def test_a_coordinator_refusal_is_one_line(
    capsys: pytest.CaptureFixture[str], coordinator: Coordinator, images: Path
) -> None:
    code, _, err = _register(
        capsys, coordinator.address, "bad name!", "--input", "images.v1.ResizeRequest",
        "--output", "images.v1.ResizeResult", "-I", str(images), "images/v1/images.proto",
    )  # fmt: skip
    assert code == 4, "the coordinator refused it"
    assert err.count("\n") == 1 and "task_type.name" in err, err

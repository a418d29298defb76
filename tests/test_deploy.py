"""The Dockerfile and the Kubernetes manifest say only what the commands accept: every HERDER_*
variable is one the command reads and its value parses, every port a probe or a peer uses is one a
container serves, and the supervisor's handler is the service's listen address."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from herder.clients.settings import FILE_ENV
from herder.server import __main__ as coordinator_main
from herder.supervisor import __main__ as supervisor_main

pytestmark = pytest.mark.timeout(30)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMMANDS = {"coordinator": coordinator_main, "supervisor": supervisor_main}
POD_IP = "10.1.2.3"


def _documents() -> list[dict[str, Any]]:
    with open(DEPLOY / "kubernetes" / "herder.yaml") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def _pod_specs() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in _documents() if "template" in doc["spec"]
    }


def _herder_containers() -> list[dict[str, Any]]:
    found = []
    for spec in _pod_specs().values():
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["image"].startswith("herder") and "command" not in container:
                found.append(container)
    return found


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as Kubernetes sets them: fieldRefs filled in, $(NAME) expanded."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", var
            env[var["name"]] = POD_IP
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], str(var["value"]))
    return env


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _read_variables(module: Any) -> set[str]:
    """The variables the command's declared settings read (herder.clients.settings)."""
    return {setting.env_name for setting in module.SETTINGS if setting.env_name} | {FILE_ENV}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_variable_is_read_by_its_command_and_parses(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (container,) = [c for c in _herder_containers() if c["args"][0] == name]
    module = COMMANDS[name]
    env = {k: v for k, v in _env(container).items() if k.startswith("HERDER_")}
    assert env, "configured through HERDER_* variables"
    unknown = set(env) - _read_variables(module)
    assert not unknown, f"herder {name} reads no {sorted(unknown)}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Parses without a complaint (a bad value exits 2), with the flags the container passes.
    parsed = module.parse_args(container["args"][1:])
    assert parsed is not None


def test_ports_probes_and_the_handler_address_agree() -> None:
    specs = _pod_specs()
    coordinator = specs["herder-coordinator"]["containers"][0]
    coordinator_env = _env(coordinator)
    assert [p["containerPort"] for p in coordinator["ports"]] == [_port(coordinator_env["HERDER_LISTEN"])]
    assert coordinator_env["HERDER_ADVERTISE"] == f"{POD_IP}:{_port(coordinator_env['HERDER_LISTEN'])}"
    for probe in ("livenessProbe", "readinessProbe"):
        assert coordinator[probe]["grpc"]["port"] == _port(coordinator_env["HERDER_LISTEN"])
    assert coordinator["readinessProbe"]["grpc"]["service"] == "herder.v1.CoordinatorService"
    assert coordinator["livenessProbe"]["grpc"]["service"] == ""

    (service,) = [d for d in _documents() if d["kind"] == "Service"]
    assert service["spec"]["clusterIP"] == "None", "headless: the name resolves to every replica"
    assert [p["port"] for p in service["spec"]["ports"]] == [_port(coordinator_env["HERDER_LISTEN"])]

    invoice = specs["invoice"]
    (supervisor,) = invoice["initContainers"]
    assert supervisor["restartPolicy"] == "Always", "a native sidecar"
    supervisor_env = _env(supervisor)
    assert (
        supervisor_env["HERDER_COORDINATOR"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )
    admin = _port(supervisor_env["HERDER_SUPERVISOR_LISTEN"])
    assert [p["containerPort"] for p in supervisor["ports"]] == [admin]
    assert supervisor["readinessProbe"]["grpc"] == {"port": admin, "service": "herder.v1.SupervisorService"}
    assert supervisor["livenessProbe"]["tcpSocket"]["port"] == admin

    (app,) = invoice["containers"]
    listen = app["args"][app["args"].index("--listen") + 1]
    assert _port(listen) == _port(supervisor_env["HERDER_HANDLER"])
    assert [p["containerPort"] for p in app["ports"]] == [_port(listen)]
    assert app["command"][1].startswith("/app/examples/") and (DEPLOY.parent / app["command"][1][5:]).is_file()
    # The pod outlives the supervisor's grace, so running attempts finish on a rollout.
    assert invoice["terminationGracePeriodSeconds"] > float(supervisor_env["HERDER_SHUTDOWN_GRACE"])


def test_the_dockerfile_copies_what_the_package_and_the_manifest_need() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, flags=re.M))
    assert {"clients", "server", "supervisor", "examples"} <= copied
    assert re.search(r'^ENTRYPOINT \["herder"\]', dockerfile, flags=re.M)
    assert re.search(r"^USER (?!root)", dockerfile, flags=re.M)

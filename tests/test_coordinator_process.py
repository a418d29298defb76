"""The coordinator as a program: configuration, clear failures, clean shutdown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from _cluster import Coordinator

from herder.clients.embedded_etcd import EmbeddedEtcd, free_port

pytestmark = pytest.mark.timeout(60)


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    return subprocess.run(
        [sys.executable, "-m", "herder.server", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_unreachable_etcd_is_one_clear_line() -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = _run(["--etcd", dead, "--listen", f"127.0.0.1:{free_port()}"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach etcd" in lines[0] and dead in lines[0], result.stderr


def test_port_in_use_is_one_clear_line(etcd: EmbeddedEtcd) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run(["--etcd", etcd.endpoint, "--listen", f"127.0.0.1:{port}"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_bad_flags_are_usage_errors() -> None:
    result = _run(["--etcd", "nonsense", "--heartbeat-timeout", "0"])
    assert result.returncode == 2
    assert "--etcd" in result.stderr and "Traceback" not in result.stderr


def test_settings_come_from_environment_variables(etcd: EmbeddedEtcd, namespace: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env.update(HERDER_ETCD=etcd.endpoint, HERDER_LISTEN=f"127.0.0.1:{port}", HERDER_NAMESPACE=namespace)
    process = subprocess.Popen(
        [sys.executable, "-m", "herder.server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"listening on 127.0.0.1:{port} (namespace {namespace})" in line
    finally:
        process.terminate()
        process.wait(10)


def test_sigterm_steps_down_at_once_so_a_successor_leads_without_waiting(etcd: EmbeddedEtcd, namespace: str) -> None:
    first = Coordinator(etcd.endpoint, namespace, lease_ttl=30)
    second = Coordinator(etcd.endpoint, namespace, lease_ttl=30)
    with first:
        second.start(wait_leader=False)
        try:
            assert not second.is_leader()
            started = time.monotonic()
            assert first.stop() == 0
            second.wait_leader(timeout=15)
            # Well under the 30 s lease: the leader key was released, not left to expire.
            assert time.monotonic() - started < 15
        finally:
            second.kill()

"""The coordinator against an etcd with authentication on: the right password serves, a wrong or
missing one is one clear line, and the password is never in its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cluster import Coordinator
from _helpers import echo_stub, submit

from herder.clients.embedded_etcd import EmbeddedEtcd, etcd_binary
from herder.server import keys
from herder.server._etcd import Etcd, EtcdCredentials, prefix_end

pytestmark = pytest.mark.timeout(90)

PASSWORD = "Corr3ct-h0rse"


def _etcdctl(endpoint: str, *args: str) -> None:
    etcdctl = str(Path(etcd_binary()).with_name("etcdctl"))
    subprocess.run([etcdctl, f"--endpoints={endpoint}", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EmbeddedEtcd]:
    """An etcd of this module's own, with user root (password PASSWORD) and authentication on."""
    with EmbeddedEtcd(fsync=False) as server:
        _etcdctl(server.endpoint, "user", "add", f"root:{PASSWORD}", "--interactive=false")
        _etcdctl(server.endpoint, "auth", "enable")
        yield server


def _password_file(tmp_path: Path, password: str) -> str:
    path = tmp_path / "etcd-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def _run(etcd: EmbeddedEtcd, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    return subprocess.run(
        [sys.executable, "-m", "herder.server", "--etcd", etcd.endpoint, "--listen", "127.0.0.1:0", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_the_right_password_serves_and_stays_out_of_the_json_log(auth_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    namespace = "auth"
    secret = _password_file(tmp_path, PASSWORD)
    node = Coordinator(
        auth_etcd.endpoint,
        namespace,
        extra_args=[
            *("--etcd-user", "root", "--etcd-password-file", secret),
            *("--log-level", "debug", "--log-format", "json"),
        ],
    )
    try:
        node.start()
        async with echo_stub(node.address) as stub:
            task = await submit(stub, "behind a password")
        etcd = Etcd([auth_etcd.endpoint], credentials=EtcdCredentials("root", PASSWORD))
        await etcd.connect()
        try:
            prefix = keys.prefix(namespace)
            stored, _, _ = await etcd.range(prefix, prefix_end(prefix), keys_only=True)
        finally:
            await etcd.close()
        assert any(task.id.encode() in kv.key for kv in stored), [kv.key for kv in stored]
        # `herder status` still sees etcd's members (their Status answers without a token).
        (member,) = node.status().etcd_members
        assert member.healthy, member.error
    finally:
        node.kill()
    log = node.log_path.read_text()
    assert PASSWORD not in log
    # Logged as one JSON object per line (stdout's "listening on" line and the harness's header aside).
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    node.log_path.unlink()


@pytest.mark.parametrize("credentials", ["wrong", "none"])
def test_a_wrong_or_missing_password_is_one_clear_line(
    credentials: str, auth_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    if credentials == "wrong":
        done = _run(auth_etcd, "--etcd-user", "root", env={"HERDER_ETCD_PASSWORD": "not-" + PASSWORD})
    else:
        done = _run(auth_etcd)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("herder coordinator: ") and auth_etcd.endpoint in lines[0], lines[0]
    assert ("credentials of user 'root'" if credentials == "wrong" else "authentication on and no user") in lines[0]
    assert PASSWORD not in done.stdout + done.stderr

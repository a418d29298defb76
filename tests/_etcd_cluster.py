"""A real three-member etcd cluster on 127.0.0.1 for failover tests: each member its own process group.

    with EtcdCluster(3) as cluster:
        cluster.endpoints          # ["127.0.0.1:p0", "127.0.0.1:p1", "127.0.0.1:p2"]
        cluster.kill(1)            # SIGKILL member 1 (a crash)
        cluster.restart(1)         # same ports and data dir: it rejoins the cluster

Every member started here is killed at teardown, on failure too, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from aetcd import rpc

from herder.clients.embedded_etcd import EtcdStartError, etcd_binary, free_port, wait_for_port

_LIVE: set[EtcdCluster] = set()


class EtcdMemberProcess:
    """One member: fixed client and peer ports and data dir, so a restart rejoins as the same member."""

    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int) -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, initial_cluster: str, token: str, *, fsync: bool = False) -> None:
        client_url = f"http://{self.endpoint}"
        args = [
            etcd_binary(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            f"--initial-cluster-token={token}",
            # Ignored once the data dir exists: a restarted member rejoins with what it stored.
            "--initial-cluster-state=new",
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=10000",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]
        if not fsync:
            # Tests: three members share two loaded cores, and durability across power loss is not tested.
            args.append("--unsafe-no-fsync")
        with open(self.data_dir / "etcd.log", "ab") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.data_dir / "etcd.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class EtcdCluster:
    """`size` etcd members on loopback, started together; `start()` waits until writes commit.
    `fsync=False` (tests) trades durability for speed; the failover benchmark keeps it on."""

    def __init__(self, size: int = 3, *, fsync: bool = False) -> None:
        self.fsync = fsync
        self._root = Path(tempfile.mkdtemp(prefix="herder-etcd-cluster-"))
        self._token = f"herder-{uuid.uuid4().hex[:8]}"
        self.members = [EtcdMemberProcess(f"m{i}", self._root / f"m{i}", free_port(), free_port()) for i in range(size)]
        for member in self.members:
            member.data_dir.mkdir(parents=True)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout: float = 30.0) -> Self:
        _LIVE.add(self)
        try:
            for member in self.members:
                member.start(self.initial_cluster, self._token, fsync=self.fsync)
            for member in self.members:
                wait_for_port("127.0.0.1", member.client_port, timeout, member.process)
            self.wait_writable(timeout)
        except BaseException as exc:
            tails = "\n".join(f"--- {m.name} ---\n{m.log_tail()}" for m in self.members)
            self.close()
            if isinstance(exc, (TimeoutError, EtcdStartError)):
                raise EtcdStartError(f"etcd cluster did not start: {exc}\n{tails}") from exc
            raise
        return self

    def kill(self, index: int) -> None:
        """SIGKILL one member (its data dir stays, so `restart(index)` rejoins it)."""
        self.members[index].kill()

    def freeze(self, index: int) -> None:
        """SIGSTOP one member: it holds its connections but answers nothing."""
        self.members[index].signal(signal.SIGSTOP)

    def thaw(self, index: int) -> None:
        self.members[index].signal(signal.SIGCONT)

    def restart(self, index: int, timeout: float = 20.0) -> None:
        """Start a killed member again on its ports and data dir; waits until it listens."""
        member = self.members[index]
        member.kill()
        member.start(self.initial_cluster, self._token, fsync=self.fsync)
        wait_for_port("127.0.0.1", member.client_port, timeout, member.process)

    def writable(self, endpoint: str | None = None, timeout: float = 1.0) -> bool:
        """True when a put through `endpoint` (any live member when None) commits: the cluster has quorum."""
        targets = [endpoint] if endpoint else [m.endpoint for m in self.members if m.running]
        for target in targets:
            with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(target) as channel:
                rpc.KVStub(channel).Put(rpc.PutRequest(key=b"/herder-test/probe", value=b"1"), timeout=timeout)
                return True
        return False

    def wait_writable(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.writable():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the etcd cluster took no write within {timeout:.0f}s")
            time.sleep(0.1)

    def close(self) -> None:
        """Kill every member and remove the data. Safe to call twice."""
        _LIVE.discard(self)
        for member in self.members:
            member.kill()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    for cluster in list(_LIVE):
        cluster.close()


__all__ = ["EtcdCluster", "EtcdMemberProcess"]

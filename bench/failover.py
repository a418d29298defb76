"""Leader failover under load: how long the cluster has no leader dispatching, and what a failover costs.

Starts a three-member etcd cluster (fsync on), three coordinators (default lease TTL, heartbeat and ack
timeouts) and worker processes that record every execution, keeps tasks flowing (batches through
whoever leads, with idempotency keys), SIGKILLs the leader --kills times (restarting each killed
replica as a follower), then checks every task's outcome in etcd against the execution log:
- failover_median_s, failover_max_s: leader SIGKILL to the first handler start on a new assignment;
- lost: submitted tasks that never SUCCEEDED; doubled: tasks with a (task, attempt) run twice or an
  attempt run after the final one (a second outcome); both must be 0; reexecuted: tasks run more than once;
- rebuild_s_100k: a new leader's rebuild (from its log line) with --rebuild-tasks tasks queued, after
  a clean hand-over; with --profile, where that rebuild's time goes (py-spy, else not measured).
Prints a human summary and, on its last line, the figures as JSON. A measurement, not a test.

    python bench/failover.py [--kills 5] [--workers 2] [--rebuild-tasks 100000] [--lease-ttl 5] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from aetcd import rpc

from herder.clients import errors
from herder.clients.descriptors import task_type_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server import keys
from herder.server._etcd import prefix_end

# The process helpers the failover tests use: an etcd cluster, coordinator processes, a recording worker.
TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from _cluster import Coordinator  # noqa: E402
from _etcd_cluster import EtcdCluster  # noqa: E402

ECHO = "examples.echo"
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
RETRY = task_pb2.RetryPolicy(max_attempts=20)
PY_SPY = "/tmp/py-spy"
PROFILE_RATE = 200  # samples per second


class Flow:
    """Submits `batch` tasks every `interval` seconds to whoever leads, until stopped; remembers every id."""

    def __init__(self, addresses: Sequence[str], prefix: str, batch: int = 20, interval: float = 0.1) -> None:
        self.addresses = list(addresses)
        self.prefix = prefix
        self.batch = batch
        self.interval = interval
        self.ids: set[str] = set()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._leader = self.addresses[0]

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop submitting (after the batch in flight). Safe to call twice."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            specs = [_spec(f"{self.prefix}-{i}") for i in range(n, n + self.batch)]
            # Retried (same idempotency keys) until some leader takes the batch: nothing is dropped.
            while not self._stop.is_set() and not self._submit(specs):
                time.sleep(0.05)
            n += self.batch
            self._stop.wait(self.interval)

    def _submit(self, specs: list[task_pb2.TaskSpec]) -> bool:
        try:
            with grpc.insecure_channel(self._leader) as channel:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                reply = stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs), timeout=5)
        except grpc.RpcError as exc:
            self.errors += 1
            refused = errors.from_rpc_error(exc)
            hint = refused.leader_address if isinstance(refused, errors.NotLeaderError) else ""
            others = [a for a in self.addresses if a != self._leader]
            self._leader = hint or others[self.errors % len(others)]
            return False
        self.ids.update(r.task.id for r in reply.results if r.code == 0)
        return all(r.code == 0 for r in reply.results)


def _spec(key: str) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(type=ECHO, payload_json=json.dumps({"text": key}), idempotency_key=key, retry=RETRY)


def _register(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        contract = task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=contract), timeout=10)


def _leader(nodes: Sequence[Coordinator], timeout: float = 60.0, besides: Coordinator | None = None) -> Coordinator:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if node is not besides and node.running and node.is_leader():
                return node
        time.sleep(0.02)
    raise SystemExit(f"bench: no leader within {timeout:.0f}s")


def _executions(log: Path) -> list[tuple[str, int, float]]:
    if not log.exists():
        return []
    rows = []
    # A line being written as we read is left for the next read.
    for line in log.read_text().split("\n")[:-1]:
        task_id, attempt, _, at = line.split()
        rows.append((task_id, int(attempt), float(at)))
    return rows


def _stored(endpoints: Sequence[str], namespace: str) -> dict[str, task_pb2.Task]:
    prefix = keys.tasks_prefix(keys.prefix(namespace))
    for endpoint in endpoints:
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(endpoint) as channel:
            request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
            reply = rpc.KVStub(channel).Range(request, timeout=30)
            return {t.id: t for t in (task_pb2.Task.FromString(kv.value) for kv in reply.kvs)}
    raise SystemExit("bench: no etcd member answers")


@contextlib.contextmanager
def _workers(
    count: int, log: Path, addresses: Sequence[str], slots: int, work: float, backoff_max: float
) -> Iterator[None]:
    processes = []
    try:
        for i in range(count):
            args = [sys.executable, str(TESTS / "_recording_worker.py"), str(log), ",".join(addresses)]
            args += ["--worker-id", f"bench-{i}", "--slots", str(slots), "--work", str(work)]
            args += ["--backoff-max", str(backoff_max)]
            with open(log.parent / f"worker-{i}.log", "ab") as out:
                processes.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        yield
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _coordinators(cluster: EtcdCluster, namespace: str, count: int, ttl: int) -> list[Coordinator]:
    # The server's default timings, not the tests' short ones.
    nodes = [
        Coordinator(
            cluster.endpoints,
            namespace,
            lease_ttl=ttl,
            heartbeat_interval=1.0,
            heartbeat_timeout=5.0,
            ack_timeout=5.0,
        )
        for _ in range(count)
    ]
    for i, node in enumerate(nodes):
        node.start(wait_leader=i == 0, timeout=60)
    return nodes


def failovers(cluster: EtcdCluster, args: argparse.Namespace, work_dir: Path) -> dict[str, object]:
    namespace = "bench-failover"
    log = work_dir / "executions.log"
    nodes = _coordinators(cluster, namespace, 3, args.lease_ttl)
    try:
        _register(nodes[0].address)
        addresses = [n.address for n in nodes]
        times: list[float] = []
        workers = _workers(args.workers, log, addresses, args.slots, args.work, args.worker_backoff_max)
        with workers, Flow(addresses, "flow") as flow:
            for kill in range(args.kills):
                time.sleep(args.between)
                leader = _leader(nodes)
                killed_at = time.time()
                leader.kill()
                successor = _leader(nodes, besides=leader)
                deadline = time.monotonic() + 60
                while not any(at > killed_at for _, _, at in _executions(log)):
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: no assignment within 60s of the kill")
                    time.sleep(0.01)
                first = min(at for _, _, at in _executions(log) if at > killed_at)
                times.append(first - killed_at)
                print(
                    f"kill {kill + 1}: {successor.address} leads; first new assignment after {times[-1]:.2f}s",
                    flush=True,
                )
                leader.start(wait_leader=False, timeout=60)  # back as a follower, so three stay
            flow.stop()
            submitted = set(flow.ids)
            deadline = time.monotonic() + 120
            while True:
                tasks = _stored(cluster.endpoints, namespace)
                if all(tasks.get(t) is not None and tasks[t].state == SUCCEEDED for t in submitted):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        runs = _executions(log)
    finally:
        for node in nodes:
            node.close()
    lost = sum(1 for t in submitted if t not in tasks or tasks[t].state != SUCCEEDED)
    pairs = Counter((t, a) for t, a, _ in runs)
    doubled = {t for (t, _), n in pairs.items() if n > 1}
    doubled |= {t for t, a, _ in runs if t in tasks and a > tasks[t].attempt}
    per_task = Counter(t for t, _, _ in runs)
    figures: dict[str, object] = {
        "failover_median_s": round(statistics.median(times), 3),
        "failover_max_s": round(max(times), 3),
        "failovers_s": [round(t, 3) for t in times],
        "tasks": len(submitted),
        "lost": lost,
        "doubled": len(doubled),
        "reexecuted": sum(1 for n in per_task.values() if n > 1),
    }
    print(f"failovers: {figures}", flush=True)
    return figures


def rebuild(cluster: EtcdCluster, args: argparse.Namespace, work_dir: Path) -> dict[str, object]:
    """Queue --rebuild-tasks tasks with no workers, then hand leadership over cleanly (SIGTERM revokes
    the lease at once) and read the new leader's rebuild time from its log."""
    namespace = "bench-rebuild"
    nodes = _coordinators(cluster, namespace, 2, args.lease_ttl)
    try:
        old, new = nodes
        _register(old.address)
        started = time.monotonic()
        with grpc.insecure_channel(old.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            for start in range(0, args.rebuild_tasks, 1000):
                specs = [_spec(f"q-{i}") for i in range(start, min(start + 1000, args.rebuild_tasks))]
                stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs), timeout=120)
        print(f"queued {args.rebuild_tasks} tasks in {time.monotonic() - started:.1f}s", flush=True)
        profiler = None
        if args.profile and os.path.exists(PY_SPY) and new.pid is not None:
            out = work_dir / "rebuild.pyspy.txt"
            profiler = subprocess.Popen(
                [
                    PY_SPY,
                    "record",
                    "-p",
                    str(new.pid),
                    "-r",
                    str(PROFILE_RATE),
                    "-f",
                    "raw",
                    "-o",
                    str(out),
                    "-d",
                    "60",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
        old.stop()
        new.wait_leader(60)
        match = None
        deadline = time.monotonic() + 30
        while match is None and time.monotonic() < deadline:
            match = re.search(r"rebuilt (\d+) unfinished tasks from etcd in ([\d.]+)s", new.log_tail(100_000))
            time.sleep(0.1)
        if match is None:
            raise SystemExit("bench: the new leader did not log its rebuild")
        figures: dict[str, object] = {"rebuild_s_100k": float(match.group(2)), "rebuilt_tasks": int(match.group(1))}
        if profiler is not None:
            time.sleep(1.0)
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
            figures["rebuild_profile"] = _top_frames(work_dir / "rebuild.pyspy.txt", PROFILE_RATE)
        print(f"rebuild: {figures}", flush=True)
        return figures
    finally:
        for node in nodes:
            node.close()


def _top_frames(path: Path, rate: int, top: int = 10) -> dict[str, object]:
    """Where the rebuild's CPU went, from py-spy's raw output (collapsed stacks, idle excluded): the CPU
    seconds sampled inside recovery.rebuild or an etcd page read (the read-ahead runs as its own task),
    and each function's inclusive share of them."""
    if not path.exists():
        return {}
    totals: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        start = next(
            (
                i
                for i, f in enumerate(frames)
                if (f.startswith("rebuild (") and "recovery.py" in f) or f.startswith("Etcd.range (")
            ),
            None,
        )
        if start is None:
            continue
        n = int(count)
        samples += n
        # "function (path/file.py:line)" -> "function (file.py)": one entry per function, not per line.
        names = {f"{f.split(' (')[0]} ({f.rsplit('/', 1)[-1].split(':')[0]})" for f in frames[start:]}
        for name in names:
            totals[name] += n
    shares = {name: round(n / samples, 3) for name, n in totals.most_common(top)} if samples else {}
    return {"cpu_s": round(samples / rate, 3), "share": shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--work", type=float, default=0.01, help="seconds each handler takes")
    parser.add_argument(
        "--worker-backoff-max", type=float, default=5.0, help="workers' longest reconnect wait (the SDK's: 5)"
    )
    # Longer than the SDK's backoff.max (5 s), after which a worker's reconnect backoff starts afresh:
    # each failover is then measured on its own, not on top of the previous one's grown backoff.
    parser.add_argument("--between", type=float, default=6.0, help="seconds of flow before each kill")
    parser.add_argument("--lease-ttl", type=int, default=5, help="leader lease TTL (the coordinator's default: 5)")
    parser.add_argument("--rebuild-tasks", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="profile the rebuild with py-spy (/tmp/py-spy)")
    parser.add_argument("--phases", default="failover,rebuild", help="comma-separated: failover, rebuild")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="herder-bench-failover-"))
    try:
        with EtcdCluster(3, fsync=True) as cluster:
            figures: dict[str, object] = {}
            if "failover" in args.phases:
                figures |= failovers(cluster, args, work_dir)
            if "rebuild" in args.phases and args.rebuild_tasks:
                figures |= rebuild(cluster, args, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""What one gRPC hop between two processes costs on this machine, by how long both sat idle before it.

    python bench/hops.py [--calls 1000] [--gaps-ms 0.5,3,10]

A plain grpc.aio server in a child process answers a 100-byte unary call with the time its handler
ran; the client measures client-to-handler (one way, one clock: same machine) and the round trip,
`--calls` times at each idle gap between calls. Nothing of Herder runs: this is the floor under
every hop of a task's path (submitter -> coordinator -> etcd -> coordinator -> worker), and how it
grows when the machine idles between tasks (a virtual CPU that halts takes time to wake; see the
README's Performance section). JSON on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

METHOD = "/bench.Hop/Call"


async def _serve(port_file: str) -> None:
    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return struct.pack("d", time.time())

    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(call)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Hop", {"Call": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with open(port_file, "w") as out:  # noqa: ASYNC230 -- once, before serving
        out.write(str(port))
    await server.wait_for_termination()


def _ms(values: list[float], pct: int) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[pct - 1] * 1000, 3)


async def _measure(port: int, calls: int, gaps: list[float]) -> list[dict[str, float]]:
    results = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        for _ in range(200):  # warm up the connection
            await call(b"x" * 100)
        for gap in gaps:
            one_way, round_trip = [], []
            for _ in range(calls):
                await asyncio.sleep(gap)
                t0 = time.time()
                reply = await call(b"x" * 100)
                t1 = time.time()
                one_way.append(struct.unpack("d", reply)[0] - t0)
                round_trip.append(t1 - t0)
            results.append(
                {
                    "idle_gap_ms": gap * 1000,
                    "client_to_handler_p50_ms": _ms(one_way, 50),
                    "client_to_handler_p99_ms": _ms(one_way, 99),
                    "round_trip_p50_ms": _ms(round_trip, 50),
                }
            )
            shown = results[-1]
            print(
                f"idle {gap * 1000:g} ms between calls: client->handler p50 {shown['client_to_handler_p50_ms']} ms,"
                f" round trip p50 {shown['round_trip_p50_ms']} ms",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls at each gap")
    parser.add_argument("--gaps-ms", default="0.5,3,10", help="idle gaps between calls, in ms, comma-separated")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the child process: write the port here
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    gaps = [float(g) / 1000 for g in args.gaps_ms.split(",") if g.strip()]
    with tempfile.TemporaryDirectory(prefix="herder-hops-") as tmp:
        port_file = Path(tmp) / "port"
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
        try:
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text()):
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("hops: the server process did not start")
                time.sleep(0.05)
            results = asyncio.run(_measure(int(port_file.read_text()), args.calls, gaps))
        finally:
            child.kill()
            child.wait()
    print(json.dumps({"hops": results, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()

"""A lock holder in its own process, for tests: `python _lock_holder.py ADDRESS NAME MODE ...`.

... log FILE HOLDERS   HOLDERS tasks take the lock once each (wait 60 s, ttl 5 s); each appends
                       "token start_ns end_ns" (time.monotonic_ns, inside the lock) to FILE
... hold TTL           take the lock, print its token, then hold it (refreshing) until killed
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from herder.clients import Client


async def log(address: str, name: str, path: str, holders: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    async def one(client: Client) -> None:
        async with client.lock(name, ttl=5, wait=60) as lock:
            start = time.monotonic_ns()
            await asyncio.sleep(0.02)  # a critical section long enough for another holder to overlap it
            end = time.monotonic_ns()
        os.write(fd, f"{lock.token} {start} {end}\n".encode())  # one small O_APPEND write: whole lines

    async with Client(address) as client:
        await asyncio.gather(*(one(client) for _ in range(holders)))
    os.close(fd)


async def hold(address: str, name: str, ttl: float) -> None:
    async with Client(address) as client, client.lock(name, ttl=ttl, wait=30) as lock:
        print(lock.token, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    address, name, mode, *rest = sys.argv[1:]
    if mode == "log":
        asyncio.run(log(address, name, rest[0], int(rest[1])))
    else:
        asyncio.run(hold(address, name, float(rest[0])))

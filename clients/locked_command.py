"""`herder lock NAME -- COMMAND ...`: run a command while holding a lock.

The command gets the fencing token in HERDER_LOCK_TOKEN. The lock is refreshed while it
runs and released when it ends; if the lock is lost, the command is sent SIGTERM (SIGKILL
after a grace period) and LockLostError is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence

from herder.clients.client import Client, Seconds

TOKEN_ENV = "HERDER_LOCK_TOKEN"
# How long a command told to stop (SIGTERM) has before it is killed.
TERMINATE_GRACE = 10.0


async def run_locked(
    client: Client, name: str, command: Sequence[str], *, ttl: Seconds, wait: Seconds, owner: str = ""
) -> int:
    """Run `command` holding lock `name`; its exit code (128 + N when signal N ended it).

    Raises LockHeldError when the lock is not granted within `wait`, LockLostError (after the
    command has stopped) when it is lost, OSError when the command cannot be started.
    """
    async with client.lock(name, ttl=ttl, wait=wait, owner=owner) as lock:
        env = {**os.environ, TOKEN_ENV: str(lock.token)}
        process = await asyncio.create_subprocess_exec(*command, env=env)
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            await _terminate(process)
            raise
        return 128 - code if code < 0 else code


async def _terminate(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), TERMINATE_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


__all__ = ["TERMINATE_GRACE", "TOKEN_ENV", "run_locked"]

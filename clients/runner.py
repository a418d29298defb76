"""Run a coroutine as a program's main loop, on uvloop where it is available.

Profiling the coordinator and workers showed most CPU in the event loop's own
dispatch around gRPC calls; uvloop roughly halves that cost.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Like asyncio.run(main), on a uvloop event loop when uvloop is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# Young-generation collections at 50,000 net allocations instead of 700, and the older ones rarer.
# A busy coordinator allocates (and frees, by reference count) a few hundred objects a task; at the
# default thresholds the collector ran thousands of times a second and rescanned the leader's long-lived
# entries, 19% of its CPU in bench/throughput.py's batches, 0.8% at these. Cyclic garbage waits longer:
# at most tens of thousands of objects, a few MB.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """For a long-running Herder process (the coordinator, the supervisor), not for a library user's:
    keep what exists now (modules, classes) out of every collection, and collect less often."""
    global _tuned
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    _tuned = True


_tuned = False


def freeze_gc() -> None:
    """In a process that called tune_gc, keep every object that exists now out of later collections
    (after a leader's rebuild: its entries live until their tasks finish, and scanning them again and
    again finds nothing). Elsewhere (a test, a library user's process) it does nothing."""
    if _tuned:
        gc.freeze()

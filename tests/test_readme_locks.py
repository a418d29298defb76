"""The README's lock examples, run as written: the SDK snippet and the fencing store."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _cluster import Coordinator

from herder.clients import Client

pytestmark = pytest.mark.timeout(60)

README = (Path(__file__).parent.parent / "README.md").read_text()


def _python_block_after(marker: str) -> str:
    """The first ```python block after `marker` in the README."""
    found = re.search(re.escape(marker) + r".*?```python\n(.*?)```", README, re.S)
    assert found, f"no python block after {marker!r} in the README"
    return found.group(1)


def test_the_fencing_store_refuses_a_stale_token() -> None:
    scope: dict[str, Any] = {}
    exec(_python_block_after("**Fencing.**"), scope)
    store = scope["Store"]()
    store.write(b"a", fencing_token=33)  # holder A
    store.write(b"b", fencing_token=34)  # holder B, after A's lease ran out
    with pytest.raises(PermissionError, match="stale"):
        store.write(b"late a", fencing_token=33)  # A wakes up


async def test_the_sdk_lock_example_runs_as_written(coordinator: Coordinator) -> None:
    snippet = _python_block_after("In Python the lock is refreshed in the background")
    scope: dict[str, Any] = {}
    exec("async def example(client, store, report):\n" + textwrap.indent(snippet, "    "), scope)
    exec(_python_block_after("**Fencing.**"), scope)
    store = scope["Store"]()
    async with Client(coordinator.address) as client:
        await scope["example"](client, store, b"report")
        await scope["example"](client, store, b"report again")
    assert store.highest > 0

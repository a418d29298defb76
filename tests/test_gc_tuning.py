"""The collector settings of Herder's long-running processes (herder.clients.runner.tune_gc), checked
in a fresh interpreter: they are process-wide, and a library user's process keeps its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PROBE = """
import gc, json
from herder.clients import runner
before = gc.get_threshold()
runner.freeze_gc()  # not tuned: nothing frozen
untuned_frozen = gc.get_freeze_count()
runner.tune_gc()
tuned_frozen = gc.get_freeze_count()
keep = [[] for _ in range(1000)]
runner.freeze_gc()
later = gc.get_freeze_count() - tuned_frozen
print(json.dumps([before, untuned_frozen, list(gc.get_threshold()), tuned_frozen, later]))
"""


def test_tune_gc_raises_the_thresholds_and_freezes_what_exists_and_only_then_freeze_gc_freezes() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30, check=True).stdout
    before, untuned_frozen, after, tuned_frozen, frozen_later = json.loads(out)
    assert before == [700, 10, 10] and untuned_frozen == 0
    assert after == [50_000, 20, 20]
    assert tuned_frozen > 1000  # the modules' objects
    assert frozen_later >= 1000  # the lists made after tuning

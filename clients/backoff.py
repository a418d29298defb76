"""Exponential backoff with jitter, for reconnects and retried calls."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before the n-th retry: `initial * multiplier**(n-1)`, capped at `max`, with jitter.

    - `initial`: seconds before the first retry (default 0.1).
    - `multiplier`: each retry waits this many times the previous one (default 2.0, at least 1).
    - `max`: no wait is longer than this many seconds (default 5.0).
    - `jitter`: fraction of the wait, 0..1, randomly added or removed so that many clients
      failing together do not retry together (default 0.2).

    Invalid settings raise ValueError when the object is built.
    """

    initial: float = 0.1
    multiplier: float = 2.0
    max: float = 5.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial < 0:
            raise ValueError(f"Backoff.initial must be >= 0, got {self.initial}")
        if self.multiplier < 1:
            raise ValueError(f"Backoff.multiplier must be >= 1, got {self.multiplier}")
        if self.max < self.initial:
            raise ValueError(f"Backoff.max ({self.max}) must be >= Backoff.initial ({self.initial})")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff.jitter must be within 0..1, got {self.jitter}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1 for the first retry); never more than `max`.

        Raises ValueError when `attempt` is below 1. `rng` makes the jitter reproducible in tests.
        """
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        try:
            base = min(self.max, self.initial * self.multiplier ** (attempt - 1))
        except OverflowError:  # a very long outage: the cap applies long before the float overflows
            base = self.max
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return min(self.max, max(0.0, base * (1.0 + spread)))


__all__ = ["Backoff"]

"""TEMPORARY (replaced by the fixes branch's helper at merge)."""
from __future__ import annotations

import random
from typing import Callable


class Backoff:
    def __init__(self, first: float = 0.05, cap: float = 2.0,
                 jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.5)) -> None:
        self.first, self.cap, self.jitter = first, cap, jitter
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def next_delay(self) -> float:
        delay = self.delay * self.jitter()
        self.delay = min(self.delay * 2, self.cap)
        return delay

"""Where the time goes: named stopwatches summed over a run (train, evaluation, data, ...)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Iterator


class Timings:
    """Accumulated seconds and call counts per name; `with timings("train"): ...`."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.history: defaultdict[str, list[float]] = defaultdict(list)
        self._paused = False

    def last(self, name: str) -> float:
        """Seconds of the most recent `name` interval."""
        return self.history[name][-1] if self.history[name] else 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing inside is counted (e.g. a one-off evaluation before the timed cycles)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if not self._paused:
                self.history[name].append(time.perf_counter() - start)
                self.seconds[name] += self.history[name][-1]
                self.calls[name] += 1

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
        self._last: dict[str, float] = {}

    def last(self, name: str) -> float:
        """Seconds of the most recent `name` interval."""
        return self._last.get(name, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last[name] = time.perf_counter() - start
            self.seconds[name] += self._last[name]
            self.calls[name] += 1

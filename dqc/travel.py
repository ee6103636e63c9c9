"""The travelling loop, written once: cycles -> centers -> local epochs -> batches.

The model visits the centers one after the other, in an order reshuffled every cycle with a
seed derived from the cycle (the authors seed numpy with 40 + c for the standard run and
42 + c for the dirty and QC runs). At a center of n images it runs E local epochs of
floor(n / min(B, n)) batches. What happens with a batch is a `Step`: a plain training step for
the standard and dirty runs, verification for quality control, or a round trip to another
machine. Each cycle's random stream is seeded by the cycle alone, so a run resumed at a cycle
boundary makes exactly the same choices as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar

import numpy as np
import pandas as pd

from dqc.progress import bar
from dqc.timing import Timings
from dqc.trainer import Trainer, learning_rate

T = TypeVar("T")

#: A training step at a center: (center, subject ids) -> (loss, accuracy) of that batch.
Step = Callable[[str, list[str]], tuple[float, float]]
#: Which of a center's images take part this cycle: (center, ids) -> ids.
Select = Callable[[str, list[str]], list[str]]


class Batches(Protocol):
    def batch(self, subjects: Sequence[str]) -> np.ndarray: ...
    def y(self, subjects: Sequence[str]) -> np.ndarray: ...


def centers_of(table: pd.DataFrame) -> dict[str, list[str]]:
    """Study -> subject ids, centers and images in order of first appearance in the CSV."""
    return {str(k): list(v) for k, v in table.groupby("Study", sort=False)["Subject"]}


def cycle_rng(seed: int, cycle: int) -> np.random.RandomState:
    """The random stream of one cycle (the authors' `np.random.seed(seed + cycle)`)."""
    return np.random.RandomState(seed + cycle)


def center_order(centers: Sequence[str], rng: np.random.RandomState) -> list[str]:
    return [centers[i] for i in rng.permutation(len(centers))]


def split_batches(ids: Sequence[str], batch_size: int, rng: np.random.RandomState,
                  labels: Mapping[str, int] | None = None) -> list[list[str]]:
    """Shuffle, batch size min(B, n), floor(n / batch size) batches (the remainder is dropped).

    With `labels` (criterion `stratified`) the same images are kept, in batches of the same
    size, but dealt out label by label so that each batch holds both labels as evenly as the
    center's images allow: in training mode BatchNorm takes the batch's mean out, and a batch
    of one label has a loss as high as a harmful one's. The random stream is used as without;
    a center of one label, or of one batch, is cut as without.
    """
    n = len(ids)
    if n == 0:
        return []
    size = min(batch_size, n)
    shuffled = [ids[i] for i in rng.permutation(n)]
    count = n // size
    kept = shuffled[:count * size]
    if labels is None or count == 1 or len({labels[s] for s in kept}) == 1:
        return [kept[i * size:(i + 1) * size] for i in range(count)]
    dealt = sorted(kept, key=lambda s: labels[s])  # stable: each label in shuffled order
    return [dealt[i::count] for i in range(count)]


def cycle_batches(centers: dict[str, list[str]], rng: np.random.RandomState, batch_size: int,
                  epochs: int = 1, select: Select | None = None,
                  labels: Mapping[str, int] | None = None) -> Iterator[tuple[str, list[str]]]:
    """(center, batch) in travelling order. `select` is asked when the model reaches a center;
    `labels` deals each center's batches label by label (`split_batches`)."""
    for center in center_order(list(centers), rng):
        ids = select(center, centers[center]) if select else centers[center]
        if not ids:
            continue
        for _ in range(epochs):
            yield from ((center, b) for b in split_batches(ids, batch_size, rng, labels))


def lookahead(items: Iterable[T]) -> Iterator[tuple[T, T | None]]:
    """(item, next item or None): lets the next batch be read while this one trains."""
    iterator = iter(items)
    current = next(iterator, None)
    while current is not None:
        upcoming = next(iterator, None)
        yield current, upcoming
        current = upcoming


def local_step(trainer: Trainer, store: Batches, timings: Timings | None = None) -> Step:
    """Train one step on images held on this machine."""
    clock = timings or Timings()

    def step(center: str, ids: list[str]) -> tuple[float, float]:
        with clock("data"):
            x, y = store.batch(ids), store.y(ids)
        with clock("train"):
            return trainer.train_step(x, y)
    return step


@dataclass
class CycleStats:
    cycle: int
    batches: int
    images: int
    loss: float
    accuracy: float
    seconds: float
    learning_rate: float
    batch_losses: tuple[float, ...] = ()  # each step's own loss, in order

    def line(self) -> str:
        return (f"cycle {self.cycle:3d}  loss {self.loss:.4f}  train acc {self.accuracy:.3f}  "
                f"{self.images} images in {self.batches} batches  lr {self.learning_rate:.2e}  "
                f"{self.seconds:.1f} s")


def travel_cycle(trainer: Trainer, centers: dict[str, list[str]], cycle: int, step: Step, *,
                 seed: int, batch_size: int, epochs: int = 1, select: Select | None = None,
                 prefetch: Callable[[list[str]], None] | None = None,
                 verbose: bool = True,
                 schedule: Callable[[int], float] = learning_rate,
                 labels: Mapping[str, int] | None = None) -> CycleStats:
    """One cycle of the travelling model: set the cycle's learning rate, visit every center.

    `schedule(cycle)` gives the rate (see `trainer.cycle_learning_rate`). `labels` deals
    each center's batches label by label (`split_batches`; criterion `stratified`).

    `prefetch(ids)` is told the next batch before the current one trains (images streamed
    from disk are then read in the background). `select` for the next center is asked one
    batch early; it only concerns that center's own images, so the answer is the same.
    """
    start = time.perf_counter()
    lr = schedule(cycle)
    trainer.set_learning_rate(lr)
    total_images = sum(len(v) for v in centers.values()) * epochs
    progress = bar(total_images, desc=f"cycle {cycle}", disable=not verbose)
    loss_sum = acc_sum = 0.0
    images = batches = 0
    losses = []
    plan = cycle_batches(centers, cycle_rng(seed, cycle), batch_size, epochs, select, labels)
    for (center, ids), upcoming in lookahead(plan):
        if prefetch and upcoming:
            prefetch(upcoming[1])
        loss, acc = step(center, ids)
        loss_sum += loss * len(ids)
        losses.append(float(loss))
        acc_sum += acc * len(ids)
        images += len(ids)
        batches += 1
        progress.update(len(ids))
        progress.set_postfix_str(f"{center} loss {loss_sum / images:.3f}", refresh=False)
    progress.close()
    return CycleStats(cycle, batches, images, loss_sum / max(images, 1), acc_sum / max(images, 1),
                      time.perf_counter() - start, lr, tuple(losses))

"""Progress bars for long work (tqdm), silent when not wanted."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, disable: bool = False, **kwargs) -> Iterable[T]:
    """Wrap an iterable in a progress bar on stderr that leaves no trace when done."""
    return tqdm(items, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kwargs)


def bar(total: int, desc: str, disable: bool = False) -> tqdm:
    """A manual progress bar (call .update(n) and .close())."""
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)

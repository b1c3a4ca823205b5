"""Futures made from other futures: an item of a result, a split result, batches.

``get_item_from_future(future, key)`` and ``split_future(future, n)`` return futures
that resolve to ``future.result()[key]`` / ``[i]``; ``batched(futures, n)`` returns
futures that each resolve to a list of ``n`` results, taken in completion order. All
are plain ``concurrent.futures.Future`` subclasses, resolved by done-callbacks (no
thread waits), so they can be arguments of later calls like any future. A failed
input fails them with its exception; a cancelled input cancels them.

Each one remembers where it comes from (``source``/``key``, ``sources``), which is
how the dependency graph and the workflow export draw them as edges.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from typing import Any

from executorlib.dependencies import settle

__all__ = ["ItemFuture", "BatchFuture", "get_item_from_future", "split_future", "batched", "get_item"]


def get_item(obj: Any, key: Any) -> Any:
    """``obj[key]``: the function the workflow export names for an item by index."""
    return obj[key]


class ItemFuture(Future):
    """``source.result()[key]``, once ``source`` is done."""

    def __init__(self, source: Future, key: Hashable) -> None:
        super().__init__()
        self.source, self.key = source, key


class BatchFuture(Future):
    """A list of results of ``sources`` (which ones: the order in which they finish)."""

    def __init__(self, sources: list[Future]) -> None:
        super().__init__()
        self.sources = sources


def get_item_from_future(future: Future, key: Hashable) -> ItemFuture:
    """A future for ``future.result()[key]`` (a dict key, a list index, ...)."""
    item = ItemFuture(future, key)
    future.add_done_callback(lambda done: _select(done, item, None))
    return item


def split_future(future: Future, n: int) -> list[ItemFuture]:
    """``n`` futures for the items ``0 .. n-1`` of ``future.result()``, which must be a
    sequence of exactly ``n`` items (else each fails with a ``ValueError``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"split_future needs a positive int n, got {n!r}")
    items = [ItemFuture(future, i) for i in range(n)]
    for item in items:
        future.add_done_callback(lambda done, item=item: _select(done, item, n))
    return items


def _select(done: Future, item: ItemFuture, length: int | None) -> None:
    if done.cancelled():
        item.cancel()
    elif done.exception() is not None:
        settle(item, exception=done.exception())
    elif getattr(done, "graph_only", False):
        settle(item, result=None)  # the graph mode runs nothing
    else:
        try:
            value = done.result()
            if length is not None and len(value) != length:
                raise ValueError(f"split_future(..., n={length}) got a result of {len(value)} items")
            settle(item, result=value[item.key])
        except Exception as error:
            settle(item, exception=_describe(error, item.key))


def _describe(error: Exception, key: Hashable) -> Exception:
    if isinstance(error, (KeyError, IndexError, TypeError)):
        described = type(error)(f"cannot take item {key!r} of the result: {error}")
        described.__cause__ = error
        return described
    return error


def batched(futures: Sequence[Future], n: int) -> list[BatchFuture]:
    """Futures that each resolve to a list of ``n`` results of ``futures``, taken in the
    order the inputs finish; the last batch gets the remainder. An input that fails
    fails the batch it would have joined; a cancelled input cancels it."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"batched needs a positive int n, got {n!r}")
    futures = list(futures)
    sizes = [min(n, len(futures) - start) for start in range(0, len(futures), n)]
    batches = [BatchFuture(futures[i * n:(i + 1) * n]) for i in range(len(sizes))]
    collector = _Batches(batches, sizes)
    for future in futures:
        future.add_done_callback(collector.on_done)
    return batches


class _Batches:
    """Fills batch after batch with results as their inputs finish."""

    def __init__(self, batches: list[BatchFuture], sizes: list[int]) -> None:
        self._batches, self._sizes = batches, sizes
        self._values: list[list[Any]] = [[] for _ in sizes]
        self._arrived = 0
        self._lock = threading.Lock()

    def on_done(self, future: Future) -> None:
        with self._lock:
            index = self._batch_of(self._arrived)
            self._arrived += 1
            values = self._values[index]
            values.append(future.result() if _succeeded(future) else None)
            full = len(values) == self._sizes[index]
        batch = self._batches[index]
        if future.cancelled():
            batch.cancel()
        elif future.exception() is not None:
            settle(batch, exception=future.exception())
        elif full:
            settle(batch, result=list(values))

    def _batch_of(self, position: int) -> int:
        for index, size in enumerate(self._sizes):
            if position < size:
                return index
            position -= size
        raise AssertionError("more inputs finished than were given")


def _succeeded(future: Future) -> bool:
    return not future.cancelled() and future.exception() is None


def origins(inputs: list[Future]) -> list[Future]:
    """``inputs`` with every item and batch future replaced by the futures it comes
    from, for the dependency graph."""
    found: list[Future] = []
    for future in inputs:
        if isinstance(future, ItemFuture):
            found += origins([future.source])
        elif isinstance(future, BatchFuture):
            found += origins(future.sources)
        else:
            found.append(future)
    return list(dict.fromkeys(found))

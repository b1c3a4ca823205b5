"""Futures as arguments: find them, wait for them by callback, put their results in.

A future may sit anywhere in the arguments, nested in lists, tuples and dicts. The
dependent call is released by ``add_done_callback`` when its last input finishes; if an
input fails, the dependent fails at once with that exception; if an input is cancelled,
the dependent is cancelled (and ``wait()``/``as_completed()`` are told). If releasing
raises (an argument container that cannot be rebuilt, a cache file that cannot be
read), the dependent fails with that error. No thread waits and nothing polls.

The graph of submitted calls (for ``plot_dependency_graph``) is kept here as well.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, PENDING, RUNNING
from typing import Any

_CLAIMABLE = (PENDING, CANCELLED)


def find_futures(value: Any) -> list[Future]:
    """Every future inside ``value`` (depth-first, in argument order)."""
    found: list[Future] = []
    _collect(value, found)
    return found


def futures_in(args: tuple, kwargs: dict) -> list[Future]:
    """``find_futures((args, kwargs))`` without the containers' round trip: the path of
    every ``submit``, where arguments are mostly plain numbers and strings."""
    found: list[Future] = []
    for value in args:
        if type(value) not in _SCALARS:
            _collect(value, found)
    if kwargs:
        _collect(kwargs, found)
    return found


_SCALARS = frozenset((int, float, complex, str, bytes, bool, type(None)))


def _collect(value: Any, found: list[Future]) -> None:
    if type(value) in _SCALARS:  # most arguments: skip the isinstance checks
        return
    if isinstance(value, Future):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, found)


def substitute(value: Any, resolve: Callable[[Future], Any] = Future.result) -> Any:
    """``value`` with every (finished) future replaced by its result (or by
    ``resolve(future)``); containers rebuilt, so the caller's own lists and dicts are
    never changed."""
    if isinstance(value, Future):
        return resolve(value)
    if isinstance(value, dict):
        items = {key: substitute(item, resolve) for key, item in value.items()}
        return items if type(value) is dict else _refill(value, items)
    if isinstance(value, list):
        items = [substitute(item, resolve) for item in value]
        return items if type(value) is list else _refill(value, items)
    if isinstance(value, tuple):
        items = [substitute(item, resolve) for item in value]
        if hasattr(value, "_fields"):  # named tuple
            return type(value)(*items)
        return tuple(items) if type(value) is tuple else type(value)(items)
    return value


def _refill(container: Any, items: Any) -> Any:
    """A copy of a dict or list subclass (OrderedDict, defaultdict, ...) holding ``items``."""
    clone = copy.copy(container)
    clone.clear()
    clone.update(items) if isinstance(clone, dict) else clone.extend(items)
    return clone


def when_resolved(
    inputs: list[Future], dependent: Future, release: Callable[[], None]
) -> None:
    """Call ``release()`` once every input succeeded; fail or cancel ``dependent`` as
    soon as one input fails or is cancelled. ``release`` runs in the thread that
    finished the last input; an exception it raises fails ``dependent``. Once settled,
    the inputs' callbacks hold neither ``release`` nor ``dependent``."""
    remaining = len(inputs)
    lock = threading.Lock()
    pending: list | None = [dependent, release]  # dropped once settled

    def on_done(future: Future) -> None:
        nonlocal remaining, pending
        problem = _problem(future)
        with lock:
            if pending is None:
                return
            remaining -= 1
            if problem is None and remaining:
                return
            (target, run), pending = pending, None
        if problem is None:
            _release(target, run)
        elif isinstance(problem, CancelledError):
            if target.cancel():
                notify_cancelled(target)
        else:
            settle(target, exception=problem)

    for future in inputs:
        future.add_done_callback(on_done)


def _release(dependent: Future, release: Callable[[], None]) -> None:
    try:
        release()
    except BaseException as error:  # a future must never be lost in a callback
        settle(dependent, exception=error)


def on_done_of_new(future: Future, callback: Callable[[Future], None]) -> None:
    """``future.add_done_callback(callback)`` for a future this thread has just created
    and not yet handed to anyone: nothing can resolve it meanwhile, so its condition
    need not be taken (a lock round trip on every ``submit``)."""
    future._done_callbacks.append(callback)


def notify_cancelled(future: Future) -> None:
    """Tell ``wait()``/``as_completed()`` that ``future`` was cancelled. The standard
    library does that in ``set_running_or_notify_cancel``, which an executor calls
    when it would start the call; a call cancelled while it waits may never get there."""
    if future.cancelled():
        claim(future)


def claim(future: Future) -> bool:
    """Mark ``future`` running before its call starts: True, or False (waiters told)
    if it was cancelled or is already done. A call put back in the queue after its
    worker died before starting it is still running: True."""
    state = future._state  # "cancelled" and "cancelled and notified" look alike otherwise
    if state == RUNNING:
        return True
    if state not in _CLAIMABLE:  # notified already, or done: asking again logs CRITICAL
        return False
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # cancelled and notified, or done, meanwhile
        return False


def _problem(future: Future) -> BaseException | None:
    if future.cancelled():
        return CancelledError("an input of this call was cancelled")
    return future.exception()


def settle(future: Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Resolve ``future`` unless it is already resolved (e.g. cancelled by the user)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class DependencyGraph:
    """Calls as nodes (named after their function), future arguments as edges."""

    def __init__(self) -> None:
        self.nodes: list[str] = []
        self.edges: list[tuple[int, int]] = []
        self._ids: dict[int, int] = {}
        self._futures: list[Future] = []  # keep ids of futures stable while recorded

    def add(self, name: str, future: Future, inputs: list[Future]) -> None:
        node = len(self.nodes)
        self.nodes.append(name)
        for source in inputs:
            if id(source) not in self._ids:  # a future from elsewhere: a node of its own
                self._ids[id(source)] = len(self.nodes)
                self.nodes.append("future")
                self._futures.append(source)
            self.edges.append((self._ids[id(source)], node))
        self._ids[id(future)] = node
        self._futures.append(future)

    def draw(self, filename: str | None) -> str | None:
        """Draw to ``filename`` (PNG, SVG, PDF by extension), or inline in Jupyter.

        Returns the file written, or None when shown inline.
        """
        try:
            import matplotlib

            if filename is not None or not _in_jupyter():
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import networkx as nx
        except ImportError as error:
            raise ImportError(
                "plot_dependency_graph needs networkx and matplotlib: "
                "pip install 'executorlib[graph]'"
            ) from error
        graph = nx.DiGraph()
        graph.add_nodes_from((i, {"label": f"{name}"}) for i, name in enumerate(self.nodes))
        graph.add_edges_from(self.edges)
        figure, axes = plt.subplots(figsize=(max(4, len(self.nodes) ** 0.5 * 2.5),) * 2)
        layout = _layered_layout(graph)
        nx.draw_networkx(
            graph, layout, ax=axes, labels=nx.get_node_attributes(graph, "label"),
            node_color="#cfe2f3", node_size=1600, font_size=8, arrows=True,
        )
        axes.set_axis_off()
        if filename is None and _in_jupyter():
            plt.show()
            return None
        filename = filename or "dependency_graph.png"
        figure.savefig(filename, bbox_inches="tight")
        plt.close(figure)
        return filename


def _layered_layout(graph: Any) -> dict:
    """Sources on top, each call one layer below its deepest input."""
    import networkx as nx

    depth: dict[int, int] = {}
    for node in nx.topological_sort(graph):
        depth[node] = max((depth[p] + 1 for p in graph.predecessors(node)), default=0)
    rows: dict[int, list[int]] = {}
    for node, level in depth.items():
        rows.setdefault(level, []).append(node)
    return {
        node: (column - (len(members) - 1) / 2, -level)
        for level, members in rows.items()
        for column, node in enumerate(members)
    }


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"

"""``export_workflow_filename=``: the submitted calls as a Python Workflow Definition.

The Python Workflow Definition (PWD, the ``python-workflow-definition`` package) is the
JSON interchange format of pyiron, AiiDA and jobflow: function nodes name an importable
``module.function``, input nodes hold JSON values, edges connect a node's result (or
one item of it, ``sourcePort``) to a parameter (``targetPort``) of a function. In this
mode the executor runs nothing: each ``submit`` becomes a function node, each argument
an input node or an edge from the call whose future it is, and at shutdown the graph
is validated and written by the package's own model. ``get_item_from_future`` is an
edge with a ``sourcePort`` (string keys) or a ``get_item`` node (other keys);
``split_future`` the same per item; a list or dict of futures, and a ``batched``
future, a ``get_list``/``get_dict`` node of the package.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from concurrent.futures import Future
from typing import Any

from executorlib.futures_api import BatchFuture, ItemFuture
from executorlib.task import Task

_GET_LIST = "python_workflow_definition.shared.get_list"
_GET_DICT = "python_workflow_definition.shared.get_dict"
_GET_ITEM = "executorlib.futures_api.get_item"
_VERSION = "0.1.0"  # the PWD format version this module writes


def _load_model() -> Any:
    try:
        from python_workflow_definition.models import PythonWorkflowDefinitionWorkflow
    except ImportError as error:
        raise ImportError(
            "export_workflow_filename writes the Python Workflow Definition format with the "
            "python-workflow-definition package: pip install 'executorlib[workflow]'"
        ) from error
    return PythonWorkflowDefinitionWorkflow


class WorkflowRecorder:
    """Collects the graph of submitted calls as PWD nodes and edges."""

    def __init__(self) -> None:
        _load_model()  # fail at construction, not at shutdown, when the package is missing
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []
        self._node_of: dict[int, int] = {}
        self._futures: list[Future] = []  # keeps ids in _node_of valid
        self._input_names: dict[str, int] = {}
        self._last: int | None = None

    def add(self, task: Task) -> None:
        """One function node for ``task``, connected to its arguments."""
        ports = _bind(task)
        node = self._node({"type": "function", "value": _importable_name(task)})
        before = len(self.edges)
        try:
            for port, value in ports.items():
                self._connect(value, node, port, task.name)
        except Exception:  # the call is refused: leave no half of it in the graph
            del self.nodes[node:], self.edges[before:]
            raise
        self._node_of[id(task.future)] = node
        self._futures.append(task.future)
        self._last = node

    def write(self, filename: str) -> str:
        """Validate with the package's model and write ``filename`` atomically."""
        if self._last is None:
            raise ValueError(
                f"export_workflow_filename={filename!r}: no call was submitted; nothing to write"
            )
        output = self._node({"type": "output", "name": "result"})
        self._edge(self._last, None, output, None)
        model = _load_model().model_validate(
            {"version": _VERSION, "nodes": self.nodes, "edges": self.edges}
        )
        text = model.dump_json()
        directory = os.path.dirname(os.path.abspath(filename))
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as file:
            file.write(text)
        os.replace(file.name, filename)
        return filename

    # ------------------------------------------------------------------ building
    def _node(self, fields: dict[str, Any]) -> int:
        node = len(self.nodes)
        self.nodes.append({"id": node, **fields})
        return node

    def _edge(self, source: int, source_port: str | None, target: int, target_port: str | None) -> None:
        self.edges.append(
            {"target": target, "targetPort": target_port, "source": source, "sourcePort": source_port}
        )

    def _connect(self, value: Any, target: int, port: str, where: str) -> None:
        if isinstance(value, Future):
            source, source_port = self._source(value, where)
            self._edge(source, source_port, target, port)
        elif isinstance(value, (list, tuple, dict)) and _holds_future(value):
            self._edge(self._collection(value, where), None, target, port)
        else:
            self._edge(self._input(port, _json_value(value, where, port)), None, target, port)

    def _source(self, future: Future, where: str) -> tuple[int, str | None]:
        """The node (and item) that ``future`` stands for."""
        if id(future) in self._node_of:
            return self._node_of[id(future)], None
        if isinstance(future, ItemFuture):
            source, port = self._source(future.source, where)
            if port is None and isinstance(future.key, str):
                return source, future.key
            node = self._node({"type": "function", "value": _GET_ITEM})
            self._edge(source, port, node, "obj")
            self._edge(self._input("key", _json_value(future.key, where, "key")), None, node, "key")
            return node, None
        if isinstance(future, BatchFuture):
            return self._collection(future.sources, where), None
        if future.done() and not future.cancelled() and future.exception() is None:
            return self._input("value", _json_value(future.result(), where, "a future")), None
        raise ValueError(
            f"export_workflow_filename: an argument of {where} is a future of another executor "
            "that has not finished; pass its result, or submit that call to this executor"
        )

    def _collection(self, value: list | tuple | dict, where: str) -> int:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        node = self._node({"type": "function", "value": _GET_DICT if isinstance(value, dict) else _GET_LIST})
        for key, item in items:
            if not isinstance(key, (str, int)):
                raise ValueError(f"export_workflow_filename: {where} has a dict argument with key {key!r}; "
                                 "the workflow format needs string keys")
            self._connect(item, node, str(key), where)
        return node

    def _input(self, name: str, value: Any) -> int:
        count = self._input_names.get(name, 0)
        self._input_names[name] = count + 1
        unique = name if count == 0 else f"{name}_{count}"
        return self._node({"type": "input", "name": unique, "value": value})


def _bind(task: Task) -> dict[str, Any]:
    """The call's arguments by parameter name (the PWD connects by name only)."""
    try:
        signature = inspect.signature(task.fn)
        bound = signature.bind(*task.args, **task.kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"export_workflow_filename: cannot name the arguments of {task.name}: {error}"
        ) from error
    ports: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            raise ValueError(
                f"export_workflow_filename: {task.name} takes {name!r} by position only, but the "
                "workflow format passes every argument by name; use a function with named parameters"
            )
        ports.update(value if kind == inspect.Parameter.VAR_KEYWORD else {name: value})
    return ports


def _importable_name(task: Task) -> str:
    module, qualname = getattr(task.fn, "__module__", None), getattr(task.fn, "__qualname__", "")
    if not module or module == "__main__" or not qualname or "." in qualname or "<" in qualname:
        raise ValueError(
            f"export_workflow_filename: {task.name} (module {module}) cannot be named as "
            "'module.function', which the workflow format needs; define it at the top level of "
            "an importable module"
        )
    return f"{module}.{qualname}"


def _holds_future(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(item, Future) or (
        isinstance(item, (list, tuple, dict)) and _holds_future(item)) for item in items)


def _json_value(value: Any, where: str, port: str) -> Any:
    """``value`` as JSON data (tuples become lists), or a ValueError saying why not."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item, where, port) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _json_value(item, where, port) for key, item in value.items()}
    raise ValueError(
        f"export_workflow_filename: argument {port!r} of {where} is a {type(value).__name__}; the "
        "workflow format holds only JSON values (numbers, strings, booleans, None, lists, "
        "dicts with string keys)"
    )

"""Encoding a call for the wire without re-pickling the same function every time.

Pickling a function from ``__main__`` or a notebook by value (cloudpickle) costs tens
of microseconds, more than the rest of a call's trip. The executor therefore keeps the
pickled bytes of recently used functions and reuses them while everything the pickle
captured is provably the same object: the function's globals, defaults and closure
cells must be immutable values, classes, modules, or functions importable by name, and
still bound to the very same objects. Anything else (a global list, a dict of settings)
is pickled afresh on every call, so a worker always sees the current values.

The cache never keeps a submitted callable alive: it holds plain functions through weak
references, and only functions and module-level builtins are cached at all (a bound
method pickles its instance, whose state may change). A classmethod of an importable
class travels by reference, like a function, so the worker runs the very code of its
module (and its traceback shows that file and line).

The arguments of most calls are plain data (numbers, strings, arrays, small lists and
dicts of them), which the C pickler writes exactly as cloudpickle would, several times
faster; the encoder checks that cheaply and uses cloudpickle only for the rest (a
function, a class or any other object in the arguments, which may come from
``__main__`` and must then travel by value).

Several calls in one message (a batch) are pickled one by one, so a call the worker
cannot unpickle fails alone: the message's first frame is a plain pickle of
``[(call pickle, number of its buffers), ...]``, the calls' buffers follow in order.

Workers keep the functions they unpickled, keyed by those bytes, for the same reason.
"""

from __future__ import annotations

import pickle
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from executorlib import serialize
from executorlib.interactive import protocol

_CACHE_SIZE = 256
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), range, frozenset,
              types.ModuleType, types.BuiltinFunctionType)
_PLAIN = frozenset((int, float, complex, str, bytes, bool, type(None)))
_PLAIN_ITEMS = 32  # a longer container is left to cloudpickle rather than walked here
_worker_functions: OrderedDict[bytes, Callable] = OrderedDict()
# A batch's calls, each as (pickle of its _WireCall, number of out-of-band buffers).
BatchHead = list[tuple[bytes, int]]


def rebuild_call(function_pickle: bytes, args: tuple, kwargs: dict) -> protocol.Call:
    """Worker side: the Call, with the function unpickled once per distinct pickle."""
    fn = _worker_functions.get(function_pickle)
    if fn is None:
        fn = pickle.loads(function_pickle)
        _worker_functions[function_pickle] = fn
        if len(_worker_functions) > _CACHE_SIZE:
            _worker_functions.popitem(last=False)
    return protocol.Call(fn, args, kwargs)


class _WireCall:
    """Pickles as ``rebuild_call(function_pickle, args, kwargs)``."""

    __slots__ = ("function_pickle", "args", "kwargs")

    def __init__(self, function_pickle: bytes, args: tuple, kwargs: dict) -> None:
        self.function_pickle, self.args, self.kwargs = function_pickle, args, kwargs

    def __reduce__(self) -> tuple:
        return rebuild_call, (self.function_pickle, self.args, self.kwargs)


class CallEncoder:
    """Executor side: frames for a call, reusing function pickles while they are valid."""

    def __init__(self) -> None:
        # Nearly every first call needs cloudpickle (a function from __main__, a builtin):
        # loading it now, while the workers boot, keeps it off that call's way.
        import cloudpickle  # noqa: F401

        self._functions: OrderedDict[int, tuple[Callable[[], Any], tuple, bytes]] = OrderedDict()

    def encode(self, fn: Callable, args: tuple, kwargs: dict) -> list:
        """Frames of the call; raises if the function or arguments cannot be pickled."""
        wire = _WireCall(self._function_pickle(fn), args, kwargs)
        return serialize.dumps(wire, by_value=not (_plain(args) and _plain(kwargs)))

    def encode_batch(self, calls: list[tuple[Callable, tuple, dict]]) -> list:
        """Frames of several calls in one message, each call pickled on its own (see
        the module docstring); the worker runs them in order."""
        head: BatchHead = []
        buffers: list = []
        for fn, args, kwargs in calls:
            frames = self.encode(fn, args, kwargs)
            head.append((bytes(frames[0]), len(frames) - 1))
            buffers += frames[1:]
        return [pickle.dumps(head, protocol=5), *buffers]

    def _function_pickle(self, fn: Callable) -> bytes:
        captured = _captured(fn)
        cached = self._functions.get(id(fn))
        if cached is not None and cached[0]() is fn and _same(cached[1], captured):
            return cached[2]
        # in band: the pickle is reused as one bytes object, and a closure's large array
        # must travel inside it
        data = _by_reference(fn) or serialize.to_bytes(fn, by_value=True)
        if captured is not None:
            self._functions[id(fn)] = (_reference(fn), captured, data)
            if len(self._functions) > _CACHE_SIZE:
                self._functions.popitem(last=False)
        return data


def unpicklable_call(name: str, error: Exception) -> serialize.SerializationError:
    """The error of a call whose function or arguments cannot be pickled."""
    failure = serialize.SerializationError(
        f"cannot send the call of {name} to a worker: its function or arguments "
        f"cannot be pickled ({type(error).__name__}: {error})"
    )
    failure.__cause__ = error
    return failure


def split_batch(head: BatchHead, buffers: list) -> list[list]:
    """Worker side: the frames of each call of a batch, for :func:`serialize.loads`."""
    calls, start = [], 0
    for call_pickle, count in head:
        calls.append([call_pickle, *buffers[start:start + count]])
        start += count
    return calls


def _plain(value: Any, depth: int = 2) -> bool:
    """Whether ``value`` is plain data that pickles the same by name or by value: no
    function, class or other object that could come from ``__main__``."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is tuple or kind is list:
        return depth > 0 and len(value) <= _PLAIN_ITEMS and all(_plain(v, depth - 1) for v in value)
    if kind is dict:
        return depth > 0 and len(value) <= _PLAIN_ITEMS and all(
            type(k) is str and _plain(v, depth - 1) for k, v in value.items()
        )
    return _numeric_array(value)


def _numeric_array(value: Any) -> bool:
    """A NumPy array without Python objects in it (numpy itself is not imported here)."""
    kind = type(value)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not value.dtype.hasobject


def _reference(fn: Callable) -> Callable[[], Any]:
    """A weak reference to a function; builtins (module-level, alive anyway) are kept."""
    try:
        return weakref.ref(fn)
    except TypeError:
        return lambda: fn


def _by_reference(fn: Any) -> bytes | None:
    """The by-name pickle of a classmethod of an importable class, else None."""
    owner = getattr(fn, "__self__", None)
    if not isinstance(fn, types.MethodType) or not isinstance(owner, type) or not _importable(owner):
        return None
    try:
        return pickle.dumps(fn, protocol=5)
    except Exception:
        return None


def _captured(fn: Any) -> tuple | None:
    """What a by-value pickle of ``fn`` captures, or None if any of it could change
    without its identity changing (then the function is never cached). Only plain
    functions and module-level builtins qualify: a bound method (``obj.method``,
    ``[].append``) pickles its instance."""
    if isinstance(fn, types.BuiltinFunctionType):
        return () if isinstance(getattr(fn, "__self__", None), (types.ModuleType, type(None))) else None
    if not isinstance(fn, types.FunctionType) or fn.__dict__:
        return None
    code = fn.__code__
    values = [fn.__globals__.get(name, _captured) for name in _global_names(code)]
    values += [cell.cell_contents for cell in fn.__closure__ or ()]
    values += list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    return tuple(values) if all(map(_stable, values)) else None


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return tuple(names)


def _stable(value: Any) -> bool:
    if value is _captured or isinstance(value, _IMMUTABLE):
        return True
    if isinstance(value, tuple):
        return all(map(_stable, value))
    if isinstance(value, (types.FunctionType, type)):  # fine if a worker imports it by name
        return _importable(value)
    return False


def _importable(value: Any) -> bool:
    """Whether a worker can import ``value`` (a function or class) by its name."""
    module = getattr(value, "__module__", None)
    return module not in (None, "__main__") and "<locals>" not in value.__qualname__


def _same(old: tuple, new: tuple | None) -> bool:
    return new is not None and len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))

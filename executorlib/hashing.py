"""The cache key of a call: the same in every process for the same call.

``task_key`` is the file name (without ``.h5``) of a call's result: its ``cache_key``, or
``<function name>_<hash>``. A function is hashed by what it is (module, name, bytecode,
constants, defaults, closure), not by its cloudpickle bytes, which differ between
interpreters; ``functools.partial`` objects and callable instances by their function or
class and their state, never by ``repr`` (which holds a memory address); sets in a sorted
order; and pickle's memo is off, so which equal objects happen to be shared does not
matter. A function's globals are not hashed: change a constant it reads and use a new
``cache_key`` (or clear the directory).
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import re
import types
from typing import Any

from executorlib.task import Task

_UNSAFE = re.compile(r"[^\w.-]")  # in a function's name, replaced by "_" in file names
_PLAIN_NAME = re.compile(r"(?!\.|jobs/)[\w.+=@,-]+(/(?!\.)[\w.+=@,-]+)*")
_CODE_DIGESTS: dict[types.CodeType, bytes] = {}
_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None), tuple, list, dict})


def task_key(task: Task) -> str:
    """The file name (without ``.h5``) of ``task``'s result: its ``cache_key``, or
    ``<function name>_<hash of the call>``."""
    key = task.resources.cache_key
    if key is not None:
        if not _PLAIN_NAME.fullmatch(key):
            raise ValueError(
                f"cache_key {key!r} of {task.name} must be a plain file name, or names joined by "
                "'/' for sub-directories ('run1/step3'): letters, digits and . _ - + = @ , only, "
                "no part starting with '.', not under 'jobs/' (no spaces or newlines)"
            )
        return key
    call = (task.fn, task.args, task.kwargs)
    if not isinstance(task.fn, (types.FunctionType, functools.partial)):
        method = next((vars(c)["__call__"] for c in type(task.fn).__mro__ if "__call__" in vars(c)), None)
        if isinstance(method, types.FunctionType):  # a callable instance: its class's code
            call += (method,)
    if task.resources.cores != 1:  # an MPI call returns one value per rank
        call += (task.resources.cores,)
    name = _UNSAFE.sub("_", stable_name(task.fn))[:80]
    return f"{name}_{call_digest(call)}"


def stable_name(fn: Any) -> str:
    """The name of a callable without memory addresses: a partial's function, an
    instance's class."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def call_digest(value: Any) -> str:
    """A hex digest of ``value`` that is the same in every process for equal values."""
    buffer = io.BytesIO()
    _StablePickler(buffer).dump(value)
    return hashlib.blake2b(buffer.getbuffer(), digest_size=16).hexdigest()


class _StablePickler(pickle.Pickler):
    """Pickles for hashing only: functions by their code, sets in sorted order."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=5)
        self.fast = True  # no memo: sharing of equal objects must not change the bytes
        self._open: set[int] = set()

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) in _PLAIN:  # called for every object pickled: the common case first
            return None
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, (set, frozenset)):
            return (type(obj).__name__, sorted(call_digest(item) for item in obj))
        stable = getattr(obj, "__stable_key__", None)  # e.g. an upstream result in a job
        return stable() if callable(stable) and not isinstance(obj, type) else None

    def _function(self, fn: types.FunctionType) -> tuple:
        if id(fn) in self._open:  # a closure that refers to itself
            return ("function", fn.__module__, fn.__qualname__)
        self._open.add(id(fn))
        cells = tuple(_cell_value(cell) for cell in fn.__closure__ or ())
        return ("function", fn.__module__, fn.__qualname__, _code_digest(fn.__code__),
                fn.__defaults__, fn.__kwdefaults__, cells)


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _code_digest(code: types.CodeType) -> bytes:
    """Bytecode, names and constants (nested code included); not file or line numbers."""
    if code not in _CODE_DIGESTS:
        digest = hashlib.blake2b(digest_size=16)
        for part in (code.co_code, repr(code.co_names), repr(code.co_varnames),
                     repr((code.co_argcount, code.co_kwonlyargcount, code.co_flags))):
            digest.update(part if isinstance(part, bytes) else part.encode())
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                digest.update(_code_digest(const))
            elif isinstance(const, frozenset):
                digest.update(repr(sorted(map(repr, const))).encode())
            else:
                digest.update(f"{type(const).__name__}:{const!r}".encode())
        _CODE_DIGESTS[code] = digest.digest()
    return _CODE_DIGESTS[code]

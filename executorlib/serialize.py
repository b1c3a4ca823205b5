"""Every pickle executorlib makes or reads: on the wire, in cache files, in job results.

``dumps``/``loads`` turn an object into frames (a protocol-5 pickle plus its large
buffers, out of band) and back; ``to_bytes`` is the one-blob form for files;
``Failure`` and ``dumps_failure``/``failure_blobs`` carry an exception with the
worker's formatted traceback, degrading to a ``RuntimeError`` when the exception itself
will not pickle. Plain pickle is tried first (fast for results); cloudpickle only when
it refuses (lambdas, closures, classes from ``__main__``) or when asked (``by_value``).

Only the standard library is imported here (cloudpickle lazily): workers import this
module on their start-up path.
"""

from __future__ import annotations

import pickle
from typing import Any

# Buffers below this size are cheaper to copy into the pickle than to send as a frame.
_OUT_OF_BAND_MIN = 64 * 1024


class SerializationError(pickle.PicklingError, TypeError):
    """A call's function, arguments or result could not be pickled. Catchable as
    ``pickle.PicklingError`` (as with ``ProcessPoolExecutor``) and as ``TypeError``."""


class Failure:
    """An exception raised by the function, with the worker's formatted traceback."""

    __slots__ = ("exception", "traceback")

    def __init__(self, exception: BaseException, traceback: str) -> None:
        self.exception, self.traceback = exception, traceback


def dumps(obj: Any, by_value: bool = False) -> list:
    """Pickle ``obj`` into frames: the pickle first, then its out-of-band buffers.

    ``by_value=True`` uses cloudpickle, so functions and classes from ``__main__``, a
    notebook or a lambda travel with their code. Otherwise the C pickler is tried first
    (fast for results) and cloudpickle only when it refuses.
    """
    buffers: list[pickle.PickleBuffer] = []

    def keep_large(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < _OUT_OF_BAND_MIN:
            return True  # serialise in band
        buffers.append(buffer)
        return False

    if not by_value:
        try:
            head = pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
            return [head, *(buffer.raw() for buffer in buffers)]
        except Exception:  # lambdas, closures, objects of classes sent by value
            buffers.clear()
    import cloudpickle

    head = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    return [head, *(buffer.raw() for buffer in buffers)]


def loads(frames: list) -> Any:
    """Inverse of :func:`dumps`; ``frames`` are bytes or ZeroMQ frames (zero copy)."""
    views = [buffer_of(frame) for frame in frames]
    return pickle.loads(views[0], buffers=views[1:])


def buffer_of(frame: Any) -> Any:
    """The content of a received frame: a ZeroMQ frame's buffer, or the frame itself
    (bytes, or a shared-memory mapping from shm.py)."""
    return getattr(frame, "buffer", frame)


def to_bytes(obj: Any, by_value: bool = False) -> bytes:
    """One in-band pickle (no extra frames), cloudpickle where plain pickle refuses or
    where ``by_value`` asks for it (see :func:`dumps`)."""
    if not by_value:
        try:
            return pickle.dumps(obj, protocol=5)
        except Exception:  # lambdas, closures, objects of classes sent by value
            pass
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)


def format_failure(exception: BaseException, where: str = "") -> str:
    """The traceback text of ``exception``, with the place it was raised on."""
    import traceback  # only failures pay for it: workers start without it

    text = "".join(traceback.format_exception(exception))
    return f"{text}(raised on {where})\n" if where else text


def picklable(exception: BaseException) -> BaseException:
    """``exception`` if it survives a pickle round trip, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exception, protocol=5))
        return exception
    except Exception:
        return RuntimeError(f"{type(exception).__qualname__}: {_text(exception)}")


def _text(exception: BaseException) -> str:
    """``str(exception)``, or a placeholder when its ``__str__`` raises."""
    try:
        return str(exception)
    except Exception:
        return f"<unprintable {type(exception).__qualname__} exception>"


def dumps_failure(exception: BaseException, where: str = "") -> list:
    """Frames for a FAILURE message, degrading to a RuntimeError if the exception won't pickle."""
    text = format_failure(exception, where)
    try:
        return dumps(Failure(exception, text))
    except Exception:
        return dumps(Failure(picklable(exception), text))


def failure_blobs(exception: BaseException, where: str = "") -> dict[str, bytes]:
    """The pickled exception (a RuntimeError if it will not pickle) and its traceback,
    as the blobs of a result file."""
    text = format_failure(exception, where)
    return {"error": pickle.dumps(picklable(exception), protocol=5), "traceback": text.encode()}

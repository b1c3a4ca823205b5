"""The messages executor and worker exchange, and how they become ZeroMQ frames.

Every message is a multipart ZeroMQ message whose first frame is a one-byte kind::

    worker   -> executor   HELLO   nonce, mac, worker id, host, pid   (no pickle: checked first)
    executor -> worker     WELCOME mac                                (proves the executor too)
    executor -> worker     INIT    pickled init_function + buffers     (block allocation only)
    worker   -> executor   READY                                       (init_function returned)
    executor -> worker     CALL    pickled Call + buffers
    worker   -> executor   RESULT  pickled value + buffers
    worker   -> executor   FAILURE pickled Failure
    executor -> worker     STOP

Pickles use protocol 5: large buffers (NumPy arrays, bytes-likes) leave the pickle as
out-of-band frames, so a 200 MB array is never copied into a pickle stream.
Nothing in this module imports more than the standard library and cloudpickle (lazily),
because workers import it on their start-up path.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HELLO, WELCOME, INIT, READY, CALL, RESULT, FAILURE, STOP = (
    b"H", b"W", b"I", b"D", b"C", b"R", b"F", b"S",
)
SECRET_ENV = "EXECUTORLIB_SECRET"
# Buffers below this size are cheaper to copy into the pickle than to send as a frame.
_OUT_OF_BAND_MIN = 64 * 1024


@dataclass(slots=True)
class Call:
    """One function call as it travels to a worker."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: dict


@dataclass(slots=True)
class Failure:
    """An exception raised by the function, with the worker's formatted traceback."""

    exception: BaseException
    traceback: str


def hello_mac(secret: bytes, routing_id: bytes, nonce: bytes) -> bytes:
    """What a worker sends to prove it knows the executor's secret."""
    return hmac.new(secret, b"hello" + routing_id + nonce, hashlib.sha256).digest()


def welcome_mac(secret: bytes, nonce: bytes) -> bytes:
    """What the executor answers to prove the same to the worker."""
    return hmac.new(secret, b"welcome" + nonce, hashlib.sha256).digest()


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


def to_bytes(obj: Any) -> bytes:
    """One in-band pickle (no extra frames), cloudpickle where plain pickle refuses."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=5)


def loads(frames: list) -> Any:
    """Inverse of :func:`dumps`; ``frames`` are bytes or ZeroMQ frames (zero copy)."""
    views = [getattr(frame, "buffer", frame) for frame in frames]
    return pickle.loads(views[0], buffers=views[1:])


def dumps_failure(exception: BaseException, where: str = "") -> list:
    """Frames for a FAILURE, degrading to a RuntimeError if the exception won't pickle."""
    text = "".join(traceback.format_exception(exception))
    text = f"{text}(raised on {where})\n" if where else text
    try:
        return dumps(Failure(exception, text))
    except Exception:
        substitute = RuntimeError(f"{type(exception).__qualname__}: {exception}")
        return dumps(Failure(substitute, text))

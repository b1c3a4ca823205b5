"""The messages executor and worker exchange, and how they become ZeroMQ frames.

Every message is a multipart ZeroMQ message whose first frame is a one-byte kind::

    worker   -> executor   HELLO   nonce, mac, worker id, host, pid, shm fingerprint
                                                                       (no pickle: checked first)
    executor -> worker     WELCOME mac, shm prefix                     (proves the executor too)
    executor -> worker     INIT    pickled init_function + buffers     (block allocation only)
    worker   -> executor   READY                                       (init_function returned)
    executor -> worker     CALL    pickled Call + buffers
    worker   -> executor   RESULT  pickled value + buffers
    worker   -> executor   FAILURE pickled Failure
    executor -> worker     STOP

Pickles use protocol 5: large buffers (NumPy arrays, bytes-likes) leave the pickle as
out-of-band frames, so a 200 MB array is never copied into a pickle stream. Where both
ends share ``/dev/shm`` (the HELLO's fingerprint matches the executor's; the WELCOME then
names a file prefix, empty otherwise), channel.py moves the large frames through files
there instead (see shm.py). The MACs cover every handshake field, so nothing an
unauthenticated peer sends decides this.
Nothing in this module imports more than the standard library and cloudpickle (lazily),
because workers import it on their start-up path.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import traceback
from collections.abc import Callable
from typing import Any

HELLO, WELCOME, INIT, READY, CALL, RESULT, FAILURE, STOP = (
    b"H", b"W", b"I", b"D", b"C", b"R", b"F", b"S",
)
SECRET_ENV = "EXECUTORLIB_SECRET"
# Buffers below this size are cheaper to copy into the pickle than to send as a frame.
_OUT_OF_BAND_MIN = 64 * 1024


class Call:
    """One function call as it travels to a worker."""

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs


class Failure:
    """An exception raised by the function, with the worker's formatted traceback."""

    __slots__ = ("exception", "traceback")

    def __init__(self, exception: BaseException, traceback: str) -> None:
        self.exception, self.traceback = exception, traceback


# Plain classes rather than dataclasses: ``dataclasses`` imports ``inspect``, which
# would add ~10 ms to every worker's start-up.


def hello_mac(secret: bytes, routing_id: bytes, nonce: bytes, fields: list[bytes]) -> bytes:
    """What a worker sends to prove it knows the executor's secret; ``fields`` are the
    HELLO's other frames (worker id, host, pid, shm fingerprint)."""
    return _mac(secret, b"hello", routing_id, nonce, *fields)


def welcome_mac(secret: bytes, nonce: bytes, shm_prefix: bytes) -> bytes:
    """What the executor answers to prove the same to the worker."""
    return _mac(secret, b"welcome", nonce, shm_prefix)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    # Length-prefixed, so no two different lists of parts authenticate alike.
    message = b"".join(len(part).to_bytes(4, "little") + part for part in parts)
    return hmac.new(secret, message, hashlib.sha256).digest()


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
    views = [buffer_of(frame) for frame in frames]
    return pickle.loads(views[0], buffers=views[1:])


def buffer_of(frame: Any) -> Any:
    """The content of a received frame: a ZeroMQ frame's buffer, or the frame itself
    (bytes, or a shared-memory mapping from shm.py)."""
    return getattr(frame, "buffer", frame)


def dumps_failure(exception: BaseException, where: str = "") -> list:
    """Frames for a FAILURE, degrading to a RuntimeError if the exception won't pickle."""
    text = "".join(traceback.format_exception(exception))
    text = f"{text}(raised on {where})\n" if where else text
    try:
        return dumps(Failure(exception, text))
    except Exception:
        substitute = RuntimeError(f"{type(exception).__qualname__}: {exception}")
        return dumps(Failure(substitute, text))

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
from collections.abc import Callable
from typing import Any

HELLO, WELCOME, INIT, READY, CALL, RESULT, FAILURE, STOP = (
    b"H", b"W", b"I", b"D", b"C", b"R", b"F", b"S",
)
SECRET_ENV = "EXECUTORLIB_SECRET"


class Call:
    """One function call as it travels to a worker."""

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs


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

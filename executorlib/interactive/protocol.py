"""The messages executor and worker exchange, and how they become ZeroMQ frames.

Every message is a multipart ZeroMQ message that starts with a one-byte kind::

    worker   -> executor   HELLO   worker id, host, pid, shm fingerprint  (no pickle; one per launch)
    executor -> worker     WELCOME shm prefix
    executor -> worker     INIT    pickled init_function + buffers     (block allocation only)
    worker   -> executor   READY                                       (init_function returned)
    executor -> worker     CALL    pickled Call + buffers
    worker   -> executor   RESULT  pickled value + buffers + the call's seconds
    worker   -> executor   FAILURE pickled Failure + the call's seconds
    executor -> worker     STOP

Pickles use protocol 5: large buffers (NumPy arrays, bytes-likes) leave the pickle as
out-of-band frames, so a 200 MB array is never copied into a pickle stream. Where both
ends share ``/dev/shm`` (the HELLO's fingerprint matches the executor's; the WELCOME then
names a file prefix, empty otherwise), channel.py moves the large frames through files
there instead (see shm.py). Every message travels inside a CurveZMQ connection opened
with the worker's launch key (auth.py), so nothing an unauthenticated peer sends
decides any of this. On the wire (channel.py) the kind byte shares its frame with a
small first frame, and frames above 64 KiB travel in chunks.
Nothing in this module imports more than the standard library and cloudpickle (lazily),
because workers import it on their start-up path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

KEYS_ENV = "EXECUTORLIB_KEYS"  # a ZeroMQ worker's launch keys (auth.py): environment only
HELLO, WELCOME, INIT, READY, CALL, RESULT, FAILURE, STOP = (
    b"H", b"W", b"I", b"D", b"C", b"R", b"F", b"S",
)


class Call:
    """One function call as it travels to a worker."""

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs


# Plain classes rather than dataclasses: ``dataclasses`` imports ``inspect``, which
# would add ~10 ms to every worker's start-up.


_SECONDS = struct.Struct("<d")


def with_seconds(frames: list, seconds: float) -> list:
    """A RESULT's or FAILURE's frames and, last, how long the call ran in the worker
    (wall time there: what a busy machine's other processes add on the way is not in it)."""
    return [*frames, _SECONDS.pack(seconds)]


def split_seconds(frames: list) -> tuple[list, float | None]:
    """Inverse of :func:`with_seconds` (None if the last frame is not a duration)."""
    if not frames:
        return frames, None
    last = frames[-1]
    data = bytes(getattr(last, "buffer", last))
    if len(data) != _SECONDS.size:
        return frames, None
    return frames[:-1], _SECONDS.unpack(data)[0]

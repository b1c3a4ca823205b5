"""Exception types, and how an exception from a worker is re-raised here."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

from executorlib.serialize import SerializationError

__all__ = ["ExecutorShutdownError", "RemoteTraceback", "SerializationError", "WorkerDiedError",
           "with_remote_traceback"]


class RemoteTraceback(Exception):
    """The traceback of an exception as the worker formatted it; set as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class WorkerDiedError(BrokenExecutor):
    """A worker process ended while it held a call, or before it could take one.

    The message names the function, the worker, its host, how it ended (exit code or
    signal) and the last lines of its stderr.
    """


class ExecutorShutdownError(RuntimeError):
    """The executor was shut down before this call could run."""


def with_remote_traceback(exception: BaseException, text: str) -> BaseException:
    """Attach the worker's traceback to ``exception`` as its ``__cause__``."""
    exception.__cause__ = RemoteTraceback(text)
    return exception

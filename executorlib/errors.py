"""Exception types, and how an exception from a worker is re-raised here."""

from __future__ import annotations

import signal
from concurrent.futures import BrokenExecutor


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


def describe_exit(returncode: int | None) -> str:
    """'exit code 3', 'signal SIGKILL (9)' — with the usual cause where there is one."""
    if returncode is None:
        return "no exit status yet"
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if not signum:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "an unknown signal"
    text = f"signal {name} ({signum})" if returncode < 0 else f"exit code {returncode} (= 128 + {name})"
    if signum == signal.SIGKILL:
        text += ", often the out-of-memory killer or a kill from outside"
    elif signum == signal.SIGSEGV:
        text += ", a segmentation fault in compiled code"
    return text

"""What the caller's side records about calls: an error log file, pickled sizes.

Both work the same on every backend because they happen here, in the process that
submitted the call, when its future resolves: ``resource_dict={"error_log_file": path}``
appends the function's name, its arguments and the traceback of every failed call to
``path``; ``log_obj_size=True`` logs the pickled size of each call and result on the
logger ``executorlib``.
"""

from __future__ import annotations

import datetime
import logging
import os
import reprlib
import traceback
from concurrent.futures import Future
from typing import Any

from executorlib.dependencies import substitute

logger = logging.getLogger("executorlib")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 20


def log_errors_to(path: str, name: str, args: tuple, kwargs: dict, future: Future) -> None:
    """When ``future`` fails, append the call and its traceback to ``path``."""
    path = os.path.abspath(path)

    def on_done(done: Future) -> None:
        if done.cancelled() or done.exception() is None:
            return
        append_error(path, name, args, kwargs, done.exception())

    future.add_done_callback(on_done)


def append_error(path: str, name: str, args: tuple, kwargs: dict, error: BaseException) -> None:
    """One record: time, function, arguments (futures as their results), traceback
    (the worker's included). The file is created 0600 and never followed as a link."""
    shown = substitute((args, kwargs), _shown)
    record = (
        f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {name} failed\n"
        f"args: {_REPR.repr(shown[0])}\nkwargs: {_REPR.repr(shown[1])}\n"
        + "".join(traceback.format_exception(error))
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as problem:
        logger.warning("cannot append the error of %s to error_log_file %s: %s", name, path, problem)
        return
    with os.fdopen(fd, "a") as file:
        file.write(record)


def _shown(future: Future) -> Any:
    if future.done() and not future.cancelled() and future.exception() is None:
        return future.result()
    return future


def log_sizes(name: str, fn: Any, args: tuple, kwargs: dict, future: Future) -> None:
    """Log the pickled size of the call now and of its result when it arrives. Futures
    in the arguments count as a placeholder: their own results are logged as they come."""
    import cloudpickle

    placeholder = substitute((fn, args, kwargs), lambda _: None)
    try:
        size = len(cloudpickle.dumps(placeholder, protocol=5))
        logger.info("call of %s: %d bytes pickled", name, size)
    except Exception as error:  # the scheduler reports what cannot be pickled
        logger.info("call of %s: cannot be pickled (%s)", name, error)

    def on_done(done: Future) -> None:
        if not done.cancelled() and done.exception() is None:
            size = len(cloudpickle.dumps(done.result(), protocol=5))
            logger.info("result of %s: %d bytes pickled", name, size)

    future.add_done_callback(on_done)

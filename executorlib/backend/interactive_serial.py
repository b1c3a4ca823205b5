"""Worker for one process: ``python -m executorlib.backend.interactive_serial ADDRESS ID``."""

import gc
import os
import sys

from executorlib.interactive.worker import Preload, connect_from_argv, die_with_parent, run_message, serve


def main() -> None:
    die_with_parent()
    connection = connect_from_argv()
    preload = Preload(worker_id=int(sys.argv[2]))  # argv: ADDRESS WORKER_ID
    serve(connection, lambda frames: run_message(preload, frames), lambda: os._exit(1))
    # STOP: the interpreter's shutdown follows (threads joined, atexit, modules torn
    # down). Collect the garbage once, then freeze what is alive, so that shutdown's
    # own collections skip it: they were most of its ~10 ms, which the executor's
    # shutdown waits for.
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    main()

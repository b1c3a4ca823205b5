"""Worker for one process: ``python -m executorlib.backend.interactive_serial ADDRESS ID``."""

import os
import sys

from executorlib.interactive.worker import Preload, connect_from_argv, die_with_parent, run_message, serve


def main() -> None:
    die_with_parent()
    connection = connect_from_argv()
    preload = Preload(worker_id=int(sys.argv[2]))  # argv: ADDRESS WORKER_ID
    serve(connection, lambda frames: run_message(preload, frames), lambda: os._exit(1))


if __name__ == "__main__":
    main()

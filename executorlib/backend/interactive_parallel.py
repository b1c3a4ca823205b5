"""Worker for an MPI job: ``mpiexec -n N python -m executorlib.backend.interactive_parallel``.

Rank 0 talks to the executor and broadcasts each message; every rank runs the call;
rank 0 sends back the list of per-rank results, or the first failing rank's exception.
"""

import os
import pickle
import sys

from mpi4py import MPI

from executorlib import serialize
from executorlib.interactive.protocol import KEYS_ENV
from executorlib.interactive.worker import Preload, connect_from_argv, die_with_parent, run_call, serve

COMM = MPI.COMM_WORLD


def run_on_this_rank(preload: Preload, payload: list) -> bytes:
    """Run the broadcast message here; the outcome is pickled by this rank itself,
    so an unpicklable result cannot break the collective."""
    try:
        return serialize.to_bytes(run_call(preload, serialize.loads(payload)))
    except BaseException as exception:
        where = f"MPI rank {COMM.Get_rank()} of {COMM.Get_size()} on {MPI.Get_processor_name()}"
        return b"".join(serialize.dumps_failure(exception, where)[:1])


def run_everywhere(preload: Preload, frames: list) -> list | serialize.Failure:
    """Rank 0: broadcast, run, gather; the first failing rank's Failure wins."""
    payload = COMM.bcast([bytes(serialize.buffer_of(frame)) for frame in frames])
    outcomes = [pickle.loads(o) for o in COMM.gather(run_on_this_rank(preload, payload))]
    failures = [o for o in outcomes if isinstance(o, serialize.Failure)]
    return failures[0] if failures else outcomes


def main() -> None:
    die_with_parent()
    preload = Preload(worker_id=int(sys.argv[2]))  # argv: ADDRESS WORKER_ID
    if COMM.Get_rank() == 0:  # connect_from_argv reads and removes the launch's keys
        serve(connect_from_argv(), lambda frames: run_everywhere(preload, frames), lambda: os._exit(1))
        COMM.bcast(None)  # tells the other ranks to stop
        return
    os.environ.pop(KEYS_ENV, None)  # every rank got them: none of its children may
    while (payload := COMM.bcast(None)) is not None:
        COMM.gather(run_on_this_rank(preload, payload))


if __name__ == "__main__":
    main()

"""Probes of a worker's channel, in a module that imports nothing of executorlib (the
worker imports this module to unpickle them: ZeroMQ must only be there if the worker
itself imported it)."""

from __future__ import annotations

import os
import sys


def channel_facts() -> dict:
    """Whether this worker imported ZeroMQ (it talks over the same-host socket if not),
    its node, and whether the launch's keys are still in its environment."""
    return {"zmq": "zmq" in sys.modules, "node": os.uname().nodename,
            "keys": "EXECUTORLIB_KEYS" in os.environ}


def ranks_facts() -> tuple[int, dict]:
    """The MPI world size, and :func:`channel_facts` of this rank."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size(), channel_facts()

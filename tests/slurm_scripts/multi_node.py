"""Run by tests/test_slurm.py as ``sbatch -p multi -N 2``: an executor on the first
node places workers on both nodes; prints one JSON line with what it saw."""

import json
import os
import socket
import time

from executorlib import Executor


def where(seconds=0.0):
    time.sleep(seconds)
    return socket.gethostname()


def mpi_where():
    from mpi4py import MPI

    return MPI.Get_processor_name()


def attempt(future):
    try:
        return future.result(timeout=60)
    except Exception as error:
        return f"{type(error).__name__}: {error}"


report = {"executor": socket.gethostname()}
with Executor(backend="slurm_allocation", pmi_mode="pmix") as exe:
    pinned = {node: exe.submit(where, resource_dict={"slurm_cmd_args": [f"--nodelist={node}"]})
              for node in ("n1", "n2")}
    spread = [exe.submit(where, 1.0) for _ in range(8)]
    ranks = exe.submit(mpi_where, resource_dict={"cores": 2, "num_nodes": 2})
    report["pinned"] = {node: attempt(future) for node, future in pinned.items()}
    report["spread"] = sorted({attempt(future) for future in spread})
    report["mpi"] = attempt(ranks)

os.environ["EXECUTORLIB_CONNECT_TIMEOUT"] = "3"  # the worker on n2 gives up after 3 s
started = time.monotonic()
with Executor(backend="slurm_allocation", hostname_localhost=True) as exe:
    report["localhost_n1"] = attempt(exe.submit(where, resource_dict={"slurm_cmd_args": ["--nodelist=n1"]}))
    report["localhost_n2"] = attempt(exe.submit(where, resource_dict={"slurm_cmd_args": ["--nodelist=n2"]}))
report["localhost_seconds"] = time.monotonic() - started
print(json.dumps(report), flush=True)

"""Run by tests/test_flux_slurm.py as ``srun --mpi=... flux start python flux_multi_node.py``
inside ``sbatch -p multi -N 2``: a flux_allocation executor in the Flux instance that
spans both nodes places calls on both; prints one JSON line with what it saw.

    python flux_multi_node.py MARKER_DIR [PMI_MODE]
    python flux_multi_node.py --instance-only      (only what the instance holds)
"""

import json
import os
import socket
import subprocess
import sys
import time

from executorlib import Executor


def whole_node(marker_dir, name):
    """Takes a whole node (threads_per_core=2 on 2-core nodes); returns once the other
    call runs too, so the two ran at once, hence on different nodes."""
    open(os.path.join(marker_dir, name), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marker_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return socket.gethostname()


def mpi_where():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.Get_processor_name()


def attempt(future):
    try:
        return future.result(timeout=120)
    except Exception as error:
        return f"{type(error).__name__}: {error}"


marker_dir = sys.argv[1]
pmi_mode = sys.argv[2] if len(sys.argv) > 2 else None
resources = subprocess.run(["flux", "resource", "list", "--no-header", "--states=up",
                            "--format={nnodes} {ncores} {nodelist}"], capture_output=True, text=True)
report = {"executor": socket.gethostname(), "instance": resources.stdout.split()}
if marker_dir == "--instance-only":
    print(json.dumps(report), flush=True)
    sys.exit(0)
with Executor(backend="flux_allocation", pmi_mode=pmi_mode) as exe:
    nodes = [exe.submit(whole_node, marker_dir, f"m{i}", resource_dict={"threads_per_core": 2})
             for i in range(2)]
    ranks = exe.submit(mpi_where, resource_dict={"cores": 2, "num_nodes": 2})
    report["nodes"] = sorted(attempt(future) for future in nodes)
    report["mpi"] = attempt(ranks)
print(json.dumps(report), flush=True)

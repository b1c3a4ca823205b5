"""The HPC-allocation examples of the executorlib 0.0.x documentation, as written
there for ``backend="flux_allocation"`` (``flux_executor_pmi_mode="pmix"`` included):
"the only parameter the user has to change is the backend parameter".

    python hpc_allocation.py BACKEND CACHE_DIRECTORY

prints one JSON line per example; the tests run it unchanged with BACKEND = local,
slurm_allocation (inside salloc) and flux_allocation (inside flux start).
"""

import json
import sys

from executorlib import Executor

backend, cache_directory = sys.argv[1], sys.argv[2]


def calc(i):
    from mpi4py import MPI

    size = MPI.COMM_WORLD.Get_size()
    rank = MPI.COMM_WORLD.Get_rank()
    return i, size, rank


def init_function():
    return {"j": 4, "k": 3, "l": 2}


def calc_with_preload(i, j, k):
    return i + j + k


def calc_threads(i):
    import os

    return i, os.environ["OMP_NUM_THREADS"]


def add_funct(a, b):
    return a + b


def show(name, value):
    print(json.dumps({name: value}), flush=True)


with Executor(
    max_cores=2, resource_dict={"cores": 2}, backend=backend, flux_executor_pmi_mode="pmix"
) as exe:
    fs = exe.submit(calc, 3)
    show("mpi", fs.result())

with Executor(
    max_workers=2, init_function=init_function, block_allocation=True, backend=backend,
    flux_executor_pmi_mode="pmix",
) as exe:
    fs = exe.submit(calc_with_preload, 2, j=5)
    show("preload", fs.result())

with Executor(
    max_cores=2, resource_dict={"threads_per_core": 2}, backend=backend, flux_executor_pmi_mode="pmix"
) as exe:
    show("threads", exe.submit(calc_threads, 1).result())

with Executor(backend=backend, flux_executor_pmi_mode="pmix") as exe:
    future = 0
    for i in range(1, 4):
        future = exe.submit(add_funct, i, future)
    show("dependencies", future.result())

with Executor(max_workers=2, block_allocation=True, backend=backend, flux_executor_pmi_mode="pmix") as exe:
    show("map", list(exe.map(add_funct, [1, 2, 3], [4, 5, 6])))

for _ in range(2):  # the second run finds every result in the cache
    with Executor(cache_directory=cache_directory, backend=backend, flux_executor_pmi_mode="pmix") as exe:
        show("cache", [f.result() for f in [exe.submit(sum, [i, i]) for i in range(1, 4)]])

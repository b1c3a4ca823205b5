"""A one-minute tour of executorlib on the local backend: python examples/demo.py"""

import shutil
import time

from executorlib import Executor


def calc_mpi(i):
    from mpi4py import MPI

    return i, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()


def init_function():
    return {"j": 4, "k": 3, "l": 2}


def calc_with_preload(i, j, k):
    return i + j + k


def main() -> None:
    start = time.perf_counter()
    with Executor(backend="local") as exe:
        print("sum([1, 1])            ->", exe.submit(sum, [1, 1]).result())
        print("map(sum, ...)          ->", list(exe.map(sum, [[5, 5], [6, 6]])))
        future = 0
        for i in range(1, 4):
            future = exe.submit(lambda a, b: a + b, i, future)
        print("chain of futures       ->", future.result())
    with Executor(max_workers=2, block_allocation=True, init_function=init_function) as exe:
        print("block allocation       ->", exe.submit(calc_with_preload, 2, j=5).result())
    if shutil.which("mpiexec"):
        with Executor(resource_dict={"cores": 2}, max_cores=2) as exe:
            print("MPI call on 2 ranks    ->", exe.submit(calc_mpi, 3).result())
    else:
        print("MPI call               -> skipped: no mpiexec (install OpenMPI)")
    print(f"done in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

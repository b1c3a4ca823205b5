"""Workers in a container (bubblewrap) beside the same workers without one, same run.

    python benchmarks/bench_container.py [--quick]

Rows: executor start-up (submit -> first result, block allocation, 1 worker), one fresh
worker per call, block throughput (2 workers, no-op calls) and a 50 MB echo (through
/dev/shm, which bwrap binds). The container is the tests' minimal root
(scripts/container-rootfs, the host's /usr read-only, ``host_python=True``). Rounds
alternate between the two, so both see the same machine load; compare the ratio.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from executorlib import SingleNodeExecutor
from executorlib.container import host_python_binds
from executorlib.processes import import_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def noop(x=None):
    return x


def make_root(directory: str) -> dict:
    points = [bind.container for bind in host_python_binds([sys.base_prefix, sys.prefix], import_path())]
    subprocess.run([os.path.join(REPO, "scripts", "container-rootfs"), directory, *points], check=True)
    return {"runtime": "bubblewrap", "image": directory, "binds": {"/usr": "/usr:ro"}, "host_python": True}


def startup(resources: dict, block: bool) -> float:
    start = time.perf_counter()
    with SingleNodeExecutor(max_workers=1, block_allocation=block, resource_dict=resources) as exe:
        exe.submit(noop).result()
    return time.perf_counter() - start


def throughput(resources: dict, calls: int) -> float:
    with SingleNodeExecutor(max_workers=2, block_allocation=True, resource_dict=resources) as exe:
        exe.submit(noop).result()
        start = time.perf_counter()
        for future in [exe.submit(noop, i) for i in range(calls)]:
            future.result()
        return calls / (time.perf_counter() - start)


def echo(resources: dict, array: np.ndarray) -> float:
    with SingleNodeExecutor(max_workers=1, block_allocation=True, resource_dict=resources) as exe:
        exe.submit(noop).result()
        start = time.perf_counter()
        exe.submit(noop, array).result()
        return time.perf_counter() - start


def main() -> None:
    rounds, calls = (2, 200) if "--quick" in sys.argv else (5, 1000)
    array = np.ones(50 * 2**20 // 8)
    with tempfile.TemporaryDirectory() as directory:
        kinds = {"plain": {}, "bubblewrap": {"container": make_root(os.path.join(directory, "root"))}}
        rows = {
            "start-up, block (s)": lambda r: startup(r, True),
            "one worker per call (s)": lambda r: startup(r, False),
            f"block throughput, {calls} no-op calls (calls/s)": lambda r: throughput(r, calls),
            "echo of 50 MB (s)": lambda r: echo(r, array),
        }
        print(f"{'row':48} {'plain':>10} {'bubblewrap':>11} {'ratio':>6}")
        for name, measure in rows.items():
            samples = {kind: [] for kind in kinds}
            for _ in range(rounds):
                for kind, resources in kinds.items():
                    samples[kind].append(measure(resources))
            plain, contained = (statistics.median(samples[kind]) for kind in kinds)
            print(f"{name:48} {plain:10.3f} {contained:11.3f} {contained / plain:6.2f}")


if __name__ == "__main__":
    main()

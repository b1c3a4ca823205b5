"""Slurm allocation mode beside its floors, measured in the same allocation.

    python benchmarks/bench_slurm.py [--quick]

Outside an allocation the script re-runs itself under ``salloc -n 4`` (the test
cluster: ``scripts/slurm-test-cluster start``). Rows:

- a bare ``srun -n 1 --exact true`` step, and ``srun -n 1 --exact python -c pass``: the
  floor of one srun-launched Python worker (target: a call on a fresh srun worker within
  35 ms of it);
- one worker per call through srun: a call to an idle executor, and calls back to back,
  beside the same two on local workers. Local executors keep booted spare workers, so
  their idle call skips the boot; srun executors keep none (an idle spare step would
  hold CPUs a nested executor needs), so every srun call pays step start + Python boot;
- block allocation, 2 workers, 2000 no-op calls: over srun, local, and the standard
  library's ProcessPoolExecutor(2).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from startup_rows import byte_compile_executorlib

from executorlib import Executor


def noop(x=None):
    return x


def median_ms(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def bare_step_ms(repeat: int, *program: str) -> float:
    """Median of ``srun -n 1 --exact PROGRAM`` (default ``true``) in this allocation."""
    command = ["srun", "-n", "1", "--exact", "--gres=none", "--mem=0", *(program or ["true"])]
    return median_ms(lambda: subprocess.run(command, check=True), repeat)


def idle_call_ms(backend: str, repeat: int) -> float:
    """submit -> result on an executor left idle for a moment (local: its spares boot)."""
    with Executor(backend=backend) as exe:
        exe.submit(noop).result()
        samples = []
        for _ in range(repeat):
            time.sleep(0.5)  # the spare boots meanwhile
            start = time.perf_counter()
            exe.submit(noop).result()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def back_to_back_ms(backend: str, calls: int) -> float:
    with Executor(backend=backend) as exe:
        exe.submit(noop).result()
        start = time.perf_counter()
        for _ in range(calls):
            exe.submit(noop).result()
    return (time.perf_counter() - start) / calls * 1e3


def throughput(exe, calls: int) -> float:
    list(exe.map(noop, range(200)))  # warm up
    start = time.perf_counter()
    for future in [exe.submit(noop, i) for i in range(calls)]:
        future.result()
    return calls / (time.perf_counter() - start)


def block(backend: str, calls: int) -> float:
    with Executor(backend=backend, max_workers=2, block_allocation=True) as exe:
        return throughput(exe, calls)


def main(quick: bool) -> None:
    repeat, calls = (5, 500) if quick else (20, 2000)
    byte_compile_executorlib()  # as an installed wheel has it (startup_rows.py)
    bare = bare_step_ms(repeat)
    floor = bare_step_ms(repeat, sys.executable, "-c", "pass")
    srun, local = "slurm_allocation", "local"
    idle = idle_call_ms(srun, repeat)
    rows = [
        ("bare `srun -n 1 --exact true` step", f"{bare:.1f} ms", ""),
        ("`srun -n 1 --exact python -c pass` step", f"{floor:.1f} ms", "floor"),
        ("one worker per call, idle executor: srun", f"{idle:.1f} ms",
         f"floor + {idle - floor:.1f} ms (target <= floor + 35)"),
        ("one worker per call, idle executor: local", f"{idle_call_ms(local, repeat):.1f} ms", ""),
        ("one worker per call, back to back: srun", f"{back_to_back_ms(srun, repeat):.1f} ms", ""),
        ("one worker per call, back to back: local", f"{back_to_back_ms(local, repeat):.1f} ms", ""),
    ]
    srun_rate, local_rate = block(srun, calls), block(local, calls)
    with ProcessPoolExecutor(2) as pool:
        pool_rate = throughput(pool, calls)
    rows += [
        (f"block allocation, 2 workers, {calls} calls: srun", f"{srun_rate:,.0f} /s",
         f"{srun_rate / local_rate:.0%} of local (target >= 90%)"),
        (f"block allocation, 2 workers, {calls} calls: local", f"{local_rate:,.0f} /s", ""),
        (f"ProcessPoolExecutor(2), {calls} calls", f"{pool_rate:,.0f} /s", ""),
    ]
    print(f"Slurm job {os.environ['SLURM_JOB_ID']}, {os.cpu_count()} cores visible")
    width = max(len(row[0]) for row in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")


if __name__ == "__main__":
    if not os.environ.get("SLURM_JOB_ID"):
        command = ["salloc", "--ntasks=4", "--quiet", "--job-name=executorlib-bench",
                   sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        sys.exit(subprocess.run(command).returncode)
    main("--quick" in sys.argv)

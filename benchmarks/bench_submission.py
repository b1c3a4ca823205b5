"""Submission mode: time from submit of N independent calls to all results, beside N
bare ``sbatch --wrap true`` jobs on the same cluster, waited for the same way (one
``squeue`` for all jobs, back-off from 50 ms to 2 s).

    python benchmarks/bench_submission.py [N]      (needs the Slurm test cluster)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from executorlib import SlurmClusterExecutor
from executorlib.submission import LocalClusterExecutor


def work(i: int) -> int:
    return i + 1


def executor_run(cls, n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir=".") as directory:
        start = time.perf_counter()
        with cls(cache_directory=directory) as exe:
            futures = [exe.submit(work, i) for i in range(n)]
            submitted = time.perf_counter() - start
            assert [f.result() for f in futures] == [i + 1 for i in range(n)]
        return submitted, time.perf_counter() - start


def bare_sbatch(n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir=".") as directory:
        start = time.perf_counter()
        ids = [subprocess.run(["sbatch", "--parsable", f"--output={directory}/%j.out", "--wrap", "true"],
                              capture_output=True, text=True, check=True).stdout.strip() for _ in range(n)]
        submitted = time.perf_counter() - start
        interval = 0.05
        while True:
            out = subprocess.run(["squeue", "--noheader", "--format=%T", "--jobs=" + ",".join(ids)],
                                 capture_output=True, text=True).stdout.split()
            if not set(out) - {"COMPLETED", "COMPLETING"}:
                return submitted, time.perf_counter() - start
            time.sleep(interval)
            interval = min(2 * interval, 2.0)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    rows = {
        f"{n} x sbatch --wrap true": lambda: bare_sbatch(n),
        f"SlurmClusterExecutor, {n} calls": lambda: executor_run(SlurmClusterExecutor, n),
        f"LocalClusterExecutor, {n} calls (no queue)": lambda: executor_run(LocalClusterExecutor, n),
    }
    print(f"{'':<44} {'submitted (s)':>14} {'all done (s)':>13}")
    for name, measure in rows.items():
        try:
            submitted, done = measure()
        except Exception as error:  # one row failing still shows the others
            print(f"{name:<44} failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        print(f"{name:<44} {submitted:14.2f} {done:13.2f}")


if __name__ == "__main__":
    main()

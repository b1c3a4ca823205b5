"""Run by tests/test_slurm.py in ``sbatch``: 100 calls on 2 block-allocation workers,
then report which of this job's worker steps and processes are still there."""

import json
import os
import subprocess

import psutil

from executorlib import Executor


def square(i):
    return i * i


def steps_of_this_job():
    shown = subprocess.run(["squeue", "-h", "-s", "-j", os.environ["SLURM_JOB_ID"], "-o", "%i %j"],
                           capture_output=True, text=True, check=True).stdout
    return [line for line in shown.splitlines() if line.endswith(" executorlib")]


def workers_of_this_job():
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("executorlib.backend" in part for part in process.info["cmdline"] or []) and \
                    process.environ().get("SLURM_JOB_ID") == os.environ["SLURM_JOB_ID"]:
                found.append(process.info["pid"])
        except psutil.Error:
            pass
    return found


with Executor(backend="slurm_allocation", max_workers=2, block_allocation=True) as exe:
    results = list(exe.map(square, range(100), timeout=120))
    pids = {exe.submit(os.getpid).result(timeout=60) for _ in range(10)}
    running = steps_of_this_job()
print(json.dumps({
    "sum": sum(results), "worker_pids": len(pids), "steps_while_running": running,
    "steps_after": steps_of_this_job(), "workers_after": workers_of_this_job(),
}), flush=True)

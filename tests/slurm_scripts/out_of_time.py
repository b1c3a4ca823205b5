"""Run by tests/test_slurm.py in ``sbatch --time=5``: a call outlives the allocation
(it moves the job's end to now, and slurmctld ends the job at its next time check,
as it does when the time is up); prints the error the call's future got."""

import os
import signal
import subprocess
import time

from executorlib import Executor

# Slurm sends SIGTERM to this batch step too, and SIGKILL KillWait (3 s) later:
# ignore the first so the future's error can still be printed.
signal.signal(signal.SIGTERM, signal.SIG_IGN)


def outlive_allocation():
    job = os.environ["SLURM_JOB_ID"]
    subprocess.run(["scontrol", "update", f"JobId={job}", "EndTime=now"], check=True)
    time.sleep(600)


with Executor(backend="slurm_allocation") as exe:
    future = exe.submit(outlive_allocation)
    try:
        future.result(timeout=120)
        print("no error", flush=True)
    except Exception as error:
        print(f"ERROR {type(error).__name__}: {error}", flush=True)
    exe.shutdown(wait=False, cancel_futures=True)

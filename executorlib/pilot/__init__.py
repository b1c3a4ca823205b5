"""Pilot pools: ``SlurmClusterExecutor(block_allocation=True)``.

Long-lived Slurm worker jobs that the executor submits itself; each connects back over
the authenticated channel and runs many calls. Modules: executor.py (the class and its
options), pool.py (the manager thread's elastic policy, retries), placement.py (which
worker takes which call), job.py (sbatch, the job handle, the guardian), watcher.py (one
squeue for every job), alarm.py (the pool's timer), status.py (``executorlib status``).
"""

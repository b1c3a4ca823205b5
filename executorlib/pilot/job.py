"""Worker jobs: the ``sbatch`` command, the job script, and the handle the manager polls.

``PilotSpawner.start(launch)`` submits one Slurm job whose script runs one worker
(``python -c ... interactive_serial ADDRESS ID``, or ``srun --mpi=PMI`` of
``interactive_parallel`` for ``cores > 1``) and returns a :class:`PilotJob`: to the
manager thread it looks like any worker process — one pollable file descriptor (an
eventfd the shared squeue watcher writes when the job's state changes), how it ended,
``stop()``. The script goes to ``sbatch`` on stdin, so no job script file exists; the
executor's launch keys reach the job through the environment ``sbatch`` exports
(``--export=ALL``), never through argv or the script. Job output goes to a private
directory (0700) for the tail quoted in error messages.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from executorlib.interactive.spawner import Launch, worker_argv, worker_environment
from executorlib.pilot.watcher import REFUSED, JobStatus, JobWatcher
from executorlib.processes import child_environment, python_argv, tail_lines
from executorlib.queue import SubmissionError, run_command
from executorlib.resources import Resources

JOB_NAME = "executorlib-pilot"
SUBMITTING = "SUBMITTING"  # sbatch has not answered yet


@dataclass(frozen=True)
class PilotSettings:
    """What every worker job of one pool asks Slurm for, beside the workers' resources."""

    output_directory: str
    time_limit_s: int | None = None  # sbatch --time (rounded up to minutes); None: partition default
    pmi_mode: str | None = "pmix"  # srun --mpi= for MPI workers (cores > 1)


def sbatch_argv(resources: Resources, settings: PilotSettings, worker_id: int) -> list[str]:
    """The ``sbatch`` command line of one worker job (the script comes on stdin)."""
    output = output_pattern(settings, worker_id)
    argv = ["sbatch", "--parsable", f"--job-name={JOB_NAME}", f"--output={output}",
            f"--ntasks={resources.cores}", f"--cpus-per-task={resources.threads_per_core}"]
    if settings.time_limit_s is not None:
        argv.append(f"--time={math.ceil(settings.time_limit_s / 60)}")
    if resources.partition:
        argv.append(f"--partition={resources.partition}")
    if resources.gpus_per_core:
        argv.append(f"--gpus-per-task={math.ceil(resources.gpus_per_core)}")
    if resources.num_nodes is not None:
        argv.append(f"--nodes={resources.num_nodes}")
    if resources.exclusive:
        argv.append("--exclusive")
    if resources.memory_max:
        argv.append(f"--mem={math.ceil(resources.memory_max * 1024)}M")
    if resources.cwd:
        argv.append(f"--chdir={resources.cwd}")
    return [*argv, *resources.slurm_cmd_args]


def output_pattern(settings: PilotSettings, worker_id: int) -> str:
    """Where a worker job writes its output (``%j``: Slurm puts the job id there)."""
    return os.path.join(settings.output_directory, f"worker-{worker_id}-%j.out")


def job_script(launch: Launch, settings: PilotSettings) -> str:
    """The job script: ``exec`` the worker, so the job ends when the worker does (in
    ``resource_dict["container"]`` where given: ``worker_argv`` wraps it, inside srun)."""
    if launch.resources.cores == 1:
        command = worker_argv("interactive_serial", launch)
    else:
        mpi = [f"--mpi={settings.pmi_mode}"] if settings.pmi_mode else []
        command = ["srun", "--kill-on-bad-exit=1", *mpi, *worker_argv("interactive_parallel", launch)]
    return f"#!/bin/bash\nexec {shlex.join(command)}\n"


def job_environment(launch: Launch) -> dict[str, str]:
    """The worker's environment, minus the Slurm variables of the job we may run in
    (slurmd sets the worker job's own); ``SLURM_CONF`` and the user's ``env`` stay."""
    env = worker_environment(launch)
    keep = {"SLURM_CONF", *launch.resources.env}
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") or k in keep}


class Guardian:
    """The pool's dead man's switch (``executorlib.backend.pilot_guardian``): a small
    process that cancels the jobs we still hold if this process dies without doing so."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            python_argv("pilot_guardian"), stdin=subprocess.PIPE, text=True,
            env=child_environment(Resources()), start_new_session=True,
        )

    def add(self, job_id: str) -> None:
        self._write(f"+{job_id}\n")

    def remove(self, job_id: str) -> None:
        self._write(f"-{job_id}\n")

    def _write(self, line: str) -> None:
        try:
            self._process.stdin.write(line)
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):  # closed: the pool is shutting down
            pass

    def close(self) -> None:
        """Let it go: it cancels what is still listed, then exits."""
        if self._process.stdin and not self._process.stdin.closed:
            self._process.stdin.close()
        self._process.wait(timeout=180)


class PilotJob:
    """One worker job, as the manager sees it (the ``WorkerProcess`` interface).

    Made before ``sbatch`` has answered (``job_id`` None, state SUBMITTING): the spawner's
    submit thread fills in the job id, or the refusal, and writes the eventfd.
    """

    def __init__(self, output_pattern: str, watcher: JobWatcher, guardian: Guardian,
                 time_limit_s: int | None) -> None:
        self.job_id: str | None = None
        self.output_pattern = output_pattern
        self._watcher, self._guardian = watcher, guardian
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._cancel_asked = False
        self.submitted = time.time()
        self._limit = time_limit_s
        self.status = JobStatus(SUBMITTING)
        self.refusal: SubmissionError | None = None
        self.idle_since = time.monotonic()
        self.calls_done = 0
        self.cancel_reason: str | None = None  # why we cancelled it, if we did

    # ------------------------------------------------ from the submit thread
    def submitted_as(self, job_id: str) -> None:
        """sbatch answered ``job_id``: watch it (cancel it at once if asked meanwhile)."""
        with self._lock:
            self.job_id = job_id
            self._guardian.add(job_id)
            self._watcher.track(job_id, self._fd)
            cancel = self._cancel_asked
        if cancel:
            self._scancel()

    def refused(self, error: SubmissionError) -> None:
        self.refusal = error
        os.eventfd_write(self._fd, 1)

    # -------------------------------------------------- WorkerProcess interface
    def fds(self) -> list[int]:
        return [self._fd]

    def on_readable(self, fd: int) -> bool:
        """Take the news (watcher or submit thread); True once the job has ended."""
        os.eventfd_read(self._fd)
        if self.refusal is not None:
            self.status = JobStatus(REFUSED, str(self.refusal))
        elif self.job_id is not None:
            self.status = self._watcher.status(self.job_id)
        if not self.status.final:
            return False
        if self.job_id is not None:
            self._watcher.forget(self.job_id)
            self._guardian.remove(self.job_id)
        os.close(self._fd)
        return True

    def how_it_ended(self) -> str:
        """Job id, node, Slurm's state and reason, and the tail of the job's output."""
        if self.refusal is not None:
            return str(self.refusal)
        status = self.status
        where = f" on {status.node}" if status.node else ""
        reason = f" ({status.reason})" if status.reason else ""
        text = f"Slurm job {self.job_id}{where} ended {status.state}{reason}"
        if self.cancel_reason:
            text += f"; executorlib cancelled it: {self.cancel_reason}"
        lines = tail_lines(self.output_pattern.replace("%j", str(self.job_id)))
        return text + ("; last lines of its output:\n    " + "\n    ".join(lines) if lines else "")

    def stop(self, reason: str | None = None) -> None:
        """``scancel`` the job (the watcher then reports its end); before sbatch has
        answered, the submit thread cancels it as soon as it has an id."""
        if self.cancel_reason is None:
            self.cancel_reason = reason or "the executor stopped it"
        with self._lock:
            self._cancel_asked = True
            if self.job_id is None:
                return
        self._scancel()

    def _scancel(self) -> None:
        try:
            run_command(["scancel", str(self.job_id)], f"cancelling worker job {self.job_id}")
        except SubmissionError as error:  # it ended meanwhile, or Slurm is unreachable
            print(f"executorlib: {error}", file=sys.stderr)
        self._watcher.kick()

    # ------------------------------------------------------------- for the pool
    @property
    def pending(self) -> bool:
        return self.status.state in (SUBMITTING, "PENDING", "CONFIGURING")

    def end_time(self) -> float:
        """When Slurm will end the job; until squeue has said, a lower bound (the job
        cannot have started before it was submitted)."""
        if self.status.end_time is not None and self.status.state == "RUNNING":
            return self.status.end_time
        return math.inf if self._limit is None else self.submitted + self._limit

    def time_left(self) -> float:
        return self.end_time() - time.time()

    def kick(self) -> None:
        self._watcher.kick()


class PilotSpawner:
    """Workers as Slurm jobs that connect back to this host (``Spawner`` protocol).

    ``sbatch`` runs in one submit thread, so a slow controller never stalls the manager
    thread (results keep flowing while the pool grows); jobs are submitted in order.
    """

    name = "Slurm pilot job"

    def __init__(self, settings: PilotSettings, bind_host: str | None = None) -> None:
        self.settings = settings
        self.bind_host = bind_host or socket.gethostname()
        _warn_if_loopback(self.bind_host)
        self._watcher = JobWatcher.shared()
        self._guardian = Guardian()
        self._submitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executorlib-sbatch")

    def start(self, launch: Launch) -> PilotJob:
        """The job of ``launch``, submitted in the background (its fd tells the outcome)."""
        output = output_pattern(self.settings, launch.worker_id)
        job = PilotJob(output, self._watcher, self._guardian, self.settings.time_limit_s)
        argv = sbatch_argv(launch.resources, self.settings, launch.worker_id)
        script, env = job_script(launch, self.settings), job_environment(launch)
        self._submitter.submit(self._submit, job, argv, script, env)
        return job

    def _submit(self, job: PilotJob, argv: list[str], script: str, env: dict[str, str]) -> None:
        try:
            done = subprocess.run(argv, input=script, capture_output=True, text=True, env=env, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            job.refused(SubmissionError(f"submitting a worker job: sbatch could not run: {error}"))
            return
        if done.returncode != 0:
            job.refused(SubmissionError(
                f"sbatch refused the worker job ({shlex.join(argv[3:])}): {done.stderr.strip()}; "
                "check the pool's resource_dict (partition, cores, slurm_cmd_args)"
            ))
            return
        job.submitted_as(done.stdout.strip().splitlines()[-1].split(";")[0])

    def close(self) -> None:
        self._submitter.shutdown(wait=True)
        self._guardian.close()


def _warn_if_loopback(host: str) -> None:
    """Workers on other nodes connect to ``host``: say so early if it means loopback."""
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return  # binding reports it, with a clear message (channel.py)
    if address.startswith("127."):
        logging.getLogger("executorlib").warning(
            "executorlib: this host's name %r resolves to %s (loopback): worker jobs on other "
            "nodes will not reach the executor; make the name resolve to an address the compute "
            "nodes reach (/etc/hosts or DNS)", host, address,
        )

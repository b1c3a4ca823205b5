"""Worker jobs: the ``sbatch`` command, the job script, and the handle the manager polls.

``PilotSpawner.start(launch)`` submits one Slurm job whose script runs one worker
(``python -c ... interactive_serial ADDRESS ID``, or ``srun --mpi=PMI`` of
``interactive_parallel`` for ``cores > 1``) and returns a :class:`PilotWorker`: to the
manager thread it looks like any worker process — one pollable file descriptor (an
eventfd the shared squeue watcher writes when its :class:`PilotJob`'s state changes),
how it ended, ``stop()``. Inside ``with spawner.one_job():`` the workers started share
one job (``workers_per_job``): the job asks for N times one worker's tasks, its script
starts the N workers in the background (MPI workers: N ``srun --exact`` steps) and ends
when the last has exited, or at once, killing the others, when one fails.

The script goes to ``sbatch`` on stdin, so no job script file exists; each worker's
launch keys reach the job through the environment ``sbatch`` exports (``--export=ALL``),
never through argv or the script (N workers: ``EXECUTORLIB_KEYS_<i>``, which the script
moves into worker i's ``EXECUTORLIB_KEYS`` and unsets, so no worker sees another's key).
Job output goes to a private directory (0700) for the tail quoted in error messages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from executorlib.container import copies_of
from executorlib.interactive.auth import KEYS_ENV
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
    workers_per_job: int = 1  # workers started together in one job


def sbatch_argv(resources: Resources, settings: PilotSettings, worker_id: int) -> list[str]:
    """The ``sbatch`` command line of one worker job (the script comes on stdin)."""
    output, workers = output_pattern(settings, worker_id), settings.workers_per_job
    argv = ["sbatch", "--parsable", f"--job-name={JOB_NAME}", f"--output={output}",
            f"--ntasks={resources.cores * workers}", f"--cpus-per-task={resources.threads_per_core}"]
    if settings.time_limit_s is not None:
        argv.append(f"--time={math.ceil(settings.time_limit_s / 60)}")
    if resources.partition:
        argv.append(f"--partition={resources.partition}")
    if resources.gpus_per_core:
        argv.append(f"--gpus-per-task={math.ceil(resources.gpus_per_core)}")
    if resources.num_nodes is not None:
        argv.append(f"--nodes={resources.num_nodes}")
    elif workers > 1 and resources.cores == 1:
        argv.append("--nodes=1")  # serial workers run beside the job script, on its node
    if resources.exclusive:
        argv.append("--exclusive")
    if resources.memory_max:
        argv.append(f"--mem={math.ceil(resources.memory_max * 1024 * workers)}M")
    if resources.cwd:
        argv.append(f"--chdir={resources.cwd}")
    return [*argv, *resources.slurm_cmd_args]


def output_pattern(settings: PilotSettings, worker_id: int) -> str:
    """Where a worker job writes its output (``%j``: Slurm puts the job id there)."""
    return os.path.join(settings.output_directory, f"worker-{worker_id}-%j.out")


def worker_command(launch: Launch, settings: PilotSettings, shared: bool = False) -> list[str]:
    """One worker's command line; ``shared``: one of several MPI workers of the job, so
    its ``srun`` step takes only its own tasks (``--exact``)."""
    if launch.resources.cores == 1:
        return worker_argv("interactive_serial", launch)
    mpi = [f"--mpi={settings.pmi_mode}"] if settings.pmi_mode else []
    step = []
    if shared:  # srun of Slurm 22.05 does not take --cpus-per-task from the job
        resources = launch.resources
        step = ["--exact", f"--ntasks={resources.cores}", f"--cpus-per-task={resources.threads_per_core}"]
        step += [f"--gpus-per-task={math.ceil(resources.gpus_per_core)}"] if resources.gpus_per_core else []
    return ["srun", "--kill-on-bad-exit=1", *step, *mpi, *worker_argv("interactive_parallel", launch)]


def job_script(launches: list[Launch], settings: PilotSettings) -> str:
    """The job script: ``exec`` a lone worker, so the job ends when the worker does;
    several: each in the background with its own key, the job ending with the last (at
    once, the others killed, when one fails: its calls and theirs are then failed over)."""
    if len(launches) == 1:
        return f"#!/bin/bash\nexec {shlex.join(worker_command(launches[0], settings))}\n"
    names = [f"{KEYS_ENV}_{i}" for i in range(len(launches))]
    lines = ["#!/bin/bash", "keys=(" + " ".join(f'"${name}"' for name in names) + ")",
             "unset " + " ".join(names)]
    lines += [" ".join(f'{name}="${{keys[{i}]}}"' for name in _key_names(launch))
              + f" {shlex.join(worker_command(launch, settings, True))} &"
              for i, launch in enumerate(launches)]
    lines += ["unset keys", f"for _ in {' '.join(map(str, range(len(launches))))}; do",
              '  wait -n || { code=$?; kill $(jobs -p) 2>/dev/null; wait; exit "$code"; }', "done"]
    return "\n".join(lines) + "\n"


def _key_names(launch: Launch) -> list[str]:
    """The variables that carry a worker's key: ours, and a container runtime's copy."""
    spec = launch.resources.container
    return [KEYS_ENV, *(copies_of(spec, KEYS_ENV) if spec is not None else [])]


def job_environment(launches: list[Launch]) -> dict[str, str]:
    """The workers' environment, minus the Slurm variables of the job we may run in
    (slurmd sets the worker job's own); ``SLURM_CONF`` and the user's ``env`` stay.
    Several workers: worker i's key as ``EXECUTORLIB_KEYS_<i>`` (see job_script)."""
    env = worker_environment(launches[0])
    if len(launches) > 1:
        for name in _key_names(launches[0]):
            del env[name]
        env.update((f"{KEYS_ENV}_{i}", launch.keys.to_env()) for i, launch in enumerate(launches))
    keep = {"SLURM_CONF", *launches[0].resources.env}
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
    """One worker job (one ``sbatch``): its id, Slurm's word on it, how to cancel it.

    Made before ``sbatch`` has answered (``job_id`` None, state SUBMITTING): the spawner's
    submit thread fills in the job id, or the refusal. Each of its workers has an eventfd
    (``add_worker``), written by the watcher or the submit thread when there is news.
    """

    def __init__(self, output_pattern: str, watcher: JobWatcher, guardian: Guardian,
                 time_limit_s: int | None) -> None:
        self.job_id: str | None = None
        self.output_pattern = output_pattern
        self._watcher, self._guardian = watcher, guardian
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._cancel_asked = False
        self._released = False
        self.submitted = time.time()
        self._limit = time_limit_s
        self.status = JobStatus(SUBMITTING)
        self.refusal: SubmissionError | None = None
        self.cancel_reason: str | None = None  # why we cancelled it, if we did
        self.connected = False  # one of its workers has connected (the pool sets it)
        self.reported = False  # the pool has accounted for its end

    def add_worker(self) -> PilotWorker:
        """One more worker of this job (before it is submitted)."""
        worker = PilotWorker(self, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self._fds.append(worker.fd)
        return worker

    @property
    def size(self) -> int:
        """How many workers the job hosts."""
        return len(self._fds)

    # ------------------------------------------------ from the submit thread
    def submitted_as(self, job_id: str) -> None:
        """sbatch answered ``job_id``: watch it (cancel it at once if asked meanwhile)."""
        with self._lock:
            self.job_id = job_id
            self._guardian.add(job_id)
            self._watcher.track(job_id, self._fds)
            cancel = self._cancel_asked
        if cancel:
            self._scancel()

    def refused(self, error: SubmissionError) -> None:
        self.refusal = error
        for fd in self._fds:
            os.eventfd_write(fd, 1)

    # ------------------------------------------------------- from the manager
    def refresh(self) -> bool:
        """Take the news (watcher or submit thread); True once the job has ended."""
        if self.status.final:
            return True
        if self.refusal is not None:
            self.status = JobStatus(REFUSED, str(self.refusal))
        elif self.job_id is not None:
            self.status = self._watcher.status(self.job_id)
        if self.status.final and self.job_id is not None and not self._released:
            self._released = True
            self._watcher.forget(self.job_id)
            self._guardian.remove(self.job_id)
        return self.status.final

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
        """``scancel`` the job, once (the watcher then reports its end); before sbatch
        has answered, the submit thread cancels it as soon as it has an id."""
        if self.cancel_reason is None:
            self.cancel_reason = reason or "the executor stopped it"
        with self._lock:
            if self._cancel_asked:
                return
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


class PilotWorker:
    """One worker of a :class:`PilotJob`, as the manager sees it (the ``WorkerProcess``
    interface): it ends when its job does; stopping it cancels the job."""

    def __init__(self, job: PilotJob, fd: int) -> None:
        self.job, self.fd = job, fd
        self.idle_since = time.monotonic()
        self.calls_done = 0

    def fds(self) -> list[int]:
        return [self.fd]

    def on_readable(self, fd: int) -> bool:
        """True once the job has ended (this worker's eventfd is then closed)."""
        os.eventfd_read(self.fd)
        if not self.job.refresh():
            return False
        os.close(self.fd)
        return True

    def how_it_ended(self) -> str:
        return self.job.how_it_ended()

    def stop(self, reason: str | None = None) -> None:
        self.job.stop(reason)


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
        self._open: tuple[PilotJob, list[Launch]] | None = None  # the job being gathered
        self._gathering = False

    @contextlib.contextmanager
    def one_job(self) -> Iterator[None]:
        """The workers started inside share one job, submitted when the block ends."""
        self._gathering = True
        try:
            yield
        finally:
            opened, self._open, self._gathering = self._open, None, False
            if opened is not None:
                self._submit_job(*opened)

    def start(self, launch: Launch) -> PilotWorker:
        """The worker of ``launch``, in a job submitted in the background (its fd tells
        the outcome): a job of its own, or the one of the enclosing ``one_job()``."""
        if self._open is None:
            output = output_pattern(self.settings, launch.worker_id)
            job = PilotJob(output, self._watcher, self._guardian, self.settings.time_limit_s)
            self._open = (job, [])
        job, launches = self._open
        launches.append(launch)
        worker = job.add_worker()
        if not self._gathering:
            self._open = None
            self._submit_job(job, launches)
        return worker

    def _submit_job(self, job: PilotJob, launches: list[Launch]) -> None:
        argv = sbatch_argv(launches[0].resources, self.settings, launches[0].worker_id)
        script, env = job_script(launches, self.settings), job_environment(launches)
        self._submitter.submit(self._submit, job, argv, script, env)

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

"""Queue adapters for submission mode: submit a job script, read states, cancel.

Each adapter answers the same four questions for the watcher in submission.py:
``command`` (how the job runs the call), ``submit`` (a job id, or the queue's own
refusal as a ``SubmissionError``), ``states`` (one call for all job ids) and
``cancel``. Slurm is driven through ``sbatch``/``squeue``/``scancel`` directly rather
than through pysqa, because pysqa's command wrapper swallows ``sbatch``'s error message
into a file and reports every job that left ``squeue`` as "finished", where we need the
refusal text and the final state (FAILED, TIMEOUT, CANCELLED...) and pending reason.
pysqa is used for site configurations (``pysqa_config_directory``: PBS, LSF, SGE...).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass

from executorlib.files import create_private, write_text
from executorlib.jobscript import render_script, script_variables
from executorlib.processes import child_environment, mpiexec_prefix, python_argv
from executorlib.resources import Resources
from executorlib.taskfiles import TaskFiles

# Slurm states after which a job will not write anything any more.
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT", "SPECIAL_EXIT",
})
NEVER_STARTS = "DependencyNeverSatisfied"


class SubmissionError(RuntimeError):
    """The queue refused a job; the message holds the queue's own words."""


@dataclass(frozen=True)
class JobSpec:
    """One job to submit: its files (executorlib.taskfiles) and what it asks for."""

    job_name: str
    files: TaskFiles
    working_directory: str
    resources: Resources
    dependency: tuple[str, ...] = ()

    @property
    def task_file(self) -> str:
        return self.files.task

    @property
    def script_file(self) -> str:
        return self.files.script

    @property
    def output_file(self) -> str:
        return self.files.output


@dataclass(frozen=True)
class JobState:
    """What the queue says about a job: e.g. ``("PENDING", "Dependency")``."""

    state: str
    reason: str = ""
    name: str = ""  # the job's name where the queue reports it (Flux); "" = not reported

    def belongs_to(self, key: str) -> bool:
        """Whether this job can be the one submitted for the call ``key``: its name is
        the key. A new Flux instance hands out job ids again, so an id alone can name
        another job."""
        return not self.name or self.name == key

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def never_starts(self) -> bool:
        return self.reason == NEVER_STARTS


def run_command(argv: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run a queue command; its stdout, or a SubmissionError with its stderr."""
    try:
        # umask 077: files the queue creates for the job (Slurm's --output) are private
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, umask=0o077)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SubmissionError(f"{what}: {shlex.join(argv[:3])} could not run: {error}") from error
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise SubmissionError(f"{what}: {argv[0]} refused (exit code {done.returncode}): {message}")
    return done.stdout


def python_command(module: str, spec: JobSpec) -> str:
    return shlex.join(python_argv(module, spec.task_file))


class SlurmQueue:
    """``sbatch`` / ``squeue`` / ``scancel``; MPI calls run under ``srun --mpi=PMI``."""

    name = "Slurm"

    def __init__(self, pmi_mode: str = "pmix") -> None:
        self.pmi_mode = pmi_mode

    def command(self, spec: JobSpec) -> str:
        if spec.resources.cores == 1:
            return python_command("cache_serial", spec)
        return f"srun --mpi={self.pmi_mode} {python_command('cache_parallel', spec)}"

    def submit(self, spec: JobSpec) -> str:
        write_text(spec.script_file, render_script(spec, self.command(spec)))
        argv = ["sbatch", "--parsable", f"--job-name={spec.job_name}", f"--output={spec.output_file}",
                "--kill-on-invalid-dep=yes"]
        if spec.resources.error_log_file:
            create_private(spec.resources.error_log_file)
            argv.append(f"--error={os.path.abspath(spec.resources.error_log_file)}")
        if spec.dependency:
            argv.append("--dependency=afterok:" + ":".join(spec.dependency))
        argv += [*spec.resources.slurm_cmd_args, spec.script_file]
        out = run_command(argv, f"submitting {spec.job_name}", child_environment(spec.resources))
        return out.strip().splitlines()[-1].split(";")[0]

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        argv = ["squeue", "--noheader", "--states=all", "--format=%i|%T|%r", "--jobs=" + ",".join(job_ids)]
        found = {}
        for line in run_command(argv, "reading job states").splitlines():
            job_id, state, reason = (line.strip().split("|") + ["", ""])[:3]
            found[job_id] = JobState(state, reason)
        return found

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            run_command(["scancel", *job_ids], "cancelling jobs")


class FluxQueue:
    """``flux batch`` / ``flux jobs`` / ``flux cancel`` (needs a running Flux instance)."""

    name = "Flux"
    _STATES = {"DEPEND": "PENDING", "PRIORITY": "PENDING", "SCHED": "PENDING", "RUN": "RUNNING",
               "CLEANUP": "COMPLETING"}
    _RESULTS = {"COMPLETED": "COMPLETED", "FAILED": "FAILED", "CANCELED": "CANCELLED",
                "TIMEOUT": "TIMEOUT"}
    _UNKNOWN = re.compile(r"JobID \S+ unknown")

    def command(self, spec: JobSpec) -> str:
        if spec.resources.cores == 1:
            return python_command("cache_serial", spec)
        return f"flux run -n {spec.resources.cores} {python_command('cache_parallel', spec)}"

    def submit(self, spec: JobSpec) -> str:
        template = spec.resources.submission_template or "#!/bin/bash\n{{ command }}\n"
        script = render_script(_with_template(spec, template), self.command(spec))
        with open(spec.script_file, "w") as file:
            file.write(script)
        resources = spec.resources
        argv = ["flux", "batch", f"--job-name={spec.job_name}", f"--output={spec.output_file}",
                f"--nslots={resources.cores}", f"--cores-per-slot={resources.threads_per_core}"]
        argv += [f"--dependency=afterok:{job_id}" for job_id in spec.dependency]
        if resources.run_time_max:
            argv.append(f"--time-limit={resources.run_time_max}s")
        out = run_command([*argv, spec.script_file], f"submitting {spec.job_name}",
                          child_environment(resources))
        return out.strip().splitlines()[-1]

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        """States of the jobs this instance knows; ids it does not know are left out:
        they belong to an instance that has ended (``flux jobs`` names each on stderr
        and exits 1 when it knows none of them)."""
        argv = ["flux", "jobs", "--no-header", "--format={id.f58}|{state}|{result}|{name}", *job_ids]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SubmissionError(f"reading job states: flux jobs could not run: {error}") from error
        problems = [line for line in done.stderr.splitlines() if not self._UNKNOWN.fullmatch(line.strip())]
        if problems or done.returncode not in (0, 1):
            message = "\n".join(problems) or done.stdout.strip()
            raise SubmissionError(
                f"reading job states: flux jobs refused (exit code {done.returncode}): {message}"
            )
        return self.parse_states(done.stdout)

    @classmethod
    def parse_states(cls, text: str) -> dict[str, JobState]:
        """``flux jobs`` lines ``ID|STATE|RESULT|NAME`` as Slurm-style states."""
        found = {}
        for line in text.splitlines():
            job_id, state, result, name = ([part.strip() for part in line.split("|", 3)] + ["", "", ""])[:4]
            if state == "INACTIVE":
                found[job_id] = JobState(cls._RESULTS.get(result, result or "COMPLETED"), name=name)
            elif job_id:
                found[job_id] = JobState(cls._STATES.get(state, state), name=name)
        return found

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            run_command(["flux", "cancel", *job_ids], "cancelling jobs")


def _with_template(spec: JobSpec, template: str) -> JobSpec:
    from dataclasses import replace

    return replace(spec, resources=replace(spec.resources, submission_template=template))


class PysqaQueue:
    """Any queue system pysqa knows (SLURM, PBS/Torque, LSF, SGE, Flux...), configured by
    a pysqa configuration directory (``queue.yaml`` + templates)."""

    name = "pysqa"
    _STATES = {"running": "RUNNING", "pending": "PENDING", "finished": "COMPLETED", "error": "FAILED"}

    def __init__(self, config_directory: str) -> None:
        try:
            from pysqa import QueueAdapter
        except ImportError as error:
            raise ImportError(
                "pysqa_config_directory needs pysqa: pip install 'executorlib[submission]'"
            ) from error
        self._adapter = QueueAdapter(directory=config_directory, execute_command=_pysqa_execute)

    def command(self, spec: JobSpec) -> str:
        if spec.resources.cores == 1:
            return python_command("cache_serial", spec)
        return f"mpiexec -n {spec.resources.cores} {python_command('cache_parallel', spec)}"

    def submit(self, spec: JobSpec) -> str:
        resources = spec.resources
        _plain_words(spec, self.command(spec))
        job_id = self._adapter.submit_job(
            queue=resources.partition, job_name=spec.job_name, working_directory=spec.working_directory,
            cores=resources.cores, memory_max=resources.memory_max, run_time_max=resources.run_time_max,
            dependency_list=[_as_int(job_id) for job_id in spec.dependency] or None,
            command=self.command(spec), submission_template=resources.submission_template,
        )
        return str(job_id)

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        states = self._adapter.get_status_of_jobs([_as_int(job_id) for job_id in job_ids])
        return {job_id: JobState(self._STATES.get(state, str(state).upper()))
                for job_id, state in zip(job_ids, states, strict=True)}

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self._adapter.delete_job(_as_int(job_id))


def _plain_words(spec: JobSpec, command: str) -> None:
    """pysqa renders its templates itself, without quoting: refuse any value that a job
    script would not read as one plain word."""
    variables = script_variables(spec, command)  # refuses line breaks
    for name in ("job_name", "working_directory", "partition"):
        value = variables[name]
        if value is not None and shlex.quote(str(value)) != str(value):
            raise SubmissionError(
                f"cannot submit {spec.job_name} through pysqa: {name}={value!r} holds characters "
                "(spaces, quotes, $, ;...) that pysqa writes into the job script unquoted; use a "
                "folder and names without them, or submit without pysqa_config_directory"
            )


def _as_int(job_id: str) -> int | str:
    return int(job_id) if job_id.isdigit() else job_id


def _pysqa_execute(commands: list[str] | str, working_directory: str | None = None,
                   split_output: bool = True, shell: bool = False, error_filename: str = "") -> str | list:
    """pysqa's command runner, except that a refusal raises with the queue's message."""
    argv = commands if isinstance(commands, list) else shlex.split(commands)
    done = subprocess.run(argv, cwd=working_directory, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise SubmissionError(f"{argv[0]} refused (exit code {done.returncode}): {message}")
    return done.stdout.split("\n") if split_output else done.stdout


class LocalQueue:
    """Jobs as local processes running the same job scripts and files; for machines
    without a queue (and for tests). ``afterok`` is kept here: a job starts once its
    dependencies exited 0. Job ids are only known to this process: a second process
    re-attaches to finished results, and runs again what was still running."""

    name = "local"

    def __init__(self) -> None:
        self._jobs: dict[str, _LocalJob] = {}

    def command(self, spec: JobSpec) -> str:
        if spec.resources.cores == 1:
            return python_command("cache_serial", spec)

        return f"{shlex.join(mpiexec_prefix(spec.resources))} {python_command('cache_parallel', spec)}"

    def submit(self, spec: JobSpec) -> str:
        write_text(spec.script_file, render_script(spec, self.command(spec)))
        unknown = [job_id for job_id in spec.dependency if job_id not in self._jobs]
        if unknown:
            raise SubmissionError(f"submitting {spec.job_name}: unknown dependency job ids {unknown}")
        job_id = f"local-{os.getpid()}-{len(self._jobs) + 1}"
        self._jobs[job_id] = _LocalJob(spec)
        self._advance()
        return job_id

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        self._advance()
        return {job_id: self._jobs[job_id].state() for job_id in job_ids if job_id in self._jobs}

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            if job_id in self._jobs:
                self._jobs[job_id].cancel()

    def _advance(self) -> None:
        """Start the held jobs whose dependencies all completed; drop the hopeless."""
        for job in self._jobs.values():
            if job.process is None and not job.cancelled:
                upstream = [self._jobs[job_id].state() for job_id in job.spec.dependency]
                if any(state.final and state.state != "COMPLETED" for state in upstream):
                    job.never_starts = True
                elif all(state.state == "COMPLETED" for state in upstream):
                    job.start()


class _LocalJob:
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.process: subprocess.Popen | _NeverStarted | None = None
        self.cancelled = False
        self.never_starts = False

    def start(self) -> None:
        """Run the job script; if it cannot start (e.g. its cwd is missing), the job fails
        with the reason as its output."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(self.spec.output_file, flags, 0o600), "wb") as output:
            try:
                self.process = subprocess.Popen(
                    ["bash", self.spec.script_file], stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, cwd=self.spec.working_directory,
                    env=child_environment(self.spec.resources), start_new_session=True,
                )
            except OSError as error:
                output.write(f"the job could not start: {error}\n".encode())
                self.process = _NeverStarted()

    def state(self) -> JobState:
        if self.process is None:
            if self.cancelled:
                return JobState("CANCELLED")
            return JobState("PENDING", NEVER_STARTS if self.never_starts else "Dependency")
        code = self.process.poll()
        if code is None:
            return JobState("RUNNING")
        return JobState("CANCELLED" if self.cancelled else "COMPLETED" if code == 0 else "FAILED")

    def cancel(self) -> None:
        self.cancelled = True
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended by itself
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class _NeverStarted:
    """A local job whose process could not be started: it failed."""

    pid = 0

    def poll(self) -> int:
        return 127

    def wait(self) -> int:
        return 127

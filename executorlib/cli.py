"""The ``executorlib`` command, for people at a terminal.

    executorlib hello [--backend B]                 does backend B work here? (a tiny call + an MPI call)
    executorlib status DIR [--json]                 one row per call in a cache/submission directory
    executorlib cancel DIR                          cancel its queue jobs still queued or running
    executorlib clean DIR [--failed-only] [--yes]   remove its files, asking first

Heavy modules (h5py, the executors) are imported by the subcommand that needs them, so
``executorlib --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from executorlib.queue import SubmissionError

_EXAMPLES = """\
examples:
  executorlib hello                                   local processes and mpiexec
  salloc -n 2 executorlib hello --backend slurm_allocation
  executorlib hello --backend slurm_submission        one sbatch job per call, from a login node
  executorlib status executorlib_cache                what ran, what failed, what is queued
  executorlib cancel executorlib_cache && executorlib clean executorlib_cache --failed-only
"""
_PMI_HINT = (
    "hint: MPI could not talk to the launcher (an MPI/PMI mismatch). Pick the PMI your MPI was "
    "built with: `--pmi-mode pmix` (srun --mpi=pmix; `srun --mpi=list` shows what Slurm offers)"
)


# ---------------------------------------------------------------- hello
def hello_python() -> dict:
    """The tiny call of ``executorlib hello``: where did it run?"""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def hello_mpi() -> tuple[int, int, str]:
    """The MPI call of ``executorlib hello``: (rank, size, host) on every rank."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), MPI.Get_processor_name()


def _describe(label: str, value: Any) -> str:
    if label.startswith("MPI"):
        ranks = ", ".join(str(rank) for rank, _, _ in value)
        hosts = ", ".join(sorted({host for _, _, host in value}))
        return f"ranks {ranks} of {value[0][1]} on {hosts}"
    return f"host {value['host']}, pid {value['pid']}"


def _precheck(backend: str, pmi_mode: str | None) -> str | None:
    """Why ``backend`` cannot work from here, in words that say what to run instead."""
    if backend == "local" and pmi_mode is not None:
        return "--pmi-mode is for srun and Flux; the local backend starts MPI with mpiexec, which needs none"
    if backend == "slurm_allocation" and not os.environ.get("SLURM_JOB_ID"):
        return ("not inside a Slurm allocation (SLURM_JOB_ID is not set): run it under "
                "`salloc -n 2 executorlib hello --backend slurm_allocation`, or try "
                "`executorlib hello --backend slurm_submission` to submit jobs from here")
    for name, command in (("slurm_submission", "sbatch"), ("flux_submission", "flux")):
        if backend == name and shutil.which(command) is None:
            return (f"'{command}' is not on PATH, so no job can be submitted from here: run it on "
                    "a login node of the cluster (or load its scheduler module)")
    return None


def cmd_hello(args: argparse.Namespace) -> int:
    via = f", through ssh to {args.ssh}" if args.ssh else ""
    print(f"executorlib hello --backend {args.backend} (from {socket.gethostname()}{via})")
    remote = _ssh_options(args)
    if not remote and (problem := _precheck(args.backend, args.pmi_mode)) is not None:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2
    submission = args.backend.endswith("_submission")
    directory = None
    options: dict[str, Any] = {} if args.pmi_mode is None else {"pmi_mode": args.pmi_mode}
    if submission:  # job files must be on a file system the compute nodes see: the cwd
        directory = os.path.abspath(f"executorlib-hello-{os.getpid()}")
        options["cache_directory"] = f"executorlib-hello-{os.getpid()}" if remote else directory
    options.update(remote)
    from executorlib import Executor

    try:
        exe = Executor(backend=args.backend, **options)
    except Exception as error:
        print(f"cannot start the {args.backend} backend: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    with exe:
        ok = _run_hello(exe, args.timeout)
        if not ok:
            exe.shutdown(wait=True, cancel_futures=True)
    if directory is not None and not remote:
        _report_jobs(directory, keep=not ok)
    elif directory is not None:
        print(f"job files: ~/{os.path.basename(directory)} on {args.ssh} (remove it when done)")
    return 0 if ok else 1


def _ssh_options(args: argparse.Namespace) -> dict[str, Any]:
    """The executor options of ``--ssh`` and friends (empty without ``--ssh``)."""
    if not args.ssh:
        return {}
    return {"ssh": args.ssh, "ssh_gateway": args.ssh_gateway, "remote_python": args.remote_python,
            "ssh_args": tuple(args.ssh_arg)}


def _run_hello(exe: Any, timeout: float) -> bool:
    start = time.monotonic()
    calls: dict[Future, str] = {}
    failed = False
    for label, fn, resources in (("python call", hello_python, None),
                                 ("MPI call (cores=2)", hello_mpi, {"cores": 2})):
        try:
            calls[exe.submit(fn, resource_dict=resources)] = label
        except Exception as error:  # e.g. an allocation too small for 2 cores
            print(f"  {label:<20} FAILED to submit: {type(error).__name__}: {error}")
            failed = True
    seconds = _wait_with_progress(calls, start, timeout)
    for future, label in calls.items():
        if future not in seconds:
            print(f"  {label:<20} NOT DONE after {timeout:.0f} s (still queued? see `squeue --me`)")
            failed = True
        elif future.exception() is not None:
            error = future.exception()
            print(f"  {label:<20} FAILED after {seconds[future]:.1f} s: {type(error).__name__}: {error}")
            if "PMI" in str(error):
                print(_PMI_HINT)
            failed = True
        else:
            print(f"  {label:<20} ok   {_describe(label, future.result()):<40} {seconds[future]:6.2f} s")
    verdict = "something failed (see above)" if failed else "everything ran"
    print(f"{verdict}; {time.monotonic() - start:.1f} s in all")
    return not failed


def _wait_with_progress(calls: dict[Future, str], start: float, timeout: float) -> dict[Future, float]:
    """Seconds from ``start`` to each future's end, with a progress line on stderr (one
    line, rewritten each second, on a terminal; a line per finished call otherwise)."""
    finished: dict[Future, float] = {}
    pending = set(calls)
    tty = sys.stderr.isatty()
    while pending and time.monotonic() - start < timeout:
        done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
        now = time.monotonic() - start
        finished.update(dict.fromkeys(done, now))
        line = f"progress: {len(finished)}/{len(calls)} calls done, {now:.1f} s"
        if tty:
            print(f"\r{line}", end="" if pending else "\n", file=sys.stderr, flush=True)
        elif done:
            print(line, file=sys.stderr, flush=True)
    return finished


def _report_jobs(directory: str, keep: bool) -> None:
    from executorlib.inventory import list_calls

    jobs = ", ".join(f"{call.function}: job {call.job_id}" for call in list_calls(directory))
    print(f"queue jobs: {jobs or 'none'}")
    if keep:
        print(f"its files are kept for a look: executorlib status {directory}")
    else:
        shutil.rmtree(directory)


# ------------------------------------------------------ cache directories
def cmd_status(args: argparse.Namespace) -> int:
    from executorlib.inventory import list_calls
    from executorlib.pilot.status import read_pools, table

    calls = list_calls(args.directory)
    pools = read_pools(args.directory)
    if args.json:
        listed = [call.as_dict() for call in calls]
        print(json.dumps({"calls": listed, "pilot_pools": pools} if pools else listed, indent=2))
        return 0
    if pools:
        print("\n".join(table(pools)))
    if not calls:
        print(f"no calls in {args.directory}")
        return 0
    rows = [("FUNCTION", "STATE", "JOB ID", "RUNTIME", "ERROR")]
    rows += [(c.function, c.state, c.job_id or "-", "-" if c.runtime is None else f"{c.runtime:.2f} s",
              _shorten(c.error, 70)) for c in calls]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])
    counts = {state: sum(c.state == state for c in calls) for state in dict.fromkeys(c.state for c in calls)}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    print(f"{len(calls)} call{'s' * (len(calls) != 1)}: {summary}")
    return 0


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_cancel(args: argparse.Namespace) -> int:
    from executorlib.inventory import cancel_jobs, list_calls

    active = [c for c in list_calls(args.directory) if c.state in ("queued", "running") and c.job_id]
    if _cancel_pools(args.directory) and not active:
        return 0
    if not active:
        print(f"nothing to cancel: no call in {args.directory} has a queued or running job")
        return 0
    try:
        cancel_jobs([call.job_id for call in active])
    except SubmissionError as error:
        print(f"cannot cancel: {error}", file=sys.stderr)
        return 1
    for call in active:
        print(f"cancelled job {call.job_id} ({call.function}, was {call.state})")
    return 0


def _cancel_pools(directory: str) -> bool:
    """scancel the worker jobs of the live pilot pools under ``directory``; True if any."""
    from executorlib.inventory import cancel_jobs
    from executorlib.pilot.status import job_ids, read_pools

    jobs = job_ids(read_pools(directory))
    if jobs:
        cancel_jobs(jobs)
        print(f"cancelled pilot worker jobs {', '.join(jobs)}")
    return bool(jobs)


def cmd_clean(args: argparse.Namespace) -> int:
    from executorlib.inventory import list_calls

    calls = list_calls(args.directory)
    active = [c for c in calls if c.state in ("queued", "running")]
    wanted = ("failed", "lost") if args.failed_only else ("done", "failed", "lost")
    chosen = [c for c in calls if c.state in wanted]
    if active:
        print(f"keeping the files of {len(active)} calls still queued or running; "
              f"`executorlib cancel {args.directory}` first to remove them too")
    files = [path for call in chosen for path in call.files]
    if not files:
        print(f"nothing to remove in {args.directory}")
        return 0
    for call in chosen:
        print(f"  {call.function} ({call.state}):")
        print("".join(f"    {path}\n" for path in call.files), end="")
    if not args.yes and not _confirm(f"remove these {len(files)} files of {len(chosen)} calls? [y/N] "):
        return 1
    for path in files:
        os.remove(path)
    from executorlib.taskfiles import jobs_directory

    jobs = jobs_directory(args.directory)
    if os.path.isdir(jobs) and not os.listdir(jobs):
        os.rmdir(jobs)
    print(f"removed {len(files)} files of {len(chosen)} calls")
    return 0


def _confirm(question: str) -> bool:
    print(question, end="", flush=True)
    answer = sys.stdin.readline()
    if not answer:
        print("\nno answer on stdin: nothing removed (pass --yes to remove without asking)")
        return False
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing removed")
    return False


# ----------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``executorlib`` command."""
    from executorlib.executor import BACKENDS

    parser = argparse.ArgumentParser(
        prog="executorlib", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
        description="Check that an executorlib backend works here, and look after the cache "
                    "directories that executors (and their queue jobs) leave behind.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hello = commands.add_parser("hello", help="run a tiny call and a 2-rank MPI call through a backend",
                                description="Submit a tiny function and a 2-rank MPI function through "
                                "BACKEND and report where they ran (host, ranks) and how long they took.")
    hello.add_argument("--backend", choices=list(BACKENDS), default="local", metavar="BACKEND",
                       help=f"one of: {', '.join(BACKENDS)} (default: local)")
    hello.add_argument("--pmi-mode", metavar="PMI", help="how MPI ranks find each other: srun --mpi=PMI "
                       "(e.g. pmix, pmi2; default: the cluster's), or Flux's PMI")
    hello.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                       help="give up waiting after this long (default: 600)")
    hello.add_argument("--ssh", metavar="HOST", help="run through an agent on HOST (user@host or a "
                       "~/.ssh/config alias), as a laptop would: see README 'From your laptop'")
    hello.add_argument("--ssh-gateway", metavar="HOST", help="with --ssh: jump host (ssh -J)")
    hello.add_argument("--remote-python", metavar="PATH",
                       help="with --ssh: the cluster's Python with executorlib")
    hello.add_argument("--ssh-arg", action="append", default=[], metavar="ARG",
                       help="with --ssh: an extra ssh argument (repeat, e.g. --ssh-arg=-F --ssh-arg=cfg)")
    status = commands.add_parser("status", help="list the calls in a cache directory and their state",
                                 description="One row per call: function, state (done, failed, queued, "
                                 "running, lost), queue job id, runtime and error summary.")
    status.add_argument("directory", metavar="CACHE_DIR")
    status.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    cancel = commands.add_parser("cancel", help="cancel the queue jobs of a directory still queued/running")
    cancel.add_argument("directory", metavar="CACHE_DIR")
    clean = commands.add_parser("clean", help="remove the files of a cache directory, asking first",
                                description="List the files of the finished calls in CACHE_DIR and remove "
                                "them after asking (the answer is read from stdin). Calls still queued "
                                "or running are kept.")
    clean.add_argument("directory", metavar="CACHE_DIR")
    clean.add_argument("--failed-only", action="store_true", help="only failed and lost calls")
    clean.add_argument("--yes", "-y", action="store_true", help="do not ask")
    return parser


_COMMANDS = {"hello": cmd_hello, "status": cmd_status, "cancel": cmd_cancel, "clean": cmd_clean}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``executorlib`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (OSError, SubmissionError) as error:
        print(f"executorlib {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

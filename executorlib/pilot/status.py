"""A running pool's worker jobs, for ``executorlib status`` / ``cancel`` in another terminal.

The pool's manager thread writes ``status.json`` (0600, a new file ``os.replace``d over the
old one, at most once a second) into the pool's private output folder
``<cache_directory>/pilot/pool-*/``; the command reads the files of the pools under a
cache directory whose process is still alive. Nothing here is ever unpickled: JSON only.
"""

from __future__ import annotations

import glob
import json
import math
import os
import socket
import time
from typing import Any

from executorlib import files
from executorlib.processes import pid_alive

STATUS_FILE = "status.json"


def worker_rows(workers: list[Any]) -> list[dict[str, Any]]:
    """One row per worker (``scheduler.Worker`` of a pilot pool) with its job's state."""
    now = time.monotonic()
    rows = []
    for worker in workers:
        process, busy = worker.process, bool(worker.tasks)
        job, left = process.job, process.job.time_left()
        rows.append({
            "job_id": job.job_id, "worker": worker.worker_id, "node": job.status.node,
            "state": job.status.state, "reason": job.status.reason,
            "connected": worker.peer is not None, "ready": worker.ready, "busy": busy,
            "stopping": worker.stopping, "calls_done": process.calls_done,
            "idle_for": None if busy or not worker.ready else now - process.idle_since,
            "time_left": left if math.isfinite(left) else None, "job": id(job),
        })
    return rows


def write_status(directory: str, max_workers: int, workers: list[dict[str, Any]]) -> None:
    """Replace ``directory/status.json`` with the pool's jobs now, each with its workers
    (rows of :func:`worker_rows`)."""
    wall = time.time()
    jobs: dict[int, dict[str, Any]] = {}
    for row in workers:
        job = jobs.setdefault(row["job"], {
            "job_id": row["job_id"], "node": row["node"], "state": row["state"], "reason": row["reason"],
            "end_time": None if row["time_left"] is None else wall + row["time_left"], "workers": [],
        })
        idle_since = None if row["idle_for"] is None else wall - row["idle_for"]
        job["workers"].append({"worker": row["worker"], "calls_done": row["calls_done"], "busy": row["busy"],
                               "stopping": row["stopping"], "idle_since": idle_since})
    for job in jobs.values():
        _summarize(job)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "updated": wall,
              "max_workers": max_workers, "jobs": list(jobs.values())}
    files.write_text(os.path.join(directory, STATUS_FILE), json.dumps(record))  # 0600, atomic


def _summarize(job: dict[str, Any]) -> None:
    """A job's calls done, busy, stopping and idle since, from those of its workers."""
    workers = job["workers"]
    job["calls_done"] = sum(w["calls_done"] for w in workers)
    job["busy"] = any(w["busy"] for w in workers)
    job["stopping"] = all(w["stopping"] for w in workers)
    idle = [w["idle_since"] for w in workers]
    job["idle_since"] = None if None in idle else max(idle)


def read_pools(cache_directory: str) -> list[dict[str, Any]]:
    """The live pools under ``cache_directory`` (files of this user only, in folders
    nobody else can write; pools of a process that has ended, or of another host, are
    skipped)."""
    pools = []
    base = os.path.join(cache_directory, "pilot")
    try:
        if files.check_directory(base):
            return []  # a shared directory: pools are private to their user
    except (OSError, files.UntrustedFileError):
        return []
    for path in sorted(glob.glob(os.path.join(base, "pool-*", STATUS_FILE))):
        try:
            descriptor, shared = files.open_trusted(path)  # ours, no link, nobody else can write
        except (OSError, files.UntrustedFileError):
            continue
        with os.fdopen(descriptor) as file:
            try:
                record = json.load(file)
            except ValueError:
                continue
        if not shared and record.get("host") == socket.gethostname() and pid_alive(int(record.get("pid", 0))):
            pools.append(record)
    return pools


def table(pools: list[dict[str, Any]]) -> list[str]:
    """Lines of a table: one row per worker job of each pool, then (several workers
    per job) one line per worker."""
    now = time.time()
    lines = []
    for pool in pools:
        lines.append(f"pilot pool of process {pool['pid']} (max_workers={pool['max_workers']}, "
                     f"{len(pool['jobs'])} job(s)):")
        rows = [("JOB ID", "NODE", "STATE", "CALLS DONE", "IDLE FOR", "TIME LEFT")]
        for job in pool["jobs"]:
            state = job["state"] + (f" ({job['reason']})" if job["reason"] else "")
            state += ", stopping" if job["stopping"] else ", busy" if job["busy"] else ""
            idle = "-" if job["idle_since"] is None else f"{now - job['idle_since']:.0f} s"
            left = "-" if job["end_time"] is None else f"{max(0.0, job['end_time'] - now):.0f} s"
            rows.append((job["job_id"] or "-", job["node"] or "-", state, str(job["calls_done"]), idle, left))
            rows += _worker_lines(job.get("workers", []), now)
        widths = [max(len(row[i]) for row in rows if len(row) == 6) for i in range(6)]
        for row in rows:
            cells = row if len(row) == 6 else row[:1]
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip())
    return lines


def _worker_lines(workers: list[dict[str, Any]], now: float) -> list[tuple[str]]:
    """``  worker 3: busy, 5 calls done`` for each worker of a job that has several."""
    if len(workers) < 2:
        return []
    lines = []
    for worker in workers:
        state = ("stopping" if worker["stopping"] else "busy" if worker["busy"] else
                 "starting" if worker["idle_since"] is None else f"idle {now - worker['idle_since']:.0f} s")
        lines.append((f"  worker {worker['worker']}: {state}, {worker['calls_done']} calls done",))
    return lines


def job_ids(pools: list[dict[str, Any]]) -> list[str]:
    return [job["job_id"] for pool in pools for job in pool["jobs"] if job["job_id"]]

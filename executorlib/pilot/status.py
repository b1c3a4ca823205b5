"""A running pool's worker jobs, for ``executorlib status`` / ``cancel`` in another terminal.

The pool's manager thread writes ``status.json`` (0600, a new file ``os.replace``d over the
old one, at most once a second) into the pool's private output folder
``<cache_directory>/pilot/pool-*/``; the command reads the files of the pools under a
cache directory whose process is still alive. Nothing here is ever unpickled: JSON only.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time
from typing import Any

from executorlib import files
from executorlib.processes import pid_alive

STATUS_FILE = "status.json"


def write_status(directory: str, max_workers: int, jobs: list[dict[str, Any]]) -> None:
    """Replace ``directory/status.json`` with the pool's jobs now (``PilotScheduler.jobs``)."""
    wall = time.time()
    rows = [{
        "job_id": job["job_id"], "node": job["node"], "state": job["state"], "reason": job["reason"],
        "calls_done": job["calls_done"], "busy": job["busy"], "stopping": job["stopping"],
        "idle_since": None if job["idle_for"] is None else wall - job["idle_for"],
        "end_time": None if job["time_left"] is None else wall + job["time_left"],
    } for job in jobs]
    record = {"pid": os.getpid(), "host": socket.gethostname(), "updated": wall,
              "max_workers": max_workers, "jobs": rows}
    files.write_text(os.path.join(directory, STATUS_FILE), json.dumps(record))  # 0600, atomic


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
    """Lines of a table: one row per worker job of each pool."""
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
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def job_ids(pools: list[dict[str, Any]]) -> list[str]:
    return [job["job_id"] for pool in pools for job in pool["jobs"] if job["job_id"]]

"""Run by tests/flux_instance/test_flux_submission.py, twice on one cache directory:

    python reattach.py CACHE_DIR GO_FILE

submits ``wait_for(GO_FILE)`` and ``add(<its future>, 1)`` as Flux jobs. Without GO_FILE it
leaves at once (the jobs stay queued); with it, it waits and prints the result. Either
way it prints one JSON line: the result (or null) and the job ids in the job files.
"""

import glob
import json
import os
import sys
import time

from executorlib import Executor


def wait_for(path):
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    return 41


def add(a, b):
    return a + b


def job_ids(cache):
    ids = {}
    for path in glob.glob(os.path.join(cache, "jobs", "*.job")):
        with open(path) as file:
            ids[os.path.basename(path)[: -len(".job")]] = file.read().strip()
    return ids


cache, go = sys.argv[1], sys.argv[2]
exe = Executor(backend="flux_submission", cache_directory=cache)
last = exe.submit(add, exe.submit(wait_for, go), 1)
if os.path.exists(go):
    result = last.result(timeout=240)
    exe.shutdown(wait=True)
else:
    result = None
    exe.shutdown(wait=False)  # the jobs stay in the queue for a later run
    deadline = time.monotonic() + 120
    while len(job_ids(cache)) < 2 and time.monotonic() < deadline:  # the watcher writes them
        time.sleep(0.05)
print(json.dumps({"result": result, "jobs": job_ids(cache)}), flush=True)

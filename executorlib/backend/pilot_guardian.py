"""Dead man's switch of a pilot pool: ``python -m executorlib.backend.pilot_guardian``.

The executor writes ``+JOBID`` when it submits a worker job and ``-JOBID`` when that job
has ended. When the executor's end of the pipe closes (a clean shutdown has ended every
job; a SIGKILL or crash has not), the jobs still listed are cancelled, so that even a job
still pending in the queue never outlives its executor. Running workers end by
themselves too, when their connection to the executor drops.
"""

import signal
import subprocess
import sys


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the executor decides when we end
    jobs: set[str] = set()
    for line in sys.stdin:
        sign, job_id = line[:1], line[1:].strip()
        if job_id.isdigit():
            (jobs.add if sign == "+" else jobs.discard)(job_id)
    if jobs:
        subprocess.run(["scancel", *sorted(jobs)], timeout=120, check=False)


if __name__ == "__main__":
    main()

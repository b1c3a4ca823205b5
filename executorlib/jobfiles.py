"""The files of one submission job, written and read back: the task file the job runs,
the job id a later process re-attaches to, and the output a dead job leaves behind.

Paths come from executorlib.taskfiles; every write goes through executorlib.files
(private, exclusive temporary name, then ``os.replace``).
"""

from __future__ import annotations

from typing import Any

from executorlib.cache import resources_blob
from executorlib.errors import WorkerDiedError
from executorlib.files import read_small_text, write_text
from executorlib.h5file import write_file
from executorlib.processes import tail_lines
from executorlib.queue import JobState
from executorlib.task import Task
from executorlib.taskfiles import TaskFiles

_TAIL_BYTES = 4096


def write_task_file(files: TaskFiles, task: Task) -> None:
    """The call as the job loads it: function, arguments (by value), resources and where
    to write the result."""
    import cloudpickle

    blobs = {
        "function": cloudpickle.dumps(task.fn, protocol=5),
        "args": cloudpickle.dumps(task.args, protocol=5),
        "kwargs": cloudpickle.dumps(task.kwargs, protocol=5),
        "resources": resources_blob(task.resources),
        "result_path": files.result.encode(),
    }
    write_file(files.task, blobs, task.name)


def write_job_id(files: TaskFiles, job_id: str) -> None:
    """Record the queue's job id, for a later process to re-attach."""
    write_text(files.job_id, job_id)


def read_job_id(files: TaskFiles) -> str | None:
    """The job id an earlier run recorded; None if there is none or it is not one
    (a FIFO, a link, anything but a short line of text)."""
    try:
        text = read_small_text(files.job_id).strip()
    except (OSError, ValueError):
        return None
    return text if text and text.isprintable() and " " not in text else None


def death_error(
    files: TaskFiles, queue: str, job_id: Any, task: Task, state: JobState | None
) -> WorkerDiedError:
    """The error of a job that ended without writing its result."""
    how = "is no longer known to the queue" if state is None else f"ended in state {state.state}"
    how += f" ({state.reason})" if state is not None and state.reason not in ("", "None") else ""
    return WorkerDiedError(
        f"{queue} job {job_id} running {task.name} {how} without writing its result "
        f"{files.result}; {output_tail(files.output)}"
    )


def output_tail(path: str) -> str:
    """The last lines of a job's output, in words."""
    lines = tail_lines(path, max_bytes=_TAIL_BYTES)
    if lines is None:
        return f"its output {path} cannot be read"
    if not lines:
        return f"its output {path} is empty"
    return f"last lines of its output {path}:\n    " + "\n    ".join(lines)

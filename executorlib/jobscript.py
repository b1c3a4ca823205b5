"""Job scripts: the default Slurm script and user templates, rendered so that no value
can inject a command.

Every ``{{ value }}`` of a template (the default one, a ``submission_template``) is written
as one shell word (``shlex.quote``, Jinja2's ``finalize``); the job's command is already
shell code and written as it is. ``#SBATCH`` lines are comments to the shell, so quoting
cannot protect a line break there: a value holding a line break or another control
character is refused with an error that names it.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from executorlib.queue import JobSpec

DEFAULT_TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name={{ job_name }}
#SBATCH --chdir={{ working_directory }}
#SBATCH --ntasks={{ cores }}
#SBATCH --cpus-per-task={{ threads_per_core }}
{%- if gpus_per_core %}
#SBATCH --gpus-per-task={{ gpus_per_core }}
{%- endif %}
{%- if run_time_max %}
#SBATCH --time={{ (run_time_max + 59) // 60 }}
{%- endif %}
{%- if memory_max %}
#SBATCH --mem={{ memory_max }}G
{%- endif %}
{%- if partition %}
#SBATCH --partition={{ partition }}
{%- endif %}
{%- if num_nodes %}
#SBATCH --nodes={{ num_nodes }}
{%- endif %}
{%- if exclusive %}
#SBATCH --exclusive
{%- endif %}

{{ command }}
"""


class ShellCode(str):
    """Text that is shell code already (the job's command, its parts quoted): a template
    writes it as it is."""


def shell_quote(value: object) -> str:
    """``value`` as one shell word (``ShellCode`` as it is): the Jinja2 ``finalize`` of
    every job-script template, so that no value can end a line or start a command."""
    return value if isinstance(value, ShellCode) else shlex.quote(str(value))


def render_script(spec: JobSpec, command: str) -> str:
    """The job script from the default or the call's ``submission_template``; every
    ``{{ value }}`` is shell-quoted, and a value with a line break or another control
    character is refused (a ``#SBATCH`` line cannot quote it)."""
    import jinja2

    variables = script_variables(spec, command)
    source = spec.resources.submission_template or DEFAULT_TEMPLATE
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, finalize=shell_quote,
                                     keep_trailing_newline=True)
    environment.filters["shell_quote"] = shell_quote
    try:
        return environment.from_string(source).render(variables)
    except jinja2.TemplateError as error:
        from executorlib.queue import SubmissionError  # queue.py imports this module

        raise SubmissionError(
            f"the submission_template of {spec.job_name} does not render: {type(error).__name__}: "
            f"{error}; its variables are: {', '.join(sorted(variables))}"
        ) from error


def script_variables(spec: JobSpec, command: str) -> dict[str, object]:
    """What a job-script template may use, each value checked for control characters."""
    variables = {
        **spec.resources.as_dict(), "job_name": spec.job_name, "command": ShellCode(command),
        "working_directory": spec.working_directory, "dependency": list(spec.dependency),
        "dependency_list": list(spec.dependency), "output_file": spec.output_file,
    }
    for name, value in variables.items():
        if name not in ("command", "submission_template", "env"):
            for text in value if isinstance(value, list) else [value]:
                _check_line(spec.job_name, name, text)
    return variables


def _check_line(job_name: str, name: str, value: object) -> None:
    if isinstance(value, str) and not value.isprintable():
        from executorlib.queue import SubmissionError

        raise SubmissionError(
            f"cannot write the job script of {job_name}: {name}={value!r} holds a line break or "
            "another control character, which a job script cannot carry safely; remove it"
        )

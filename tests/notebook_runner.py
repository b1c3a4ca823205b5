"""Run a notebook top to bottom in a real Jupyter kernel, as a person would.

    python tests/notebook_runner.py NOTEBOOK [--cwd DIR] [--output EXECUTED.ipynb]
                                    [--only TAG | --skip TAG]

The kernel starts with this process's environment (so under ``salloc`` it runs inside
the allocation) and in ``--cwd``. A code cell tagged ``restart-kernel`` runs after the
kernel has been restarted, like Kernel -> Restart in Jupyter: nothing defined before it
survives. A cell that raises stops the run; its traceback is printed and the exit
status is 1. ``--only TAG`` runs just the code cells tagged TAG, ``--skip TAG`` all
others: for a notebook whose sections need different surroundings (notebook 2: an
``salloc`` for its Slurm cells, ``flux start`` for those tagged ``flux``).
"""

from __future__ import annotations

import argparse
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbclient.util import run_sync

RESTART_TAG = "restart-kernel"


def run_notebook(path: str, cwd: str, cell_timeout: int = 300, only: str | None = None,
                 skip: str | None = None) -> nbformat.NotebookNode:
    """The executed notebook; raises CellExecutionError from the first failing cell."""
    notebook = nbformat.read(path, as_version=4)
    if only or skip:
        tag = only or skip
        notebook.cells = [cell for cell in notebook.cells
                          if (tag in cell.metadata.get("tags", [])) == bool(only)]
    client = NotebookClient(notebook, timeout=cell_timeout, kernel_name="python3",
                            resources={"metadata": {"path": cwd}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if RESTART_TAG in cell.metadata.get("tags", []):
                run_sync(client.km.restart_kernel)()
                run_sync(client.kc.wait_for_ready)(timeout=60)
            started = time.monotonic()
            client.execute_cell(cell, index)
            if cell.cell_type == "code":
                print(f"cell {index:2d}: {time.monotonic() - started:5.1f} s", file=sys.stderr)
    return notebook


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook")
    parser.add_argument("--cwd", default=".", help="the kernel's working directory")
    parser.add_argument("--output", help="write the executed notebook here")
    parser.add_argument("--only", metavar="TAG", help="run only the cells tagged TAG")
    parser.add_argument("--skip", metavar="TAG", help="run every cell but those tagged TAG")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        notebook = run_notebook(args.notebook, args.cwd, only=args.only, skip=args.skip)
    except CellExecutionError as error:
        print(f"{args.notebook} failed:\n{error}", file=sys.stderr)
        return 1
    if args.output:
        nbformat.write(notebook, args.output)
    print(f"{args.notebook}: every cell ran in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

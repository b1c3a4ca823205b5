"""Every notebook runs top to bottom in a real Jupyter kernel (``tests/notebook_runner.py``:
nbclient + ipykernel), each in a fresh working directory; their cells assert their own
results. The allocation notebook's kernel runs inside a real ``salloc`` of the test
cluster, the submission notebook submits real ``sbatch`` jobs and restarts its kernel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNER = [sys.executable, str(REPO / "tests" / "notebook_runner.py")]


def run(notebook: str, cwd: Path, prefix: tuple[str, ...] = (), timeout: float = 240,
        cells: tuple[str, ...] = ()):
    """Execute ``notebook``; the executed notebook (fails with the runner's output when a
    cell raised). ``cells``: e.g. ``("--only", "flux")`` (see notebook_runner.py)."""
    output = cwd / "executed.ipynb"
    done = subprocess.run(
        [*prefix, *RUNNER, str(REPO / "notebooks" / notebook), "--cwd", str(cwd), "--output", str(output),
         *cells],
        capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, f"{notebook} failed:\n{done.stdout}\n{done.stderr[-6000:]}"
    return nbformat.read(output, as_version=4)


def outputs_of(notebook, tag: str) -> list:
    (cell,) = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    return cell.outputs


@pytest.fixture(scope="module")
def slurm():
    """The test cluster: started (idempotent) if ``sinfo`` does not answer."""
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        subprocess.run([str(REPO / "scripts" / "slurm-test-cluster"), "start"], check=True)


def test_the_notebooks_are_stored_without_outputs():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), path


@pytest.mark.timeout(180)
def test_local_notebook(tmp_path):
    notebook = run("1-local.ipynb", tmp_path)
    graph = outputs_of(notebook, "dependency-graph")
    assert any("image/png" in output.get("data", {}) for output in graph), "the graph was not drawn inline"


@pytest.mark.timeout(120)
def test_developer_notebook(tmp_path):
    run("4-developer.ipynb", tmp_path)


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_allocation_notebook_inside_salloc(slurm, tmp_path):
    allocation = ("salloc", "--ntasks=4", "--gres=gpu:2", "--time=10", "--quiet")
    run("2-hpc-allocation.ipynb", tmp_path, prefix=allocation, timeout=280, cells=("--skip", "flux"))


@pytest.mark.timeout(300)
def test_allocation_notebook_flux_cells_inside_flux_start(tmp_path):
    """Flux clears SLURM_* for its programs: its cells get a kernel of their own."""
    if shutil.which("flux") is None:
        pytest.fail("notebook 2's Flux cells need 'flux' on PATH: run scripts/run-tests, or "
                    'eval "$(scripts/find-flux)" first')
    notebook = run("2-hpc-allocation.ipynb", tmp_path, prefix=("flux", "start", "--test-size=2"),
                   timeout=280, cells=("--only", "flux"))
    listing = "".join(output.get("text", "") for output in notebook.cells[1].outputs)
    assert "NNODES" in listing and "free" in listing  # `! flux resource list` ran
    assert len(notebook.cells) == 5


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_submission_notebook_restarts_its_kernel(slurm, tmp_path):
    run("3-hpc-submission.ipynb", tmp_path, timeout=280)
    assert (tmp_path / "job_before_restart.txt").read_text().isdigit()
    assert not (tmp_path / "jobs_cache" / "jobs").exists()  # cleaned by `executorlib clean`


def test_binder_environment_has_what_the_local_notebook_needs():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    yaml = pytest.importorskip("yaml")
    environment = yaml.safe_load((REPO / "binder" / "environment.yml").read_text())
    assert environment["channels"] == ["conda-forge"]
    names = {re.split(r"[=<>]", spec)[0].removesuffix("-base") for spec in environment["dependencies"]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = [*project["dependencies"], *extras["mpi"], *extras["cache"], *extras["graph"]]
    needed = {re.split(r"[=<>\[ ]", spec)[0] for spec in needed}
    notebook = nbformat.read(REPO / "notebooks" / "1-local.ipynb", as_version=4)
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", "\n".join(
        cell.source for cell in notebook.cells if cell.cell_type == "code"), re.MULTILINE))
    needed |= imported - set(sys.stdlib_module_names) - {"executorlib"}
    assert needed <= names, f"binder/environment.yml lacks {sorted(needed - names)}"
    assert {"python", "pip", "openmpi", "ipykernel"} <= names
    post_build = REPO / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK) and "pip install --no-deps ." in post_build.read_text()

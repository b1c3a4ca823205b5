"""Workers that really run in a container: bubblewrap, with a minimal root directory.

The root (scripts/container-rootfs) holds no packages and a marker file,
``/etc/executorlib-rootfs``; this machine's ``/usr`` is bound read-only over it and the
caller's own Python runs inside (``host_python=True``: its installation and import path
bound read-only). A worker proves where it runs by what only the container shows: the
marker, a host file outside every bind that it cannot see, a folder bound at another
path. podman cannot run here (its OCI runtime is refused ``setrlimit``, see README);
apptainer is not in Debian 12: their command lines are tested in test_container_argv.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from test_pilot import wait_until

from executorlib import SingleNodeExecutor, SlurmClusterExecutor, WorkerDiedError
from executorlib.container import host_python_binds
from executorlib.processes import import_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_TMPFS = "/var/spool/slurm"  # TmpFS=/var/spool/slurm/tmp-%n (scripts/slurm-test-cluster)


# --------------------------------------------------------------- called in workers
def where_am_i(host_file):
    """What the worker sees: the root's marker, whether ``host_file`` shows, its bind."""
    import os

    marker = None
    if os.path.exists("/etc/executorlib-rootfs"):
        with open("/etc/executorlib-rootfs") as stream:
            marker = stream.read().strip()
    with open("/data/seen-by-worker", "w") as stream:  # the bound folder, at its inside path
        stream.write(str(os.getpid()))
    return {"marker": marker, "sees_host_file": os.path.exists(host_file),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "keys_left": "EXECUTORLIB_KEYS" in os.environ}


def inside_container():
    import os

    return os.path.exists("/etc/executorlib-rootfs")


def combine(outside, inside):
    return {"outside": outside, "inside": inside, "here_inside": inside_container()}


def ranks_inside():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), inside_container()


# ------------------------------------------------------------------------ set-up
@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    """The minimal root, with mount points for what ``host_python`` binds."""
    return build_rootfs(str(tmp_path_factory.mktemp("container") / "rootfs"))


def build_rootfs(root, *extra_points):
    """scripts/container-rootfs ``root`` with mount points for host_python and ``extra_points``."""
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed: run scripts/install --test (apt-get install bubblewrap)")
    points = [bind.container for bind in host_python_binds([sys.base_prefix, sys.prefix], import_path())]
    script = os.path.join(REPO, "scripts", "container-rootfs")
    subprocess.run([script, root, *points, *extra_points], check=True, timeout=60)
    return root


@pytest.fixture
def data(tmp_path):
    """A host folder the container sees at /data (the root's /data is made for it)."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def container(rootfs, data=None):
    binds = {"/usr": "/usr:ro"}
    if data is not None:
        os.makedirs(os.path.join(rootfs, "data"), exist_ok=True)
        binds[str(data)] = "/data"
    return {"runtime": "bubblewrap", "image": rootfs, "binds": binds, "host_python": True}


# -------------------------------------------------------------------------- tests
@pytest.mark.timeout(120)
@pytest.mark.parametrize("block_allocation", [True, False])
def test_a_local_worker_runs_in_the_container(rootfs, data, tmp_path, block_allocation):
    host_file = tmp_path / "only-on-the-host"
    host_file.touch()
    with SingleNodeExecutor(max_workers=1, block_allocation=block_allocation,
                            resource_dict={"container": container(rootfs, data)}) as exe:
        seen = exe.submit(where_am_i, str(host_file)).result(timeout=60)
    assert seen == {"marker": "executorlib test root file system", "sees_host_file": False,
                    "slurm_job": None, "keys_left": False}
    assert (data / "seen-by-worker").read_text().isdigit()  # written at /data inside


@pytest.mark.timeout(120)
def test_heterogeneous_pools_pass_futures_between_a_contained_and_a_plain_worker(rootfs):
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as plain, SingleNodeExecutor(
        max_workers=1, block_allocation=True, resource_dict={"container": container(rootfs)},
    ) as contained:
        outside = plain.submit(inside_container)
        inside = contained.submit(inside_container)
        both = plain.submit(combine, outside, inside)  # a future of the other pool as argument
        back = contained.submit(combine, outside, both)
        assert both.result(timeout=60) == {"outside": False, "inside": True, "here_inside": False}
        assert back.result(timeout=60)["here_inside"] is True


@pytest.mark.timeout(120)
def test_mpi_ranks_each_run_in_the_container_inside_mpiexec(rootfs):
    with SingleNodeExecutor(max_workers=1, max_cores=2, block_allocation=True, resource_dict={
        "cores": 2, "openmpi_oversubscribe": True, "container": container(rootfs),
    }) as exe:
        assert exe.submit(ranks_inside).result(timeout=90) == [(0, True), (1, True)]


def test_a_bad_spec_fails_at_the_executor_with_the_fix(rootfs):
    with pytest.raises(ValueError, match=r"\['binds'\] 'data': '/data': the host path 'data' must be abs"):
        SingleNodeExecutor(resource_dict={"container": {"runtime": "bubblewrap", "image": rootfs,
                                                        "binds": {"data": "/data"}}})


def test_a_root_without_the_python_says_why_the_worker_ended(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = {"runtime": "bubblewrap", "image": str(empty), "host_python": True}
    with SingleNodeExecutor(max_workers=1, resource_dict={"container": spec}) as exe, pytest.raises(
        WorkerDiedError, match="exit code 1"
    ) as error:
        exe.submit(inside_container).result(timeout=60)
    assert "bwrap: " in str(error.value)  # bubblewrap's own words, from the worker's stderr


# ------------------------------------------------------------------ pilot pool
def pilot_jobs_under(folder):
    """Ids of the pilot jobs in squeue whose output goes under ``folder`` (this test's:
    other sessions share the cluster)."""
    out = subprocess.run(
        ["squeue", "--noheader", "--name=executorlib-pilot", "--Format=JobID:|,StdOut:"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [job for job, _, output in (line.partition("|") for line in out.split())
            if output.startswith(str(folder))]


@pytest.fixture
def no_pilot_job_left(tmp_path):
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        subprocess.run([os.path.join(REPO, "scripts", "slurm-test-cluster"), "start"], check=True)
    yield
    try:
        wait_until(lambda: not pilot_jobs_under(tmp_path), 60, "the test's pilot jobs to leave squeue")
    except AssertionError:
        left = pilot_jobs_under(tmp_path)
        subprocess.run(["scancel", *left], check=False)
        pytest.fail(f"pilot jobs left in squeue: {left}")


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_pilot_pool_workers_run_in_the_container_on_the_cluster(rootfs, data, tmp_path, no_pilot_job_left):
    host_file = tmp_path / "only-on-the-host"
    host_file.touch()
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=2, idle_timeout=None, cache_directory=str(tmp_path / "cache"),
        resource_dict={"partition": "multi", "container": container(rootfs, data)},
    ) as pool, SingleNodeExecutor(max_workers=1, block_allocation=True) as local:
        seen = pool.submit(where_am_i, str(host_file))
        mixed = local.submit(combine, local.submit(inside_container), pool.submit(inside_container))
        result = seen.result(timeout=180)
        assert result["marker"] == "executorlib test root file system"
        assert result["sees_host_file"] is False and result["keys_left"] is False
        assert result["slurm_job"] in pilot_jobs_under(tmp_path)  # the Slurm job's environment reached inside
        assert mixed.result(timeout=180) == {"outside": False, "inside": True, "here_inside": False}
    assert (data / "seen-by-worker").read_text().isdigit()


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_pilot_mpi_workers_run_each_rank_in_the_container_inside_srun(tmp_path, no_pilot_job_left):
    rootfs = build_rootfs(str(tmp_path / "rootfs"), SLURM_TMPFS)
    spec = container(rootfs)
    spec["binds"][SLURM_TMPFS] = SLURM_TMPFS  # the step's PMIx server lives in Slurm's TmpFS
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, cache_directory=str(tmp_path / "cache"),
        resource_dict={"partition": "multi", "cores": 2, "container": spec},
    ) as pool:
        assert pool.submit(ranks_inside).result(timeout=180) == [(0, True), (1, True)]

"""Workers of ``SlurmJobExecutor`` in a container (bubblewrap): the container goes
inside the launcher, ``srun ... bwrap ... python``, one per rank; MPI ranks reach the
step's PMIx server through Slurm's TmpFS folder, bound into the container."""

from __future__ import annotations

import pytest
from test_container import SLURM_TMPFS, build_rootfs, container, inside_container, ranks_inside

from executorlib import SlurmJobExecutor


def step_inside():
    import os

    return os.environ.get("SLURM_STEP_ID"), inside_container()


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    return build_rootfs(str(tmp_path_factory.mktemp("container") / "rootfs"), SLURM_TMPFS)


@pytest.mark.timeout(120)
def test_srun_steps_run_their_worker_in_the_container(rootfs):
    with SlurmJobExecutor(max_workers=1, block_allocation=True,
                          resource_dict={"container": container(rootfs)}) as exe:
        step, inside = exe.submit(step_inside).result(timeout=90)
    assert step is not None and inside is True


@pytest.mark.timeout(120)
def test_mpi_ranks_run_in_the_container_inside_srun(rootfs):
    spec = container(rootfs)
    spec["binds"][SLURM_TMPFS] = SLURM_TMPFS
    with SlurmJobExecutor(max_workers=1, resource_dict={"cores": 2, "container": spec}) as exe:
        assert exe.submit(ranks_inside).result(timeout=90) == [(0, True), (1, True)]

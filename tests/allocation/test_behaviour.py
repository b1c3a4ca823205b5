"""The behaviour every backend shows, on srun steps of the surrounding allocation."""

from __future__ import annotations

from behaviour import BehaviourSuite


class TestSlurmAllocation(BehaviourSuite):
    backend = "slurm_allocation"
    extra = {"pmi_mode": "pmix"}  # the test cluster's MpiDefault is none

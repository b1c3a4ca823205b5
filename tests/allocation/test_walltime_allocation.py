"""Inside an allocation, a call that declares more run_time_max than the allocation has
left fails at submit (scripts/run-allocation-tests: salloc --time=30)."""

from __future__ import annotations

import os

import pytest

from executorlib import Executor


def where():
    return os.environ.get("SLURM_STEP_ID")


@pytest.mark.timeout(120)
def test_a_call_longer_than_the_allocation_has_left_fails_at_submit():
    with Executor(backend="slurm_allocation", max_workers=1) as exe:
        refused = r"run_time_max=86400 s but the allocation \(Slurm job \d+\) ends in"
        with pytest.raises(ValueError, match=refused):
            exe.submit(where, resource_dict={"run_time_max": 86400})
        assert exe.submit(where, resource_dict={"run_time_max": 60}).result(timeout=60) is not None
    with pytest.raises(ValueError, match="so Slurm would kill it before it ends"):
        Executor(backend="slurm_allocation", resource_dict={"run_time_max": 86400})

"""The behaviour every backend shows, on Flux jobs of the surrounding instance.

No ``flux_log_files``: the stderr tail of a dead worker comes from Flux's output eventlog.
"""

from __future__ import annotations

from behaviour import BehaviourSuite


class TestFluxAllocation(BehaviourSuite):
    backend = "flux_allocation"

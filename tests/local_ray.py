"""The test run's one in-process Ray: started by the first test that needs it, shared by the
rest (``ray.init`` costs 5-15 s here), and stopped at the end of the run.

Its dashboard is on: Tune's early stopping needs it (without it a stopped trial's placement
group is never released). It has more logical CPUs than the machine's two cores, so that two
training workers and Ray Data's read tasks never starve each other.
"""

from __future__ import annotations

import os

import ray


def ensure_ray() -> None:
    """Start the shared in-process Ray unless it is running (a test that needed no Ray may
    have stopped it)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True)

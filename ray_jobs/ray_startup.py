"""The environment of a Ray that a job starts in-process, whoever started the job, and what a
job's driver sets up once it is connected.

Ray gives its dashboard 60 s to come up and each of the dashboard's module processes 30 s. On a
machine with few cores and a high load, starting those processes takes longer, Ray runs on
without a dashboard, and what needs one fails later (``ray job submit``, the release of a
stopped Tune trial's resources); docs/troubleshooting.md. ``set_dashboard_timeouts`` gives them
the time that ``make`` exports, so that a job started directly behaves as under ``make``.
"""

from __future__ import annotations

import os
from typing import Final

DASHBOARD_TIMEOUTS: Final[dict[str, str]] = {
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
    "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "240",
}


def set_dashboard_timeouts() -> None:
    """Set Ray's dashboard start-up timeouts (``DASHBOARD_TIMEOUTS``) in this process's
    environment, which the Ray it starts inherits; a value already set (exported by the user
    or by ``make``) is kept. Call it before ``ray.init`` starts Ray."""
    for name, seconds in DASHBOARD_TIMEOUTS.items():
        os.environ.setdefault(name, seconds)


def pin_cluster_actors_to_driver() -> None:
    """Create the cluster's detached Ray Data and Ray Train singletons on this driver's node,
    unless they exist: Ray Data's statistics actor and the autoscaling coordinator of Ray Data
    and Ray Train.

    Each is created on the node of the process that first needs it, and lives as long as the
    cluster. A sweep first needs them in a trial, on a worker node the autoscaler launched:
    pinned there, they keep that node from ever being idle, and the autoscaler never
    terminates it (the fault of ray-project/ray#42253, for these actors, in Ray 2.55.1). Created by
    the job's driver, they live on the node the driver runs on (the head node under ``ray job
    submit``). Call it once connected."""
    from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
    from ray.data._internal.stats import get_or_create_stats_actor

    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()

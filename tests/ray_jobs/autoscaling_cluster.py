"""Ray's real autoscaler on this machine, driving the node types of ``ray_jobs/cluster/``.

The head runs ``ray start --head --autoscaling-config=...`` with ``RAY_FAKE_CLUSTER=1``: Ray's own
monitor process runs the autoscaler (v2, its instance manager) against its fake multi-node provider
(``ray.autoscaler._private.fake_multi_node``), whose "nodes" are raylets on 127.0.0.1 launched and
terminated by the autoscaler. ``ray.cluster_utils.AutoscalingCluster`` does the same, but it runs
``ray stop --force`` (every Ray process of the machine), binds the default ports and reads a
template that the Ray wheel does not ship, so this harness writes the config itself and stops
only what it started.

Node types come from the cluster file, with their names, ``min_workers``, ``max_workers`` and
idle timeout as users deploy them; only the resources are scaled to a 2-core machine by one rule
(``LOOPBACK_RULE``): a node offers one GPU's share of the real node, i.e. its resources divided
by its GPU count, with at most ``NODE_CPUS`` logical CPUs, and its GPUs become the logical
resource ``LOGICAL_GPU`` (a ``GPU`` resource would make Ray Train pick CUDA, which this machine
does not have). So ``gpu_worker`` ``{CPU: 96, GPU: 8}`` becomes ``{CPU: 2, logical_gpu: 1}`` and
``cpu_worker`` ``{CPU: 32}`` becomes ``{CPU: 2}``. A training worker of a GPU preset (1 GPU and
some CPUs) becomes ``{CPU: 1, logical_gpu: 1}``: one per launched GPU node, like one GPU of it.

A preemption is what a spot reclaim does to a machine: every process of one node is killed
(SIGKILL) without warning. The GCS marks the node dead after its missed health checks; the v2
autoscaler reconciles the provider's instance of a dead node to RAY_STOPPED, terminates it and
launches a replacement while Ray Train still asks for it. (The v1 autoscaler never replaces such
a node here: the fake provider keeps listing the instance, and v1 drops the dead node's heartbeat
record and then counts it as fresh, so the node type stays at its maximum.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import yaml
from local_cluster import LocalCluster
from ray.autoscaler._private.fake_multi_node.node_provider import (
    FAKE_HEAD_NODE_ID,
    FakeMultiNodeProvider,
)
from ray.util.state import list_actors, list_nodes, list_tasks

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILE = REPO / "ray_jobs" / "cluster" / "cluster.yaml"
LOGICAL_GPU = "logical_gpu"
NODE_CPUS = 2
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type
LOOPBACK_RULE = (
    f"resources / GPUs per node, CPU capped at {NODE_CPUS}, GPU -> {LOGICAL_GPU} (logical)"
)


class ClusterFileError(ValueError):
    """The cluster file cannot be turned into loopback node types, or a request fits none."""


def load_cluster_file(path: Path = CLUSTER_FILE) -> dict[str, Any]:
    with path.open() as f:
        return yaml.safe_load(f)


def loopback_node_types(launcher: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The worker node types of a cluster-launcher config with their resources scaled by
    ``LOOPBACK_RULE``. Raises ClusterFileError naming a node type that is referenced but not
    declared, or declared without resources."""
    types = launcher.get("available_node_types") or {}
    head = launcher.get("head_node_type")
    if head not in types:
        raise ClusterFileError(
            f"head_node_type {head!r} is not one of available_node_types ({', '.join(types)})"
        )
    out = {}
    for name, node in types.items():
        if name == head:
            continue
        resources = node.get("resources")
        if not isinstance(resources, dict) or not resources:
            raise ClusterFileError(f"node type {name!r} declares no resources")
        gpus = float(resources.get("GPU", 0))
        share = gpus if gpus >= 1 else 1.0
        scaled = {k: v / share for k, v in resources.items() if k != "GPU"}
        scaled["CPU"] = min(float(scaled.get("CPU", 0)), NODE_CPUS)
        if gpus:
            scaled[LOGICAL_GPU] = gpus / share
        out[name] = {
            "resources": scaled,
            "node_config": {},
            "min_workers": int(node.get("min_workers", 0)),
            "max_workers": int(node.get("max_workers", 0)),
        }
    return out


def node_type_for(
    resources_per_worker: dict[str, float], node_types: dict[str, dict[str, Any]]
) -> str:
    """The node type a training worker with ``resources_per_worker`` fits on (the one with the
    fewest CPUs when several do). Raises ClusterFileError naming each resource no node type
    offers, or the request when no single node type offers all of it."""
    offered = {k for node in node_types.values() for k in node["resources"]}
    missing = sorted(set(resources_per_worker) - offered)
    if missing:
        raise ClusterFileError(
            f"no node type offers {', '.join(missing)} (node types: "
            + "; ".join(f"{n} {t['resources']}" for n, t in node_types.items())
            + ")"
        )
    fits = [
        name
        for name, node in node_types.items()
        if node["max_workers"] > 0
        and all(node["resources"].get(k, 0) >= v for k, v in resources_per_worker.items())
    ]
    if not fits:
        raise ClusterFileError(f"no single node type fits a worker of {resources_per_worker}")
    return min(fits, key=lambda n: node_types[n]["resources"]["CPU"])


def _pids_where(predicate) -> list[int]:  # noqa: ANN001
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if predicate(entry):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class AutoscalingCluster(LocalCluster):
    """A head with no training capacity whose autoscaler launches the cluster file's worker
    node types as loopback raylets."""

    def __init__(
        self,
        launcher: dict[str, Any],
        *,
        idle_timeout_s: float = 10.0,
        max_nodes_per_type: int = 2,
    ) -> None:
        super().__init__()
        self.node_types = loopback_node_types(launcher)
        for node in self.node_types.values():
            node["max_workers"] = min(node["max_workers"], max_nodes_per_type)
        head = launcher["available_node_types"][launcher["head_node_type"]]
        self.config = {
            "cluster_name": "dipro-loopback",
            "max_workers": sum(n["max_workers"] for n in self.node_types.values()),
            "upscaling_speed": float(launcher.get("upscaling_speed", 1.0)),
            "idle_timeout_minutes": idle_timeout_s / 60,
            "provider": {
                # Ray's fake provider, named as an external one: for the type "fake_multinode" the
                # v2 autoscaler reads a defaults file the Ray wheel does not ship.
                "type": "external",
                "module": f"{FakeMultiNodeProvider.__module__}.{FakeMultiNodeProvider.__name__}",
                "gcs_address": f"127.0.0.1:{self.gcs_port}",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "launch_multiple": True,
                "head_node_id": FAKE_HEAD_NODE_ID,
            },
            "available_node_types": {
                **self.node_types,
                FAKE_HEAD_TYPE: {
                    "resources": dict(head.get("resources", {})),
                    "node_config": {},
                    "max_workers": 0,
                },
            },
            "head_node_type": FAKE_HEAD_TYPE,
            "auth": {"ssh_user": "ray"},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> None:
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        head = self.config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
        env = {
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # The fake provider's raylets bind the address Ray picks for the host: loopback.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        self._start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                f"--num-cpus={int(head.get('CPU', 0))}",
                f"--autoscaling-config={config}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}",
                '--system-config={"health_check_period_ms":1000,'
                '"health_check_failure_threshold":5}',
            ],
            extra_env=env,
        )
        self.client(timeout=360)

    def worker_nodes(self) -> dict[str, dict[str, float]]:
        """Alive worker nodes: Ray node id -> the resources it offers."""
        nodes = list_nodes(
            address=self.dashboard,
            filters=[("state", "=", "ALIVE")],
            detail=True,
            raise_on_missing_output=False,
        )
        return {n.node_id: dict(n.resources_total) for n in nodes if not n.is_head_node}

    def wait_for_workers(self, count: int, timeout: float, exact: bool = True) -> float:
        """Seconds until ``count`` worker nodes are alive (exactly, or at least)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            alive = len(self.worker_nodes())
            if alive == count or (not exact and alive >= count):
                return time.monotonic() - started
            time.sleep(1)
        raise AssertionError(
            f"{len(self.worker_nodes())} worker nodes after {timeout:.0f} s, expected {count}; "
            f"what runs on them: {self.work_on_workers()}\n" + self.monitor_log()[-4000:]
        )

    def work_on_workers(self) -> list[str]:
        """The live actors and tasks on worker nodes (what keeps a node from being idle)."""
        workers = set(self.worker_nodes())
        actors = list_actors(
            address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
        )
        tasks = list_tasks(
            address=self.dashboard,
            filters=[("state", "=", "RUNNING")],
            raise_on_missing_output=False,
        )
        return [f"actor {a.class_name} on {a.node_id}" for a in actors if a.node_id in workers] + [
            f"task {t.name} on {t.node_id}" for t in tasks if t.node_id in workers
        ]

    def preempt(self, node_id: str) -> None:
        """Kill every process of one launched node at once, as a spot reclaim would."""
        marker = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
        pids = _pids_where(lambda p: marker in (p / "environ").read_bytes().split(b"\0"))
        if not pids:
            raise AssertionError(f"no process of node {node_id} found")
        _kill(pids)

    def monitor_log(self) -> str:
        """The autoscaler's log (for failure messages)."""
        return "\n".join(
            p.read_text(errors="replace")
            for p in Path(self.temp_dir).glob("session_*/logs/monitor.log")
        )

    def stop(self) -> None:
        """Stop the head by its process group, then every process of the launched nodes (the
        monitor starts them; they name this cluster's GCS port)."""
        address = f"127.0.0.1:{self.gcs_port}".encode()
        super().stop()
        _kill(_pids_where(lambda p: address in (p / "cmdline").read_bytes()))

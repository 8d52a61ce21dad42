"""DiPro under Ray's real autoscaler: jobs and sweeps that make it launch the cluster file's GPU
node type, nodes terminated when idle, and an elastic run that loses a node mid-epoch and grows
back when the autoscaler replaces it.

One loopback cluster (``autoscaling_cluster.AutoscalingCluster``) serves the module: a head with
no CPU for training, and the worker node types of ``ray_jobs/cluster/cluster.yaml`` scaled by
its documented rule. Every run is submitted with ``ray job submit``, as a user would.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
from autoscaling_cluster import (
    FAKE_HEAD_NODE_ID,
    LOGICAL_GPU,
    AutoscalingCluster,
    ClusterFileError,
    load_cluster_file,
    loopback_node_types,
    node_type_for,
)
from conftest import TINY_MODEL
from ray.job_submission import JobStatus

# A training worker of the GPU presets (1 GPU + CPUs), scaled like the node types.
GPU_WORKER = {"CPU": 1, LOGICAL_GPU: 1}
# Jobs run the project as the cluster file installs it on every node (`pip install -e`), not a
# `--working-dir` copy: the loopback nodes share one Ray session directory, and each node's
# runtime-env agent unpacks a working dir afresh over the same path (Ray's working_dir plugin
# overwrites), pulling it from under the processes of the nodes already running there. On a
# real cluster every node unpacks onto its own disk. Tracking is off: the runs are about
# placement, and an MLflow store would resolve against the job driver's working directory.
GPU_SCALING = [
    "tracking.enabled=false",
    "scaling.use_gpu=false",
    "scaling.cpus_per_worker=1",
    "scaling.resources_per_worker.CPU=1",
    f"+scaling.resources_per_worker.{LOGICAL_GPU}=1",
]


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "epoch_metrics.jsonl").read_text().splitlines()]


def _first_epoch_without(epochs: list[dict], node: str) -> int | None:
    """Index of the first epoch after the last one ``node`` trained in (None: not yet)."""
    last = max(i for i, e in enumerate(epochs) if node in e["worker_nodes"])
    return last + 1 if last + 1 < len(epochs) else None


def _command(module: str, data_root: Path, runs: Path, *extra: str, flags: str = "") -> str:
    return " ".join(
        [
            sys.executable,
            "-m",
            module,
            *flags.split(),
            "task=mortality",
            f"data.root={data_root}",
            f"storage_path={runs}",
            *TINY_MODEL,
            *GPU_SCALING,
            *extra,
        ]
    )


# --- the cluster file as node types (no cluster started) -------------------------------------


def test_cluster_file_node_types_scale_to_loopback() -> None:
    types = loopback_node_types(load_cluster_file())
    assert types["gpu_worker"]["resources"] == {"CPU": 2, LOGICAL_GPU: 1}
    assert types["cpu_worker"]["resources"] == {"CPU": 2}
    assert {t["min_workers"] for t in types.values()} == {0}
    assert node_type_for(GPU_WORKER, types) == "gpu_worker"
    assert node_type_for({"CPU": 1}, types) == "gpu_worker"  # the fewest CPUs that fit


def test_misspelled_node_type_is_named() -> None:
    launcher = copy.deepcopy(load_cluster_file())
    launcher["head_node_type"] = "haed"
    with pytest.raises(ClusterFileError, match="head_node_type 'haed'"):
        loopback_node_types(launcher)
    launcher = copy.deepcopy(load_cluster_file())
    del launcher["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(ClusterFileError, match="'gpu_worker' declares no resources"):
        loopback_node_types(launcher)


def test_resource_no_node_type_offers_is_named() -> None:
    types = loopback_node_types(load_cluster_file())
    with pytest.raises(ClusterFileError, match="no node type offers TPU"):
        node_type_for({"CPU": 1, "TPU": 1}, types)
    with pytest.raises(ClusterFileError, match="no single node type fits"):
        node_type_for({"CPU": 4, LOGICAL_GPU: 1}, types)


# --- the real autoscaler ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def autoscaling():
    cluster = AutoscalingCluster(load_cluster_file(), idle_timeout_s=20)
    node_type_for(GPU_WORKER, cluster.node_types)  # the request fits the file's node types
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _gpu_nodes(cluster: AutoscalingCluster) -> set[str]:
    return {n for n, r in cluster.worker_nodes().items() if r.get(LOGICAL_GPU)}


def _wait_job(cluster: AutoscalingCluster, job: str, timeout: float) -> tuple[JobStatus, str, set]:
    """Wait for ``job``; also return every GPU node seen alive meanwhile."""
    client = cluster.client()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen |= _gpu_nodes(cluster)
        if client.get_job_status(job).is_terminal():
            break
        time.sleep(2)
    status = client.get_job_status(job)
    if not status.is_terminal():
        client.stop_job(job)
    return status, client.get_job_logs(job), seen


@pytest.mark.slow
@pytest.mark.cluster
def test_sweep_trials_run_on_separate_launched_nodes(autoscaling, tiny_data_root, tmp_path):
    autoscaling.wait_for_workers(0, timeout=180)
    space = tmp_path / "configs" / "tune"
    space.mkdir(parents=True)
    (space / "two_trials.yaml").write_text(
        "first_trial_from_config: false\n"
        "space:\n  optim.lr: {type: grid, values: [1.0e-3, 2.0e-3]}\n"
    )
    job = autoscaling.submit(
        _command(
            "ray_jobs.tune",
            tiny_data_root,
            tmp_path / "runs",
            "tune=two_trials",
            "tune.name=sweep",
            "tune.num_samples=1",
            "tune.max_concurrent_trials=2",
            "tune.scheduler=fifo",
            # A trial on a node that has only just joined has once failed to place its Train
            # controller there (Ray: "the node ... doesn't exist any more or is infeasible");
            # the sweep restarts a failed trial once, as a sweep on an autoscaler should.
            "tune.max_failures=1",
            "train.max_epochs=1",
            "scaling.num_workers=1",
            flags=f"--config-dir={tmp_path / 'configs'}",
        ),
        None,
    )
    status, logs, launched = _wait_job(autoscaling, job, timeout=900)
    assert status == JobStatus.SUCCEEDED, logs[-3000:] + autoscaling.monitor_log()[-3000:]
    trials = sorted((tmp_path / "runs").glob("sweep-*/epoch_metrics.jsonl"))
    assert len(trials) == 2
    nodes = [_epochs(t.parent)[0]["worker_nodes"][0] for t in trials]
    assert len(set(nodes)) == 2 and set(nodes) <= launched
    autoscaling.wait_for_workers(0, timeout=180)


@pytest.mark.slow
@pytest.mark.cluster
def test_elastic_run_survives_a_preempted_node_and_grows_back(
    autoscaling, tiny_data_root, tmp_path
):
    autoscaling.wait_for_workers(0, timeout=180)
    assert autoscaling.worker_nodes() == {}
    run = tmp_path / "elastic"
    job = autoscaling.submit(
        _command(
            "ray_jobs.train",
            tiny_data_root,
            tmp_path,
            "run_name=elastic",
            "train.max_epochs=14",
            "scaling.num_workers=[1,2]",
            "scaling.max_failures=4",
            "scaling.elastic_resize_monitor_interval_s=5",
        ),
        None,
    )
    client = autoscaling.client()
    submitted = time.monotonic()
    # Preempt one node once the run has trained on two workers past its first epoch, so that a
    # checkpoint has been committed (the log line of an epoch is written before its report).
    while time.monotonic() - submitted < 600:
        log = run / "epoch_metrics.jsonl"
        if log.exists() and _epochs(run)[-1]["world_size"] == 2 and len(_epochs(run)) >= 2:
            break
        assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-3000:]
        time.sleep(1)
    else:
        raise AssertionError("the run never trained an epoch on two workers")
    scale_up = time.monotonic() - submitted
    victim = _epochs(run)[-1]["worker_nodes"][1]
    preempted_after_epoch = _epochs(run)[-1]["epoch"]
    autoscaling.preempt(victim)
    preempted = time.monotonic()
    # The first epoch trained after the loss is a restore from the checkpoint before it.
    while time.monotonic() - preempted < 600:
        if _first_epoch_without(_epochs(run), victim) or client.get_job_status(job).is_terminal():
            break
        time.sleep(1)
    resume_s = time.monotonic() - preempted

    status, logs, _ = _wait_job(autoscaling, job, timeout=900)
    assert status == JobStatus.SUCCEEDED, logs[-3000:] + autoscaling.monitor_log()[-3000:]
    epochs = _epochs(run)
    assert [e["epoch"] for e in epochs] == list(range(1, 15))  # none lost, none repeated
    # The cluster had no worker node, and the head offers no GPU: every epoch's two workers ran
    # on two nodes the autoscaler launched.
    for epoch in epochs:
        nodes = set(epoch["worker_nodes"])
        assert len(nodes) == epoch["world_size"] and FAKE_HEAD_NODE_ID not in nodes, epoch
    worlds = [e["world_size"] for e in epochs]
    after_loss = _first_epoch_without(epochs, victim)
    assert after_loss, worlds
    # Training goes on from the last checkpoint: with 1 worker when the replacement is not up yet
    # (then back to 2 when it is), or with 2 when the autoscaler replaced the node first.
    assert epochs[after_loss]["restored_from_epoch"] == epochs[after_loss - 1]["epoch"]
    assert worlds[-1] == 2, worlds
    # Every change of world size is one restore from the checkpoint of the epoch before, and
    # nothing else restores.
    changes = {i for i in range(1, len(worlds)) if worlds[i] != worlds[i - 1]}
    restores = {i for i, e in enumerate(epochs) if e["restored_from_epoch"] is not None}
    assert restores - {after_loss} == changes - {after_loss}, (worlds, sorted(restores))
    for i in restores:
        assert epochs[i]["restored_from_epoch"] == epochs[i - 1]["epoch"], epochs[i]
    # The global batch is held: each worker accumulates in proportion to the missing workers.
    assert {e["world_size"] * e["accumulation_steps"] for e in epochs} == {2}
    scale_down = autoscaling.wait_for_workers(0, timeout=180)  # idle nodes are terminated
    print(
        f"elastic: 2 workers after {scale_up:.0f} s; node lost after epoch "
        f"{preempted_after_epoch}; training again {resume_s:.0f} s later, at epoch "
        f"{epochs[after_loss]['epoch']} on {worlds[after_loss]} worker(s); world sizes {worlds}; "
        f"no worker node {scale_down:.0f} s after the job"
    )

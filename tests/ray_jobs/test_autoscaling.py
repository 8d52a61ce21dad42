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
    LOGICAL_GPU,
    AutoscalingCluster,
    ClusterFileError,
    load_cluster_file,
    loopback_node_types,
    node_type_for,
)
from conftest import REPO, TINY_MODEL
from ray.job_submission import JobStatus

# A training worker of the GPU presets (1 GPU + CPUs), scaled like the node types.
GPU_WORKER = {"CPU": 1, LOGICAL_GPU: 1}
# Every loopback node shares this machine's Ray temp dir, and a node the autoscaler terminates
# takes the job's unpacked working dir with it: what runs after training must not need the
# driver's cwd (MLflow resolves its store against it), so tracking is off here.
GPU_SCALING = [
    "tracking.enabled=false",
    "scaling.use_gpu=false",
    "scaling.cpus_per_worker=1",
    "scaling.resources_per_worker.CPU=1",
    f"+scaling.resources_per_worker.{LOGICAL_GPU}=1",
]


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "epoch_metrics.jsonl").read_text().splitlines()]


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
@pytest.mark.ray
@pytest.mark.autoscaler
def test_training_job_scales_gpu_nodes_up_and_down(autoscaling, tiny_data_root, tmp_path):
    assert autoscaling.worker_nodes() == {}
    job = autoscaling.submit(
        _command(
            "ray_jobs.train",
            tiny_data_root,
            tmp_path,
            "run_name=scale",
            "train.max_epochs=2",
            "scaling.num_workers=2",
        ),
        str(REPO),
    )
    status, logs, launched = _wait_job(autoscaling, job, timeout=900)
    assert status == JobStatus.SUCCEEDED, logs[-3000:] + autoscaling.monitor_log()[-3000:]
    epochs = _epochs(tmp_path / "scale")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert len(launched) == 2 and set(epochs[-1]["worker_nodes"]) == launched
    scale_down = autoscaling.wait_for_workers(0, timeout=180)
    print(f"scale-down after the job: {scale_down:.0f} s")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.autoscaler
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
            "train.max_epochs=1",
            "scaling.num_workers=1",
            flags=f"--config-dir={tmp_path / 'configs'}",
        ),
        str(REPO),
    )
    status, logs, launched = _wait_job(autoscaling, job, timeout=900)
    assert status == JobStatus.SUCCEEDED, logs[-3000:] + autoscaling.monitor_log()[-3000:]
    trials = sorted((tmp_path / "runs").glob("sweep-*/epoch_metrics.jsonl"))
    assert len(trials) == 2
    nodes = [_epochs(t.parent)[0]["worker_nodes"][0] for t in trials]
    assert len(set(nodes)) == 2 and set(nodes) <= launched
    autoscaling.wait_for_workers(0, timeout=180)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.autoscaler
def test_elastic_run_survives_a_preempted_node_and_grows_back(
    autoscaling, tiny_data_root, tmp_path
):
    autoscaling.wait_for_workers(0, timeout=180)
    run = tmp_path / "elastic"
    job = autoscaling.submit(
        _command(
            "ray_jobs.train",
            tiny_data_root,
            tmp_path,
            "run_name=elastic",
            "train.max_epochs=10",
            "scaling.num_workers=[1,2]",
            "scaling.max_failures=4",
            "scaling.elastic_resize_monitor_interval_s=5",
        ),
        str(REPO),
    )
    client = autoscaling.client()
    submitted = time.monotonic()
    # Preempt one node once the run has trained an epoch on two workers.
    while time.monotonic() - submitted < 600:
        log = run / "epoch_metrics.jsonl"
        if log.exists() and _epochs(run)[-1]["world_size"] == 2:
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

    status, logs, launched = _wait_job(autoscaling, job, timeout=900)
    assert status == JobStatus.SUCCEEDED, logs[-3000:] + autoscaling.monitor_log()[-3000:]
    epochs = _epochs(run)
    assert [e["epoch"] for e in epochs] == list(range(1, 11))
    worlds = [e["world_size"] for e in epochs]
    changes = [i for i in range(1, len(worlds)) if worlds[i] != worlds[i - 1]]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    # Every change of world size is one restore from the checkpoint of the epoch before.
    for i in changes:
        assert epochs[i]["restored_from_epoch"] == epochs[i - 1]["epoch"], epochs[i]
    restores = [e for e in epochs if e["restored_from_epoch"] is not None]
    assert len(restores) == len(changes), worlds
    # The global batch is held: each worker accumulates in proportion to the missing workers.
    assert {e["world_size"] * e["accumulation_steps"] for e in epochs} == {2}
    assert victim not in epochs[-1]["worker_nodes"]  # the replacement is a new node
    first_single = next(e for e in epochs if e["world_size"] == 1)
    print(
        f"elastic: 2 workers after {scale_up:.0f} s; node lost after epoch "
        f"{preempted_after_epoch}; resumed on 1 worker at epoch {first_single['epoch']}; "
        f"world sizes {worlds}; {time.monotonic() - preempted:.0f} s from the loss to the end"
    )

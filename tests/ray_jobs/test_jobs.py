"""``ray job submit`` of the real entrypoint to a two-node Ray cluster on loopback: a run that
asks for a resource no node has says on the job's console what it waits for, and a run whose
training workers must land on both nodes trains there."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_MODEL
from local_cluster import LocalCluster
from mlflow import MlflowClient
from ray.job_submission import JobStatus

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def cluster():
    local = LocalCluster()
    try:
        yield local
    finally:
        local.stop()


def test_job_submit_trains_on_both_nodes_of_a_two_node_cluster(
    cluster, tiny_data_root, tmp_path, monkeypatch
):
    """Submitted as README shows it: ``--working-dir .`` with the submitter's directory as
    DIPRO_ROOT and no output path on the command line; the two training workers land on the two
    nodes. The run, its log, Hydra's record and the MLflow run land below DIPRO_ROOT/outputs,
    nothing in the job's copy, and they are all there once the copy is gone: both nodes share
    this machine's Ray temp dir, so the second node's runtime-env agent deletes the driver's
    working directory while it runs (as Ray does when its cache of copies is full). The cluster
    starts without the tests' MLFLOW_TRACKING_URI: the job uses the default store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cluster.start_head(num_cpus=2, resources={"head_node": 1})
    cluster.add_worker(num_cpus=2, resources={"second_node": 1})
    root = tmp_path / "submitter"
    command = " ".join(
        [
            sys.executable,
            "-m",
            "ray_jobs.train",
            "task=mortality",
            f"data.root={tiny_data_root}",
            "run_name=job",
            "train.max_epochs=1",
            *TINY_MODEL,
            "tracking.enabled=true",
            "scaling.resources_per_worker.CPU=1",
            "+scaling.placement_strategy=STRICT_SPREAD",
        ]
    )
    _a_run_waiting_for_a_resource_says_so(cluster, tiny_data_root, root)
    job = cluster.submit(command, str(REPO), env_vars={"DIPRO_ROOT": str(root)})
    status, logs = cluster.wait(job, timeout=600)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    for copy in cluster.working_dir_copies():
        assert not (copy / "outputs").exists(), copy
        shutil.rmtree(copy, ignore_errors=True)  # unless Ray is deleting it already

    outputs = root / "outputs"
    run_dir = outputs / "runs" / "job"
    epochs = [json.loads(x) for x in (run_dir / "epoch_metrics.jsonl").read_text().splitlines()]
    assert len(set(epochs[0]["worker_nodes"])) == 2, epochs[0]["worker_nodes"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"] is not None and "auprc" in metrics["test"]
    assert f"outputs: {run_dir}" in logs  # the job's header says where
    assert "===== job " in (outputs / "logs" / "job.log").read_text()
    assert list((outputs / "hydra" / "train").glob("*/.hydra/config.yaml"))
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dipro")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'job'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/auprc"] == pytest.approx(metrics["test"]["auprc"])


def _a_run_waiting_for_a_resource_says_so(
    cluster: LocalCluster, data_root: Path, root: Path
) -> None:
    """No silent wait: a run asking for a resource the cluster does not have (a custom one
    here, as a GPU or a node type would be) waits, and once it has waited ``resource_wait_s``
    seconds says on the console what it waits for and what the cluster offers; then it is
    stopped, having trained nothing."""
    command = [
        sys.executable,
        "-m",
        "ray_jobs.train",
        "task=mortality",
        f"data.root={data_root}",
        "run_name=waits",
        *TINY_MODEL,
        "scaling.num_workers=1",
        "+scaling.resources_per_worker.accelerator_slot=1",  # no node has one
        "resource_wait_s=5",
    ]
    job = cluster.submit(" ".join(command), None, env_vars={"DIPRO_ROOT": str(root)})
    client = cluster.client()

    def said() -> list[str]:
        return [x for x in client.get_job_logs(job).splitlines() if x.startswith("waiting ")]

    deadline = time.monotonic() + 300
    while not said():
        status = client.get_job_status(job)
        assert not status.is_terminal(), client.get_job_logs(job)[-3000:]  # waiting, not failed
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    (line, *_) = said()
    client.stop_job(job)
    status, _ = cluster.wait(job, timeout=120)
    assert status == JobStatus.STOPPED
    assert "s for resources: a placement group of 1 x {CPU: 1, accelerator_slot: 1}" in line
    offer = "CPU 4/4, GPU 0/0, accelerator_slot 0/0, head_node 1/1, second_node 1/1;"
    assert f"The cluster has (free/total) {offer}" in line
    assert not list((root / "outputs" / "runs" / "waits").glob("checkpoint_*"))  # nothing trained

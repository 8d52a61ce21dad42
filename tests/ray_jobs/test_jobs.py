"""``ray job submit`` of the real entrypoint to a two-node Ray cluster on loopback, whose
training workers must land on both nodes."""

from __future__ import annotations

import json
import shutil
import sys

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

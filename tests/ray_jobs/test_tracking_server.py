"""Training and a sweep tracked on a real ``mlflow server`` (SQLite backend, loopback port), read
back through ``MlflowClient``: runs, params, metric histories, artifacts, the registered model
version, the sweep's children under their parent."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_MODEL, compose_train
from local_mlflow import running_server
from mlflow import MlflowClient
from test_tune import compose_tune

from dipro.data.layout import read_manifest
from dipro.tracking import PARENT_TAG, RUN_DIR_TAG, dataset_identity, numeric_metrics
from ray_jobs.training import run_training
from ray_jobs.tune import run_sweep

# A training run, a two-trial sweep and a server start: ~3 min idle, 15+ min on a busy 2-core box.
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(2400)]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on a free loopback port over a SQLite store in its own directory;
    stopped (its whole process group) at the end."""
    with running_server(tmp_path / "mlflow-server") as (uri, _):
        yield uri


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(
        sa == sb and (va == vb or (math.isnan(va) and math.isnan(vb)))
        for (sa, va), (sb, vb) in zip(a, b, strict=True)
    )


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "epoch_metrics.jsonl").read_text().splitlines()]


def _assert_history_is_the_run_dir(client: MlflowClient, run_id: str, run_dir: Path) -> None:
    epochs = _epochs(run_dir)
    keys = set().union(*(numeric_metrics(e) for e in epochs))
    assert {"epoch", "train/loss", "val/loss", "train/samples_per_s"} <= keys
    for key in keys:
        expected = sorted((int(e["epoch"]), float(e[key])) for e in epochs if key in e)
        assert _same(_history(client, run_id, key), expected), key


def _run_of(client: MlflowClient, run_dir: Path):  # noqa: ANN202
    experiment = client.get_experiment_by_name("dipro")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'"
    )
    return run


def test_training_and_sweep_tracked_on_an_mlflow_server(
    mlflow_server, tiny_data_root, ray_session, tmp_path
):
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    tracking = ["tracking.enabled=true", f"tracking.uri={mlflow_server}"]
    cfg = compose_train(
        [
            "task=mortality",
            f"data.root={tiny_data_root}",
            f"storage_path={tmp_path}",
            "run_name=tracked",
            *TINY_MODEL,
            "train.max_epochs=2",
            *tracking,
        ]
    )
    result = run_training(cfg)

    run_dir = Path(result.run_dir)
    run = _run_of(client, run_dir)
    assert run.info.run_id == result.mlflow_run and run.info.status == "FINISHED"
    params = run.data.params
    assert params["task.name"] == "mortality" and float(params["optim.lr"]) == cfg.optim.lr
    assert params["train.max_epochs"] == "2" and params["run_name"] == "tracked"
    identity = dataset_identity(
        str(tiny_data_root), read_manifest(tiny_data_root, "mortality").to_dict()
    )
    assert {k: params[k] for k in identity} == identity
    _assert_history_is_the_run_dir(client, run.info.run_id, run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["test/auprc"] == summary["test"]["auprc"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"metrics.json", "checkpoint"}
    stored = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    checkpoint = Path(summary["best_checkpoint"])
    assert stored == {
        "checkpoint/model.pt": checkpoint.stat().st_size,
        "checkpoint/config.json": (checkpoint.parent / "config.json").stat().st_size,
    }
    (version,) = client.search_model_versions("name='dipro-mortality'")
    assert version.run_id == run.info.run_id and version.source.endswith("/checkpoint")
    assert version.tags["task"] == "mortality"
    assert version.tags["best_epoch"] == str(summary["best_epoch"])
    assert float(version.tags["val/auprc"]) == summary["val"]["val/auprc"]
    assert version.tags["checkpoint"] == summary["best_checkpoint"]

    sweep_cfg = compose_tune(
        tiny_data_root, tmp_path, "tracked-sweep", "tune.num_samples=1", *tracking
    )
    sweep = run_sweep(sweep_cfg)

    parent = _run_of(client, Path(sweep.sweep_dir))
    assert parent.data.tags["dipro.kind"] == "sweep"
    assert parent.data.metrics["best/val/auprc"] == sweep.best_value
    assert {"trials.csv", "trials.md", "best.yaml", "best.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
    )
    trial_dirs = sorted(p.parent for p in tmp_path.glob("tracked-sweep-*/epoch_metrics.jsonl"))
    assert len(trial_dirs) == 1
    assert sorted(c.data.tags[RUN_DIR_TAG] for c in children) == [str(d) for d in trial_dirs]
    for child in children:
        trial_dir = Path(child.data.tags[RUN_DIR_TAG])
        _assert_history_is_the_run_dir(client, child.info.run_id, trial_dir)
        assert child.data.params["run_name"] == trial_dir.name
    assert len(client.search_model_versions("name='dipro-mortality'")) == 1

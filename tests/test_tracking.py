"""``dipro.tracking`` on a local SQLite store: where runs go, and tracking a run directory again
(a resumed run) continues the same MLflow run without repeating an epoch or a model version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dipro.settings import TrackingSettings, parse
from dipro.tracking import Tracker, dataset_identity, flatten, track_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# MLflow 3.17's SQLite store (the pinned version) configures its mappers with SQLAlchemy's
# deprecated ``noload`` loader; the warning comes from MLflow's code, once per process.
MLFLOW_NOLOAD = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)
pytestmark = MLFLOW_NOLOAD


def test_a_directory_is_a_sqlite_store_with_artifacts_beside_it(tmp_path):
    local = TrackingSettings(enabled=True, uri=str(tmp_path / "mlflow"))
    assert local.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert local.artifact_location == (tmp_path / "mlflow" / "artifacts" / "dipro").as_uri()
    server = TrackingSettings(enabled=True, uri="http://mlflow.example.org:5000")
    assert server.tracking_uri == "http://mlflow.example.org:5000"
    assert server.artifact_location is None
    assert not parse(TrackingSettings, {}, "tracking").enabled


def test_flatten_and_dataset_identity():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "None",
        "e": "{}",
    }
    manifest = {
        "task": "mortality",
        "schema_version": 1,
        "generator": {"name": "synthetic", "version": 2},
        "files": {"b.parquet": "22", "a.parquet": "11"},
    }
    identity = dataset_identity("/data", manifest)
    assert identity["dataset.generator"] == "synthetic v2" and identity["dataset.files"] == "2"
    changed = dataset_identity(
        "/data", {**manifest, "files": {"b.parquet": "22", "a.parquet": "12"}}
    )
    assert changed["dataset.checksums_sha256"] != identity["dataset.checksums_sha256"]


def _write_run(run_dir: Path, epochs: int, best_epoch: int) -> None:
    """The files a training run leaves, as ``ray_jobs.train`` writes them."""
    checkpoint = run_dir / f"checkpoint_{best_epoch}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "model.pt").write_bytes(b"weights")
    (checkpoint / "config.json").write_text("{}")
    records = [
        {"epoch": e, "val/auprc": 0.1 * e, "train/loss": 1.0 / e, "worker_nodes": ["n1"]}
        for e in range(1, epochs + 1)
    ]
    (run_dir / "epoch_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "task": "mortality",
        "best_checkpoint": str(checkpoint / "model.pt"),
        "best_epoch": best_epoch,
        "val": {"val/auprc": 0.1 * best_epoch},
        "test": {"auprc": 0.3, "per_finding/x": 0.2},
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary))


@pytest.mark.slow  # a new SQLite store runs MLflow's migrations: 10-30 s here
def test_tracking_a_resumed_run_continues_its_mlflow_run(tmp_path):
    tracker = Tracker(
        TrackingSettings(
            enabled=True,
            uri=str(tmp_path / "mlflow"),
            experiment="test",
            model_name="dipro-mortality",
        )
    )
    overrides = ["task=mortality", f"storage_path={tmp_path / 'runs'}", "run_name=r"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        composed = compose("train", overrides=[*overrides, "data.root=/data"])
    cfg = OmegaConf.to_container(composed, resolve=True)
    manifest = {"task": "mortality", "files": {"a": "1"}}
    run_dir = tmp_path / "runs" / "r"
    _write_run(run_dir, epochs=2, best_epoch=2)
    first = track_training(tracker, cfg, manifest)
    again = track_training(tracker, cfg, manifest)
    _write_run(run_dir, epochs=3, best_epoch=3)
    resumed = track_training(tracker, cfg, manifest)

    assert first == again == resumed
    client = tracker.client
    history = [(m.step, m.value) for m in client.get_metric_history(first, "val/auprc")]
    assert sorted(history) == [(1, 0.1), (2, 0.2), (3, 0.1 * 3)]
    run = client.get_run(first)
    assert run.data.params["optim.lr"] == str(cfg["optim"]["lr"]) and run.info.status == "FINISHED"
    assert "worker_nodes" not in run.data.metrics and run.data.metrics["test/auprc"] == 0.3
    versions = client.search_model_versions("name='dipro-mortality'")
    assert sorted(v.tags["best_epoch"] for v in versions) == ["2", "3"]
    assert all(v.run_id == first for v in versions)
    local = Path(client.download_artifacts(first, "checkpoint", str(tmp_path / "dl")))
    assert (local / "model.pt").read_bytes() == b"weights"

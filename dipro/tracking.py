"""Experiment tracking in MLflow: every training run, sweep, study and federation is an MLflow run.

The run directory stays the source of truth: what is tracked is read back from the files a run
leaves (``epoch_metrics.jsonl`` or ``round_metrics.jsonl``, ``metrics.json``, the checkpoint,
the report), after the work that wrote them, by the process that drives it. Logging again is
harmless: a run is found again by its directory (tag ``dipro.run_dir``), parameters it already
holds are kept, and only the epochs (rounds) after the last one it holds are added. So a resumed
run continues its MLflow run, and a study that reuses a finished run links the run it has.

Where runs go (``tracking`` in the configs): ``uri`` is a directory (the default,
``outputs/mlflow``: a SQLite store ``mlflow.db`` with the artifacts beside it, no server needed)
or any MLflow tracking URI (``http://mlflow.hospital.org:5000``, ``sqlite:///...``,
``databricks``). ``experiment`` names the MLflow experiment. A training run's best checkpoint
(weights and config) is logged as artifacts and registered as a version of the model
``model_name`` with its task, epoch and metrics as tags.

This module imports neither Ray nor Flower; MLflow is imported when a ``Tracker`` is made, so
``tracking.enabled=false`` costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dipro import storage
from dipro.data.shards import files_digest
from dipro.runs import RUN_CONFIG_FILE, SUMMARY_FILE, epoch_log, read_log, run_dir_of

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
RUN_DIR_TAG = "dipro.run_dir"
KIND_TAG = "dipro.kind"
PARENT_TAG = "mlflow.parentRunId"
_PARAM_VALUE_LIMIT = 6000  # MLflow's longest parameter value


@dataclass(frozen=True)
class TrackingSettings:
    """The ``tracking`` config node."""

    enabled: bool
    uri: str
    experiment: str
    model_name: str | None = None

    @classmethod
    def from_dict(cls, node: Mapping[str, Any]) -> TrackingSettings:
        """From the config's ``tracking`` section (an empty one means tracking is off)."""
        return cls(
            enabled=bool(node.get("enabled", False)),
            uri=str(node.get("uri") or ""),
            experiment=str(node.get("experiment") or "dipro"),
            model_name=node.get("model_name"),
        )

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: a directory becomes its SQLite store."""
        if "://" in self.uri or self.uri == "databricks":
            return self.uri
        return f"sqlite:///{Path(self.uri).resolve() / STORE_FILE}"

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside a SQLite store (MLflow's default
        would be ``./mlruns`` under the current directory); a server's own root otherwise."""
        uri = self.tracking_uri
        if not uri.startswith("sqlite:///"):
            return None
        database = Path(uri.removeprefix("sqlite:///"))
        return (database.parent / ARTIFACTS_DIR / self.experiment).as_uri()

    def describe(self) -> str:
        """One line for a console header."""
        if not self.enabled:
            return "off (tracking.enabled=false)"
        if self.artifact_location is None:
            return f"{self.tracking_uri}, experiment {self.experiment}"
        return (
            f"{self.tracking_uri}, experiment {self.experiment} "
            f"(browse: mlflow ui --backend-store-uri {self.tracking_uri})"
        )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted keys, values as text (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            out[name] = text[:_PARAM_VALUE_LIMIT]
    return out


def dataset_identity(root: str, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Parameters naming a dataset: its root, schema and generator version and one digest of
    every shard's checksum (two datasets with the same digest hold the same bytes)."""
    files = manifest.get("files") or {}
    digest = files_digest(files)
    generator = manifest.get("generator") or {}
    return {
        "dataset.root": str(root),
        "dataset.task": str(manifest.get("task")),
        "dataset.schema_version": str(manifest.get("schema_version")),
        "dataset.generator": f"{generator.get('name', 'unknown')} v{generator.get('version', '?')}",
        "dataset.files": str(len(files)),
        "dataset.checksums_sha256": digest,
    }


def numeric_metrics(record: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The numeric values of one metrics record (lists, text and ``skip`` keys dropped)."""
    skipped = set(skip)
    return {
        k: float(v)
        for k, v in record.items()
        if k not in skipped and isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """One MLflow experiment, through ``MlflowClient`` (no global active run, so a tracker can
    be used from any thread or process)."""

    def __init__(self, settings: TrackingSettings) -> None:
        from mlflow import MlflowClient  # seconds to import: only when tracking is on

        self.settings = settings
        self.client = MlflowClient(
            tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri
        )
        found = self.client.get_experiment_by_name(settings.experiment)
        self.experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                settings.experiment, artifact_location=settings.artifact_location
            )
        )

    def run(self, run_dir: str, name: str, kind: str, parent: str | None = None) -> str:
        """The id of the MLflow run of ``run_dir`` (created when there is none), marked running
        and under ``parent`` when one is given."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
            max_results=1,
        )
        tags = {RUN_DIR_TAG: run_dir, KIND_TAG: kind}
        if parent is not None:
            tags[PARENT_TAG] = parent
        if not found:
            return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        run_id = found[0].info.run_id
        for key, value in tags.items():
            if found[0].data.tags.get(key) != value:
                self.client.set_tag(run_id, key, value)
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Log the parameters the run does not hold yet (MLflow parameters are write-once; a
        resumed run keeps the values it started with)."""
        from mlflow.entities import Param

        held = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in held]
        if new:
            self.client.log_batch(run_id, params=new)

    def log_history(
        self, run_id: str, records: list[dict[str, Any]], step_key: str, skip: Iterable[str] = ()
    ) -> int:
        """Log each record's numeric values with ``record[step_key]`` as the step, for the steps
        after the last one the run holds; returns how many records were added."""
        from mlflow.entities import Metric

        held = self.client.get_run(run_id).data.metrics.get(step_key)
        last = -math.inf if held is None else held
        now = int(time.time() * 1000)
        added = 0
        for record in records:
            step = int(record[step_key])
            if step <= last:
                continue
            values = numeric_metrics(record, skip)
            metrics = [Metric(k, v, now, step) for k, v in values.items()]
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
            added += 1
        return added

    def log_summary(self, run_id: str, values: Mapping[str, Any], prefix: str) -> None:
        """Log a dict of final numbers (test metrics, the best value) once, under ``prefix``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}{k}", v, now, 0) for k, v in numeric_metrics(values).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def log_files(self, run_id: str, uris: Iterable[str], artifact_path: str | None) -> None:
        """Copy files (local paths or storage URIs) into the run's artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            for uri in uris:
                if not storage.exists(uri):
                    continue
                local = os.path.join(tmp, os.path.basename(uri))
                Path(local).write_bytes(storage.read_bytes(uri))
                self.client.log_artifact(run_id, local, artifact_path)

    def log_dir(self, run_id: str, local_dir: str | os.PathLike[str], artifact_path: str) -> None:
        """Copy a local directory (a report with its figures) into the run's artifacts."""
        self.client.log_artifacts(run_id, os.fspath(local_dir), artifact_path)

    def register(
        self, run_id: str, artifact_path: str, tags: Mapping[str, Any], description: str
    ) -> str | None:
        """Register the run's ``artifact_path`` as a version of ``settings.model_name``; a run
        already registered with the same tags is not registered again. Returns the version."""
        from mlflow.exceptions import MlflowException

        name = self.settings.model_name
        if not name:
            return None
        text_tags = {k: str(v) for k, v in tags.items()}
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for version in self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if all(version.tags.get(k) == v for k, v in text_tags.items()):
                return version.version
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(
            name, source, run_id=run_id, tags=text_tags, description=description
        )
        return version.version

    def finish(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def open_tracker(cfg: Mapping[str, Any]) -> Tracker | None:
    """The tracker of a config's ``tracking`` node, or None when tracking is off."""
    settings = TrackingSettings.from_dict(cfg.get("tracking") or {})
    return Tracker(settings) if settings.enabled else None


def track_training(
    tracker: Tracker,
    cfg: Mapping[str, Any],
    manifest: Mapping[str, Any],
    *,
    parent: str | None = None,
    register: bool = True,
    kind: str = "train",
) -> str:
    """Track the training run of ``cfg`` (resolved, as a plain mapping) from what its directory
    ``{storage_path}/{run_name}`` holds; returns the MLflow run id.

    Parameters: the config and ``dataset_identity`` of ``manifest``; metrics: every line of
    ``epoch_metrics.jsonl`` with the epoch as step and, once ``metrics.json`` is there, the test
    metrics (``test/...``). With ``register``, the best checkpoint (``model.pt`` and its
    ``config.json``) is logged under ``checkpoint/`` and registered as a version of
    ``tracking.model_name``, tagged with the task, best epoch, monitor and test metrics.
    """
    directory = run_dir_of(cfg)
    run_id = tracker.run(directory, str(cfg["run_name"]), kind, parent)
    dataset = dataset_identity(str(cfg["data"]["root"]), manifest)
    tracker.log_params(run_id, {**flatten(cfg), **dataset})
    tracker.log_history(run_id, read_log(epoch_log(directory)), "epoch")
    summary_uri = storage.join(directory, SUMMARY_FILE)
    if storage.exists(summary_uri):
        summary = json.loads(storage.read_bytes(summary_uri))
        tracker.log_summary(run_id, summary.get("test") or {}, "test/")
        tracker.log_files(run_id, [summary_uri], None)
        if register:
            checkpoint = str(summary["best_checkpoint"])
            files = [checkpoint, storage.join(posixpath.dirname(checkpoint), RUN_CONFIG_FILE)]
            tracker.log_files(run_id, files, "checkpoint")
            monitor = str(cfg["task"]["monitor"])
            test = numeric_metrics(summary.get("test") or {})
            tags = {
                "task": summary["task"],
                "best_epoch": summary["best_epoch"],
                "monitor": monitor,
                monitor: (summary.get("val") or {}).get(monitor),
                **{f"test/{k}": round(v, 6) for k, v in test.items() if "/" not in k},
                "checkpoint": checkpoint,
            }
            tracker.register(
                run_id,
                "checkpoint",
                tags,
                f"best checkpoint of {cfg['run_name']} (epoch {summary['best_epoch']}), trained "
                f"on {dataset['dataset.root']}",
            )
    tracker.finish(run_id)
    return run_id

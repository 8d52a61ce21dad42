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

Tracking is never the reason a run fails. ``open_tracker`` reaches the store once, before the
work starts; every call to the store is tried ``ATTEMPTS`` times with a short backoff (and
MLflow's own HTTP retries and timeout are bounded, ``HTTP_BOUNDS``, unless the environment sets
them). A store that does not answer is one warning line; tracking is then skipped for the rest
of the run, which goes on and leaves its directory, from which ``python -m ray_jobs.track
RUN_DIR`` logs it later. With ``tracking.required=true`` the run stops instead, with one line
(``TrackingUnavailable``), before it trains when the store is down at the start.

This module imports neither Ray nor Flower; MLflow is imported when a ``Tracker`` is made, so
``tracking.enabled=false`` costs nothing.
"""

from __future__ import annotations

import functools
import json
import math
import os
import posixpath
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from dipro import storage
from dipro.data.layout import files_digest
from dipro.runs import (
    EPOCH_METRICS_FILE,
    ROUND_METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    read_log,
    run_dir,
)
from dipro.settings import TrackingSettings, TrainingRun, parse

if TYPE_CHECKING:
    from mlflow import MlflowClient

P = ParamSpec("P")
R = TypeVar("R")

RUN_DIR_TAG = "dipro.run_dir"
KIND_TAG = "dipro.kind"
PARENT_TAG = "mlflow.parentRunId"
_PARAM_VALUE_LIMIT = 6000  # MLflow's longest parameter value
REPLAY_COMMAND = "python -m ray_jobs.track"
ATTEMPTS = 3  # tries of one call to the store before tracking is skipped
BACKOFF_S = 1.0  # seconds before the second try, doubled before each later one
# MLflow's HTTP client retries a refused connection 7 times with a backoff factor of 2 s and
# waits 120 s for an answer: minutes per call on a dead server. Bounded unless the environment
# sets them.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer and ``tracking.required`` is true."""


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


def _reason(err: BaseException) -> str:
    """What went wrong, short: the OS error behind a failed connection (``Connection
    refused``), else the first line of the error, cut to 200 characters."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:200]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _bounded(
    action: str,
) -> Callable[[Callable[Concatenate[Tracker, P], R]], Callable[Concatenate[Tracker, P], R | None]]:
    """A ``Tracker`` method that the store cannot fail: tried ``ATTEMPTS`` times, then skipped
    (None) with one warning, or ``TrackingUnavailable`` when tracking is required
    (``Tracker.attempt``). ``action`` names it in that line."""

    def wrap(
        method: Callable[Concatenate[Tracker, P], R],
    ) -> Callable[Concatenate[Tracker, P], R | None]:
        @functools.wraps(method)
        def call(self: Tracker, *args: P.args, **kwargs: P.kwargs) -> R | None:
            return self.attempt(action, lambda: method(self, *args, **kwargs))

        return call

    return wrap


class Tracker:
    """One MLflow experiment, through ``MlflowClient`` (no global active run, so a tracker can
    be used from any thread or process).

    Every method that calls the store is bounded (``attempt``): once a call has failed
    ``ATTEMPTS`` times the tracker is ``skipped`` and its methods return None without calling
    the store again, so an outage costs one warning line and a few seconds, not the run.
    ``say`` prints that line (default: stderr); ``replay`` is the run directory (or a pattern
    of them) that ``python -m ray_jobs.track`` logs later, named in it.
    """

    client: MlflowClient
    experiment_id: str

    def __init__(
        self,
        settings: TrackingSettings,
        *,
        replay: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        for name, value in HTTP_BOUNDS.items():
            os.environ.setdefault(name, value)
        self.settings = settings
        self.replay = replay
        self.say = say or _stderr
        self.skipped = False
        self.connect()

    def attempt(self, action: str, call: Callable[[], R]) -> R | None:
        """``call()``, tried up to ``ATTEMPTS`` times with a doubling backoff; None without
        calling it once the tracker is skipped. When every try fails the tracker is skipped
        and one warning names the store, what failed and how to replay the run, or, with
        ``settings.required``, ``TrackingUnavailable`` says so."""
        if self.skipped:
            return None
        for number in range(1, ATTEMPTS + 1):
            try:
                return call()
            except Exception as err:  # whatever the store raised: tracking never ends a run
                error = err
                if number < ATTEMPTS:
                    time.sleep(BACKOFF_S * 2 ** (number - 1))
        self.skipped = True
        failed = (
            f"MLflow tracking store {self.settings.tracking_uri}: {action} failed "
            f"{ATTEMPTS} times ({_reason(error)})"
        )
        if self.settings.required:
            raise TrackingUnavailable(
                f"{failed}; tracking.required=true stops the run (with false it goes on "
                "untracked and is logged later)"
            ) from None
        replay = f" (once the store is back: {REPLAY_COMMAND} {self.replay})" if self.replay else ""
        self.say(
            f"warning: {failed}; tracking is skipped for the rest of this run, its directory "
            f"stays the record{replay}"
        )
        return None

    @_bounded("connecting")
    def connect(self) -> None:
        """Open the store and find (or create) the experiment: the one probe of a run."""
        from mlflow import MlflowClient  # seconds to import: only when tracking is on

        uri = self.settings.tracking_uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(self.settings.experiment)
        self.experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                self.settings.experiment, artifact_location=self.settings.artifact_location
            )
        )

    @_bounded("finding the run")
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

    @_bounded("logging parameters")
    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Log the parameters the run does not hold yet (MLflow parameters are write-once; a
        resumed run keeps the values it started with)."""
        from mlflow.entities import Param

        held = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in held]
        if new:
            self.client.log_batch(run_id, params=new)

    @_bounded("logging metrics")
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

    @_bounded("logging metrics")
    def log_summary(self, run_id: str, values: Mapping[str, Any], prefix: str) -> None:
        """Log a dict of final numbers (test metrics, the best value) under ``prefix``, those
        the run does not already hold with the same value (tracking a run again adds nothing)."""
        from mlflow.entities import Metric

        held = self.client.get_run(run_id).data.metrics
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{prefix}{k}", v, now, 0)
            for k, v in numeric_metrics(values).items()
            if held.get(f"{prefix}{k}") != v
        ]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    @_bounded("logging artifacts")
    def log_files(self, run_id: str, uris: Iterable[str], artifact_path: str | None) -> None:
        """Copy files (local paths or storage URIs) into the run's artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            for uri in uris:
                if not storage.exists(uri):
                    continue
                local = os.path.join(tmp, os.path.basename(uri))
                Path(local).write_bytes(storage.read_bytes(uri))
                self.client.log_artifact(run_id, local, artifact_path)

    @_bounded("logging artifacts")
    def log_dir(self, run_id: str, local_dir: str | os.PathLike[str], artifact_path: str) -> None:
        """Copy a local directory (a report with its figures) into the run's artifacts."""
        self.client.log_artifacts(run_id, os.fspath(local_dir), artifact_path)

    @_bounded("registering the model")
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

    @_bounded("ending the run")
    def finish(self, run_id: str, failed: bool = False) -> None:
        """Mark the run finished (or failed)."""
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def open_tracker(
    settings: TrackingSettings,
    *,
    replay: str | None = None,
    say: Callable[[str], None] | None = None,
) -> Tracker | None:
    """The tracker of the ``tracking`` settings, its store reached once; None when tracking is
    off, or when the store did not answer (one warning through ``say``, naming ``replay``, the
    run directory to log later with ``python -m ray_jobs.track``).

    Raises:
        TrackingUnavailable: the store did not answer and ``tracking.required`` is true.
    """
    if not settings.enabled:
        return None
    tracker = Tracker(settings, replay=replay, say=say)
    return None if tracker.skipped else tracker


def parent_run(
    tracker: Tracker, directory: str, name: str, kind: str, params: Mapping[str, Any]
) -> str | None:
    """The MLflow run that groups others (a sweep's trials, a study's runs) for ``directory``,
    with ``params`` (nested, flattened); None when the store stopped answering."""
    run_id = tracker.run(directory, name, kind)
    if run_id is not None:
        tracker.log_params(run_id, flatten(params))
    return run_id


def track_run(
    tracker: Tracker,
    directory: str,
    name: str,
    kind: str,
    params: Mapping[str, str],
    *,
    parent: str | None = None,
) -> tuple[str, dict[str, Any] | None] | None:
    """Track any run, a Ray Train run or a federated one, from what its ``directory`` holds:
    ``params``, every line of its metrics log (``epoch_metrics.jsonl`` with the epoch as step,
    ``round_metrics.jsonl`` with the round) and, once ``metrics.json`` is there, its test
    metrics (``test/...``) and the file. Returns the MLflow run id and the summary (None before
    the run has one); None when the store stopped answering. Tracking the same directory again
    adds only what the MLflow run does not hold yet; the caller finishes the run."""
    run_id = tracker.run(directory, name, kind, parent)
    if run_id is None:
        return None
    tracker.log_params(run_id, params)
    for log, step in ((EPOCH_METRICS_FILE, "epoch"), (ROUND_METRICS_FILE, "round")):
        uri = storage.join(directory, log)
        if storage.exists(uri):
            tracker.log_history(run_id, read_log(uri), step)
    summary_uri = storage.join(directory, SUMMARY_FILE)
    if not storage.exists(summary_uri):
        return run_id, None
    summary = json.loads(storage.read_bytes(summary_uri))
    tracker.log_summary(run_id, summary.get("test") or {}, "test/")
    tracker.log_files(run_id, [summary_uri], None)
    return run_id, summary


def track_training(
    tracker: Tracker,
    cfg: Mapping[str, Any],
    manifest: Mapping[str, Any],
    *,
    parent: str | None = None,
    register: bool = True,
    kind: str = "train",
) -> str | None:
    """Track the training run of ``cfg`` (resolved, as a plain mapping) from what its directory
    ``{storage_path}/{run_name}`` holds; returns the MLflow run id, or None when the store
    stopped answering on the way and tracking was skipped (``Tracker.attempt``). Tracking the
    same directory again adds only what the MLflow run does not hold yet (``python -m
    ray_jobs.track`` relies on it).

    Parameters: the config and ``dataset_identity`` of ``manifest``; metrics: every line of
    ``epoch_metrics.jsonl`` with the epoch as step and, once ``metrics.json`` is there, the test
    metrics (``test/...``). With ``register``, the best checkpoint (``model.pt`` and its
    ``config.json``) is logged under ``checkpoint/`` and registered as a version of
    ``tracking.model_name``, tagged with the task, best epoch, monitor and test metrics.
    """
    run = parse(TrainingRun, cfg)
    directory = run_dir(run.storage_path, run.run_name)
    dataset = dataset_identity(run.data.root, manifest)
    tracked = track_run(
        tracker, directory, run.run_name, kind, {**flatten(cfg), **dataset}, parent=parent
    )
    if tracked is None:
        return None
    run_id, summary = tracked
    if summary is not None and register:
        checkpoint = str(summary["best_checkpoint"])
        files = [checkpoint, storage.join(posixpath.dirname(checkpoint), RUN_CONFIG_FILE)]
        tracker.log_files(run_id, files, "checkpoint")
        monitor = run.task.monitor
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
            f"best checkpoint of {run.run_name} (epoch {summary['best_epoch']}), trained "
            f"on {dataset['dataset.root']}",
        )
    tracker.finish(run_id)
    return None if tracker.skipped else run_id

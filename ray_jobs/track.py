"""Log a training run's directory into MLflow afterwards: ``python -m ray_jobs.track RUN_DIR``.

The run directory is the record of a run; MLflow is a view of it. A run whose tracking store
did not answer (``dipro.tracking``: a warning, and the run went on) is logged from its directory
once the store is back: its configuration (the ``config.json`` of its newest checkpoint, as its
last start trained), the dataset's identity, every epoch of ``epoch_metrics.jsonl``, the test
metrics and ``metrics.json``, and the best checkpoint, registered as a model version.

It goes where the run would have logged (its ``tracking`` settings) unless ``--uri``,
``--experiment`` or ``--model-name`` say otherwise. Replaying is idempotent: the MLflow run is
found again by its directory and only what it does not hold yet is added
(``dipro.tracking.track_training``), so a second replay, or a replay of a run that was tracked
in part, changes nothing that is there. A store that does not answer ends the command with one
line, ``tracking error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from dipro import storage, tracking
from dipro.config import exit_on
from dipro.data.layout import read_manifest
from dipro.runs import RUN_CONFIG_FILE, checkpoint_files, run_dir_of
from dipro.settings import TrainingRun, parse


class ReplayError(ValueError):
    """The directory is not one a training run leaves."""


def _same_directory(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def run_config(run_dir: str) -> dict[str, Any]:
    """The configuration the run in ``run_dir`` last trained with (its newest checkpoint's
    ``config.json``). A run directory that was moved keeps its configuration with
    ``storage_path`` and ``run_name`` pointing at where it is now.

    Raises:
        ReplayError: ``run_dir`` holds no checkpoint with its configuration.
    """
    for checkpoint in checkpoint_files(run_dir):
        config_uri = storage.join(posixpath.dirname(checkpoint), RUN_CONFIG_FILE)
        if storage.exists(config_uri):
            cfg = json.loads(storage.read_bytes(config_uri))
            break
    else:
        raise ReplayError(
            f"{run_dir} holds no checkpoint_*/{RUN_CONFIG_FILE}: not the directory of a "
            "training run that finished an epoch"
        )
    if not _same_directory(run_dir_of(cfg), run_dir):
        parent, name = posixpath.split(run_dir.rstrip("/"))
        cfg["storage_path"], cfg["run_name"] = parent, name
    return cfg


def replay(
    run_dir: str,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    model_name: str | None = None,
) -> tuple[str | None, tracking.TrackingSettings]:
    """Log the run in ``run_dir`` into MLflow (``tracking.track_training``); returns the MLflow
    run id and where it went. Tracking is required here: a store that stops answering raises.

    Raises:
        ReplayError: ``run_dir`` is not a training run's directory.
        FileNotFoundError: the run's dataset (``data.root``) is not there to identify.
        TrackingUnavailable: the store does not answer.
    """
    cfg = run_config(run_dir)
    run = parse(TrainingRun, cfg)
    given = {"uri": uri, "experiment": experiment, "model_name": model_name}
    settings = replace(
        run.tracking,
        enabled=True,
        required=True,
        **{key: value for key, value in given.items() if value is not None},
    )
    manifest = read_manifest(run.data.root, run.task.name).to_dict()
    tracker = tracking.Tracker(settings)
    return tracking.track_training(tracker, cfg, manifest), tracker.settings


def _local(path: str) -> str:
    """A local path made absolute (runs are tracked under their absolute directory)."""
    return path if storage.is_remote(path) else os.path.abspath(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.track",
        description="Log a training run's directory into MLflow (again: nothing is repeated).",
    )
    parser.add_argument("run_dir", help="the run's directory: {storage_path}/{run_name}")
    parser.add_argument("--uri", help="tracking URI or directory (default: the run's own)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the run's own)")
    parser.add_argument("--model-name", help="registry model (default: the run's own)")
    args = parser.parse_args(argv)
    errors = {tracking.TrackingUnavailable: "tracking", (ReplayError, FileNotFoundError): "replay"}
    with exit_on(errors):
        run_id, settings = replay(
            _local(args.run_dir),
            uri=args.uri,
            experiment=args.experiment,
            model_name=args.model_name,
        )
    print(
        f"{args.run_dir}: MLflow run {run_id}, experiment {settings.experiment} in "
        f"{settings.tracking_uri}"
    )


if __name__ == "__main__":
    main()

"""The report of one checkpoint, or of a finished training run: find the run behind the
checkpoint, score it on a split of a shard dataset, write ``metrics.json``, ``report.md``, the
figures and the model card (``dipro.report``).

A training run's directory is recognised from the checkpoint: Ray Train keeps each checkpoint
in ``{run_dir}/checkpoint_*/`` with the run's resolved ``config.json`` beside ``model.pt``, and
the run's ``epoch_metrics.jsonl`` in ``{run_dir}``; from these come the learning curves, the
monitored metric and the training data of the model card. ``write_run_report(run, ...)`` does
the same for a finished run, found from its directory or its ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dipro import storage
from dipro.checkpoint import (
    CheckpointError,
    check_matches,
    normalised_at_sites,
    read_checkpoint,
)
from dipro.data.layout import Dataset, Manifest, read_manifest
from dipro.data.shard_reader import verify_shards
from dipro.evaluation import evaluate_checkpoint
from dipro.report import ReportSettings, write_evaluation_report
from dipro.runs import (
    CHECKPOINT_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    epoch_log,
    read_epoch_log,
)

_ICU_VARIANTS = (
    ("no EHR", ("ehr",)),
    ("last CXR only", ("cxr",)),
    ("no EHR, last CXR only", ("ehr", "cxr")),
)
MISSING_INPUT_VARIANTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "disease_progression": (("no EHR", ("ehr",)),),
    "mortality": _ICU_VARIANTS,
    "length_of_stay": _ICU_VARIANTS,
}


class EvaluationError(ValueError):
    """An evaluation that cannot run (no checkpoint, no data for the split, ...)."""


@dataclass(frozen=True)
class RunContext:
    """What is known about the training run behind a checkpoint (all optional)."""

    run_dir: str | None
    config: dict[str, Any] | None
    epoch_metrics: str | None


def resolve_checkpoint(checkpoint: str | os.PathLike[str]) -> str:
    """The checkpoint file: ``checkpoint`` itself, or the ``model.pt`` inside a Ray checkpoint
    directory. Raises EvaluationError naming the path when there is none."""
    path = os.fspath(checkpoint)
    if not storage.exists(path):
        raise EvaluationError(f"checkpoint={path!r}: nothing there")
    inner = storage.join(path, CHECKPOINT_FILE)
    if storage.exists(inner):
        return inner
    return path


def run_context(checkpoint_file: str) -> RunContext:
    """The run directory, resolved config and epoch log next to a Ray Train checkpoint."""
    ckpt_dir = posixpath.dirname(checkpoint_file)
    config_uri = storage.join(ckpt_dir, RUN_CONFIG_FILE)
    if not storage.exists(config_uri):
        return RunContext(None, None, None)
    config = json.loads(storage.read_bytes(config_uri))
    run_dir = posixpath.dirname(ckpt_dir)
    epochs = epoch_log(run_dir)
    return RunContext(run_dir, config, epochs if storage.exists(epochs) else None)


def _training_manifest(
    config: dict[str, Any] | None, task: str
) -> tuple[Manifest | None, str | None]:
    """The manifest and root of the data a run was trained on (None where unknown)."""
    if config is None:
        return None, None
    root = config.get("data", {}).get("root")
    try:
        return (read_manifest(root, task), root) if root else (None, None)
    except FileNotFoundError:
        return None, root


def evaluate_to_report(
    checkpoint: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None,
    *,
    split: str = "test",
    out_dir: str | os.PathLike[str] | None = None,
    epoch_metrics: str | os.PathLike[str] | None = None,
    settings: ReportSettings | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    amp: str | None = None,
    verify_checksums: bool = True,
    missing_inputs: bool = False,
) -> Path:
    """Score ``checkpoint`` on the ``split`` shards of ``data_root`` and write the report;
    returns the path of ``report.md``. The shards are checked first (footers, and their sha256
    against the manifest unless ``verify_checksums`` is False) and every record is validated as
    it is read: bad data raises SchemaError or ChecksumError naming the file.
    ``missing_inputs``: also score the split without EHR and (mortality, length of stay) with the
    last CXR only, for the model card.

    ``data_root`` None: the dataset the model was trained on (from the run's config).
    ``out_dir`` None: ``{run_dir}/report-{split}`` for a Ray Train checkpoint, else
    ``report-{split}`` beside the checkpoint file. ``epoch_metrics`` None: the run's log when
    there is one.
    """
    ckpt = resolve_checkpoint(checkpoint)
    context = run_context(ckpt)
    try:
        payload = read_checkpoint(ckpt)
    except CheckpointError as err:
        raise EvaluationError(str(err)) from err
    task = payload["task"]
    run_task = (context.config or {}).get("task", {}).get("name", task)
    if run_task != task:
        raise EvaluationError(
            f"{ckpt}: a {task} checkpoint in the directory of a {run_task} run "
            f"({context.run_dir}): its config and learning curves are not this model's"
        )
    manifest, train_root = _training_manifest(context.config, task)
    if data_root is None:
        if train_root is None:
            raise EvaluationError(
                f"no data.root given and no run config next to {ckpt} to take it from"
            )
        data_root = train_root
    # The data it was trained on must still be that data; other data is scored with the
    # training statistics the checkpoint carries.
    own_data = manifest is not None and os.fspath(data_root) == os.fspath(train_root)
    site_normalised = normalised_at_sites(payload)
    try:
        # the training data's manifest, read above, serves when it is the data scored
        eval_data = (
            Dataset(os.fspath(data_root), task, manifest)
            if own_data
            else Dataset.open(data_root, task)
        )
        eval_manifest = eval_data.manifest
        paths = eval_data.shards(split)
        check_matches(
            payload,
            ckpt,
            task=task,
            norm_stats=manifest.norm_statistics() if own_data and not site_normalised else None,
            region_mode=eval_manifest.region_mode,
        )
    except (FileNotFoundError, CheckpointError) as err:
        raise EvaluationError(str(err)) from err
    # A federated model normalised at each site is scored as a site does: with the
    # statistics of the scored dataset's own training split.
    site_stats = eval_manifest.norm_statistics() if site_normalised else None
    if payload["training"].get("norm_stats") is None and not site_normalised:
        raise EvaluationError(
            f"{ckpt}: carries no normalisation statistics, so its inputs cannot be normalised "
            "as in training"
        )
    if not paths:
        raise EvaluationError(f"the {task} dataset under {data_root} has no {split} shards")
    verify_shards(eval_data, paths, checksums=verify_checksums)
    log = epoch_metrics or context.epoch_metrics
    epochs = read_epoch_log(log) if log else None
    logged = {e["task"] for e in epochs or [] if "task" in e}
    if logged - {task}:
        raise EvaluationError(
            f"epoch_metrics={log} logs a {', '.join(sorted(logged))} run, the checkpoint is "
            f"a {task} model"
        )
    scoring = {"batch_size": batch_size, "device": device, "amp_dtype": amp}
    result = evaluate_checkpoint(ckpt, paths, **scoring, norm_stats=site_stats)
    removed = {}
    if missing_inputs:
        for name, remove in MISSING_INPUT_VARIANTS[task]:
            removed[name] = evaluate_checkpoint(
                ckpt, paths, **scoring, remove=remove, norm_stats=site_stats
            ).metrics
    task_cfg = (context.config or {}).get("task", {})
    if out_dir is None:
        base = context.run_dir or posixpath.dirname(ckpt)
        out_dir = os.path.join(base, f"report-{split}")
    if storage.is_remote(out_dir):
        raise EvaluationError(f"out_dir={os.fspath(out_dir)!r}: reports are written locally")
    return write_evaluation_report(
        result.predictions,
        result.meta,
        out_dir,
        split=split,
        eval_data_root=os.fspath(data_root),
        epochs=epochs,
        monitor=task_cfg.get("monitor"),
        monitor_mode=task_cfg.get("monitor_mode", "max"),
        training_manifest=manifest,
        training_data_root=train_root,
        settings=settings or ReportSettings(),
        missing_inputs=removed or None,
    )


def write_run_report(
    run: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    split: str = "test",
    out_dir: str | os.PathLike[str] | None = None,
    settings: ReportSettings | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> Path:
    """The report of a finished ``run_training`` run; returns the path of ``report.md``.

    ``run``: the run directory or its ``metrics.json``. ``checkpoint`` None: the run's best
    checkpoint; ``data_root`` None: the data it was trained on; ``out_dir`` None:
    ``{run_dir}/report-{split}``.
    """
    path = os.fspath(run)
    metrics_uri = path if path.endswith(".json") else storage.join(path, SUMMARY_FILE)
    try:
        summary = json.loads(storage.read_bytes(metrics_uri))
    except FileNotFoundError as err:
        raise EvaluationError(f"{metrics_uri}: no metrics.json of a finished run") from err
    return evaluate_to_report(
        checkpoint or summary["best_checkpoint"],
        data_root,
        split=split,
        out_dir=out_dir,
        epoch_metrics=summary.get("epoch_metrics"),
        settings=settings,
        batch_size=batch_size,
        device=device,
    )

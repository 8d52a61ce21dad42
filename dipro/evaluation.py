"""Evaluation of a checkpoint alone on shards: the model, its normalisation statistics and its
task all come from the checkpoint; the shards are read (every record validated) with the one
pyarrow reader of ``dipro.data.shard_reader`` and the one collate."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from dipro.batch import Batch
from dipro.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint
from dipro.data.collate import collate
from dipro.data.normalize import NormStats
from dipro.data.schema import model_columns
from dipro.data.shard_reader import iter_numpy_batches, read_batches
from dipro.engine import evaluate
from dipro.metrics import Predictions
from dipro.prediction import remove_inputs
from dipro.settings import ModelConfig


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics of one checkpoint on one set of shards, with the predictions behind them."""

    metrics: dict[str, float]
    predictions: Predictions
    meta: CheckpointMeta


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    shard_paths: Sequence[str],
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp_dtype: str | None = None,
    remove: Sequence[str] = (),
    norm_stats: NormStats | None = None,
) -> EvaluationResult:
    """Rebuild the model from ``checkpoint`` and score it on every record of ``shard_paths``.

    EHR and demographics are normalised with the statistics stored in the checkpoint (those of
    the data the model was trained on), or with ``norm_stats`` when given: a federated model
    normalised at each site carries none, and is scored with the statistics of the scored
    data's own training split, as a site does. ``remove``: inputs taken away from every
    record first (``dipro.prediction.remove_inputs``: "ehr", "cxr"), to measure predictions
    without them.
    """
    model, meta = load_checkpoint(checkpoint, map_location=str(device))
    stats = meta.norm_stats if norm_stats is None else norm_stats
    if stats is None:
        raise CheckpointError(
            f"{checkpoint}: carries no normalisation statistics (a federated model normalised "
            "at each site): pass those of the scored data's training split (norm_stats=)"
        )
    model.to(device)
    region_mode = ModelConfig.from_dict(meta.model_cfg).region_mode
    if remove:
        columns = [*model_columns(region_mode), "task"]
        batches: Iterable[Batch] = (
            collate(remove_inputs(b, remove), stats)
            for b in iter_numpy_batches(shard_paths, batch_size, columns)
        )
    else:
        batches = read_batches(shard_paths, batch_size, region_mode, stats)
    metrics, predictions = evaluate(model, batches, device=device, amp_dtype=amp_dtype)
    return EvaluationResult(metrics, predictions, meta)

"""Ray Data pipelines that stream the Parquet shards of one task to Ray Train workers.

Only the columns the model needs are read; rows reach the workers block by block and are padded
by the project's one collate (``dipro.data.collate``) inside ``iter_torch_batches``. Nothing is
materialised in the driver.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import ray.data
from ray.data.collate_fn import NumpyBatchCollateFn

from dipro.data.collate import Batch, collate
from dipro.data.normalize import NormStats
from dipro.data.schema import model_columns
from dipro.data.shards import list_shards


class RayBatchCollate(NumpyBatchCollateFn):
    """``dipro.data.collate.collate`` in the form ``iter_torch_batches`` accepts.

    The returned ``Batch`` is not a plain dict of tensors, so Ray leaves it on the CPU: the
    engine moves it to the worker's device.
    """

    def __init__(self, norm_stats: Mapping[str, Any]) -> None:
        self._stats = NormStats.from_dict(dict(norm_stats))

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        return collate(batch, self._stats)


def read_split(root: str, task: str, split: str, region_mode: str) -> ray.data.Dataset:
    """Lazily read the shards of ``{root}/{task}/split={split}`` listed in the manifest, with the
    model's columns only.

    File order is shuffled per epoch for the training split; the hive partition columns are not
    re-added (the records carry ``split`` and ``hospital`` themselves).
    """
    paths = list_shards(root, task, split)
    if not paths:
        raise FileNotFoundError(f"no {split!r} shards for {task!r} under {root!r}")
    return ray.data.read_parquet(
        paths,
        columns=model_columns(region_mode),
        partitioning=None,
        shuffle="files" if split == "train" else None,
    )


def iter_batches(
    shard: ray.data.DataIterator,
    *,
    batch_size: int,
    norm_stats: Mapping[str, Any],
    shuffle_buffer: int | None,
    prefetch_batches: int = 1,
    seed: int | None = None,
) -> Iterator[Batch]:
    """Iterate a worker's dataset shard as ``Batch`` objects (a local shuffle buffer if set)."""
    yield from shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=RayBatchCollate(norm_stats),
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=seed,
        prefetch_batches=prefetch_batches,
    )

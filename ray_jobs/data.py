"""Ray Data pipelines that stream the Parquet shards of one task to Ray Train workers.

The shards' footers (and, once per run, their checksums) are checked by the driver before the
pipeline is built (``dipro.data.shard_reader.verify_shards``). Each read block is then validated
where it is read, in the map that follows the Parquet read (``dipro.data.schema.first_fault``
over the whole block), and cut to the columns the model needs; a bad record fails its read task
with a ``SchemaError`` naming its shard file, subject/stay id and field. Blocks stay Arrow tables
all the way to the worker, where the project's one collate (``dipro.data.collate``) decodes each
batch at once inside ``iter_torch_batches``. Nothing is materialised in the driver.

Deterministic order (``train.deterministic``, the default): Ray Data keeps the order of its
blocks (``preserve_order``), so the split of blocks between the workers is a function of the
file order alone, and the training split's file order is drawn from the run's seed. Ray Data
reseeds that draw at each execution of the pipeline (one per epoch) from its execution count,
so epoch ``e`` reads in the order of execution ``e - 1``; a run that starts at epoch ``k + 1``
(a resume, or a worker group restarted after a failure) starts the count at ``k``
(``TrainSplit``), and so reads every epoch in the order an uninterrupted run reads it. Free
order (``train.deterministic=false``) shuffles files without a seed and hands blocks to workers
as they finish.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray.data
from ray.data.collate_fn import ArrowBatchCollateFn

from dipro.batch import Batch
from dipro.data.collate import collate
from dipro.data.layout import Dataset
from dipro.data.normalize import NormStats
from dipro.data.schema import COLUMNS, first_fault, model_columns
from dipro.seeds import FILE_ORDER, stream_seed

PATH_COLUMN = "path"  # the shard file of each row (``read_parquet(include_paths=True)``)


class RayBatchCollate(ArrowBatchCollateFn):
    """``dipro.data.collate.collate`` in the form ``iter_torch_batches`` accepts.

    The returned ``Batch`` is not a plain dict of tensors, so Ray leaves it on the CPU: the
    engine moves it to the worker's device (non-blocking from pinned memory with
    ``pin_memory``).
    """

    def __init__(self, norm_stats: Mapping[str, Any], pin_memory: bool = False) -> None:
        self._stats = NormStats.from_dict(dict(norm_stats))
        self._pin_memory = pin_memory

    def __call__(self, batch: pa.Table) -> Batch:
        return collate(batch, self._stats, pin_memory=self._pin_memory)


def validate_block(block: pa.Table, columns: list[str]) -> pa.Table:
    """Raise SchemaError (naming the row's shard file) on the block's first bad record; else
    the block with ``columns`` only."""
    fault = first_fault(block)
    if fault is not None:
        raise fault.error(block.column(PATH_COLUMN)[fault.row].as_py())
    return block.select(columns)


def read_split(
    dataset: Dataset,
    split: str,
    region_mode: str,
    num_blocks: int | None = None,
    *,
    seed: int | None = None,
) -> ray.data.Dataset:
    """Lazily read and validate the shards of ``dataset``'s ``split`` (as its manifest lists
    them); rows keep the model's columns only.

    File order is shuffled per epoch for the training split: from ``seed`` (the same orders in
    every run with that seed), or without one when ``seed`` is None. The hive partition columns
    are not re-added (the records carry ``split`` and ``hospital`` themselves). ``num_blocks``
    sets the read parallelism (None: one read task per shard file, so that a block is not a
    handful of rows).
    """
    paths = dataset.shards(split)
    if not paths:
        raise FileNotFoundError(f"no {split!r} shards for {dataset.task!r} under {dataset.root!r}")
    shuffle: str | ray.data.FileShuffleConfig | None = None
    if split == "train":
        shuffle = "files" if seed is None else ray.data.FileShuffleConfig(seed=seed)
    dataset = ray.data.read_parquet(
        paths,
        columns=list(COLUMNS),
        include_paths=True,
        partitioning=None,
        shuffle=shuffle,
        override_num_blocks=num_blocks or len(paths),
    )
    dataset = dataset.map_batches(
        validate_block,
        batch_size=None,
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs={"columns": model_columns(region_mode)},
    )
    dataset.context.raise_original_map_exception = True
    return dataset


def start_at_epoch(dataset: ray.data.Dataset, epoch: int) -> ray.data.Dataset:
    """``dataset`` with its next execution counted as epoch ``epoch``'s (1-based): a seeded
    file shuffle then draws the order that execution ``epoch - 1`` of an uninterrupted run
    draws. Ray Data keeps the count in the dataset's context and adds one after each
    execution, finished or cut short."""
    dataset.context._execution_idx = epoch - 1
    return dataset


@dataclass(frozen=True)
class TrainSplit:
    """The training split as Ray Train asks for it each time it starts a worker group: a
    callable that reads the split with the run's seeded file order, starting at the epoch the
    workers will train next (``next_epoch()``: one past the run's newest checkpoint).

    ``seed`` None: the free order (an unseeded file shuffle, blocks to workers as they finish).
    """

    dataset: Dataset
    region_mode: str
    seed: int | None
    next_epoch: Any  # Callable[[], int]; a picklable callable, run where Ray Train runs it

    def __call__(self) -> ray.data.Dataset:
        file_seed = None if self.seed is None else stream_seed(self.seed, FILE_ORDER)
        train = read_split(self.dataset, "train", self.region_mode, seed=file_seed)
        return train if self.seed is None else start_at_epoch(train, self.next_epoch())


def iter_batches(
    shard: ray.data.DataIterator,
    *,
    batch_size: int,
    norm_stats: Mapping[str, Any],
    shuffle_buffer: int | None,
    prefetch_batches: int = 1,
    seed: int | None = None,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Iterate a worker's dataset shard as ``Batch`` objects (a local shuffle buffer if set)."""
    yield from shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=RayBatchCollate(norm_stats, pin_memory),
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=seed,
        prefetch_batches=prefetch_batches,
    )

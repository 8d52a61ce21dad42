"""Reading shards with plain pyarrow, each one validated, and checking them against the
manifest's checksums before a run reads them (``dipro.data.layout`` lists them)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dipro import storage
from dipro.batch import Batch
from dipro.data.collate import collate
from dipro.data.layout import Dataset, dataset_path, file_sha256
from dipro.data.normalize import NormStats
from dipro.data.schema import (
    SCHEMA,
    SchemaError,
    model_columns,
    upgrade,
    validate,
    validate_schema,
)


def read_table(
    paths: Sequence[str | os.PathLike[str]],
    columns: Sequence[str] | None = None,
    *,
    labels_required: bool = True,
) -> pa.Table:
    """Read and validate shards, then keep ``columns`` (all when None); one table in path order.

    Raises SchemaError naming the shard, the record and the field on the first bad record.
    ``labels_required=False``: the rules of an inference dataset (``dipro.data.schema``).
    """
    tables = [_read_shard(path, columns, labels_required) for path in paths]
    if not tables:
        empty = SCHEMA.empty_table()
        return empty if columns is None else empty.select(list(columns))
    return pa.concat_tables(tables)


def iter_arrow_batches(
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int,
    columns: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
) -> Iterator[pa.Table]:
    """Yield validated batches of ``batch_size`` rows as Arrow tables (the collate's input).

    Shards are read (and validated) one at a time; with ``shuffle_seed`` the shard order and
    the rows within each shard are shuffled (a local shuffle). The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    order = list(paths) if rng is None else [paths[i] for i in rng.permutation(len(paths))]
    pending: pa.Table | None = None
    for path in order:
        table = _read_shard(path, columns)
        if rng is not None:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        pending = table if pending is None else pa.concat_tables([pending, table])
        while pending.num_rows >= batch_size:
            yield pending.slice(0, batch_size)
            pending = pending.slice(batch_size)
    if pending is not None and pending.num_rows:
        yield pending


def read_batches(
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int,
    region_mode: str,
    norm_stats: NormStats,
    shuffle_seed: int | None = None,
) -> Iterator[Batch]:
    """The shards as model ``Batch`` objects without Ray: the columns the model reads in
    ``region_mode``, validated (``iter_arrow_batches``, a local shuffle when seeded) and
    collated with ``norm_stats`` (``dipro.data.collate``). What a federated site, the
    coordinator and the evaluation of a checkpoint read with; Ray Train's workers get theirs
    from Ray Data (``ray_jobs.data.iter_batches``)."""
    columns = model_columns(region_mode)
    for table in iter_arrow_batches(paths, batch_size, columns, shuffle_seed):
        yield collate(table, norm_stats)


def iter_numpy_batches(
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int,
    columns: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`iter_arrow_batches` as dict[column, np.ndarray].

    Scalar columns are typed arrays (integer columns with nulls become float with NaN), list
    columns object arrays of numpy arrays (None for null), binary columns object arrays of
    bytes, strings object arrays of str.
    """
    for table in iter_arrow_batches(paths, batch_size, columns, shuffle_seed):
        yield _to_numpy(table)


def _read_shard(
    path: str | os.PathLike[str], columns: Sequence[str] | None, labels_required: bool = True
) -> pa.Table:
    fs, inner = storage.resolve_filesystem(path)
    source = os.fspath(path)
    try:
        table = pq.read_table(inner, filesystem=fs, partitioning=None)
    except (OSError, pa.ArrowInvalid) as err:
        raise SchemaError(f"cannot read shard: {err}", source=source) from err
    table = upgrade(table, source)
    validate(table, source, labels_required=labels_required)
    if columns is None:
        return table
    return table.select(list(columns))


def _to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


class ChecksumError(ValueError):
    """Shards whose bytes are missing or differ from the sha256 the manifest recorded."""


def verify_shards(
    dataset: Dataset,
    paths: Sequence[str] | None = None,
    *,
    checksums: bool = True,
    threads: int = 8,
) -> None:
    """Check shards of ``dataset`` before a run reads them: each file's footer against the
    schema (version, columns, types) and, with ``checksums``, its sha256 against the manifest.

    ``paths`` are shards as ``Dataset.shards`` returns them (all of the manifest's when None).
    Files are hashed streamed (1 MiB at a time) in ``threads`` parallel threads. A file this
    process verified before and whose size and modification time are unchanged is not hashed
    again, so every reader may call this at its first use of a file and a run pays one pass.

    Raises:
        SchemaError: a footer breaks the schema (naming the file and the field).
        ChecksumError: naming every file that is missing, unknown to the manifest or altered.
    """
    by_path = dataset.checksums()
    wanted = sorted(by_path) if paths is None else [os.fspath(p) for p in paths]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(wanted)))) as pool:
        faults = list(
            pool.map(lambda path: _verify_shard(path, by_path.get(path), checksums), wanted)
        )
    bad = [fault for fault in faults if fault]
    if bad:
        raise ChecksumError(
            f"{len(bad)} shard(s) of {dataset_path(dataset.root, dataset.task)} do not match "
            "its manifest: "
            + "; ".join(bad)
            + " (to read them anyway, knowingly: data.verify_checksums=false)"
        )


def verify_checksums(root: str | os.PathLike[str], task: str) -> None:
    """Raise ChecksumError naming every shard whose sha256 differs from the manifest's."""
    verify_shards(Dataset.open(root, task))


_VERIFIED: dict[str, tuple[str, int | None, Any]] = {}  # path -> (sha256, size, mtime) seen


def _verify_shard(path: str, expected: str | None, checksums: bool) -> str:
    """'' if the shard at ``path`` is sound, else what is wrong with it (schema faults raise)."""
    if expected is None:
        return f"{path} is not in the manifest"
    fs, inner = storage.resolve_filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return f"{path} is missing"
    if checksums and _VERIFIED.get(path) != (expected, info.size, info.mtime):
        actual = file_sha256(fs, inner)
        if actual != expected:
            return (
                f"{path} fails its checksum (sha256 {actual[:16]}..., the manifest's "
                f"{expected[:16]}...)"
            )
        _VERIFIED[path] = (expected, info.size, info.mtime)
    try:
        schema = pq.read_schema(inner, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as err:
        raise SchemaError(f"cannot read shard: {err}", source=path) from err
    validate_schema(schema, path)
    return ""

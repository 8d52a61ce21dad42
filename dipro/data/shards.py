"""Parquet shards of sample records: atomic writing with a manifest, and plain-pyarrow reading.

Layout of one task's dataset (``root`` a local path or a pyarrow filesystem URI)::

    {root}/{task}/manifest.json
    {root}/{task}/split={train,val,test}/hospital={id}/part-NNNNN.parquet   (zstd, SCHEMA)

The manifest holds the schema version, the region mode and crop size / feature size, sample and
subject counts per split and hospital, training-split label counts, the EHR/demographic
normalisation statistics fitted on the training split only, the generator config and a sha256
checksum per file. It is written last and is what readers list shards from.

Atomicity: a dataset is written whole into a hidden sibling directory ``{root}/.{task}.tmp-*``,
validated, then renamed to ``{root}/{task}``. Replacing an existing dataset (``overwrite=True``)
renames the old one away, renames the new one in and deletes the old one, so a reader sees the
old dataset or the new one, never a mix; a failed write deletes its temporary directory and
leaves any previous dataset untouched. The temporary directory is named
``.{task}.tmp-{host}-{pid}-{random}``: one left by a process of this host that no longer runs (a
killed writer) is deleted by the next write of the task. On object stores, which cannot rename
directories, files are copied into place with the manifest last (after the old manifest is
deleted), so readers that go through the manifest (:func:`list_shards`) never see a partial dataset.

The files carry ``split`` and ``hospital`` as columns: Ray Data readers should pass
``partitioning=None`` so the hive-style directory names are not added a second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dipro import storage, vocab
from dipro.config import ConfigError
from dipro.data.labels import LABEL_COLUMNS, LabelCounts
from dipro.data.normalize import NORM_COLUMNS, NormStats, fit_norm_stats
from dipro.data.schema import (
    KNOWN_SCHEMA_VERSIONS,
    SCHEMA,
    SCHEMA_VERSION,
    SchemaError,
    records_to_table,
    upgrade,
    validate,
    validate_schema,
)

MANIFEST_NAME: Final[str] = "manifest.json"
COMPRESSION: Final[str] = "zstd"


def files_digest(files: Mapping[str, str]) -> str:
    """sha256 over ``path:checksum`` lines of a manifest's ``files``, sorted by path."""
    lines = "".join(f"{path}:{files[path]}\n" for path in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What ``{root}/{task}/manifest.json`` holds.

    counts / subjects: split -> hospital id (as a string, JSON keys) -> samples / distinct
    subjects. train_label_counts: ``dipro.data.labels.LabelCounts.to_dict()`` of the training
    split (class counts that the loss weights come from). files: path relative to the task
    directory -> sha256.
    """

    task: str
    schema_version: int
    region_mode: str
    crop_size: int | None
    feature_dim: int | None
    rows_per_file: int
    counts: dict[str, dict[str, int]]
    subjects: dict[str, dict[str, int]]
    train_label_counts: dict[str, Any]
    norm_stats: dict[str, list[float]]
    generator: dict[str, Any]
    files: dict[str, str]

    @property
    def hospitals(self) -> list[int]:
        """Hospital ids present in any split, ascending."""
        return sorted({int(h) for per_split in self.counts.values() for h in per_split})

    def num_samples(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())

    def files_digest(self) -> str:
        """One sha256 over every shard's path and checksum: two datasets with the same digest
        hold the same bytes."""
        return files_digest(self.files)

    def label_counts(self) -> LabelCounts:
        """The training split's label counts (what the loss weights come from)."""
        try:
            return LabelCounts.from_dict(self.train_label_counts)
        except KeyError as err:
            raise SchemaError(
                f"the {self.task} manifest has no training label count {err}: the dataset was "
                "written by an older version; write it again"
            ) from err

    def norm_statistics(self) -> NormStats:
        """The training-split normalisation statistics."""
        return NormStats.from_dict(self.norm_stats)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<memory>") -> Manifest:
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - set(data))
        if missing:
            raise SchemaError("manifest lacks fields", source=source, field=missing[0])
        version = data["schema_version"]
        if version not in KNOWN_SCHEMA_VERSIONS:
            raise SchemaError(
                f"schema version {version!r} is not known (this code reads "
                f"{sorted(KNOWN_SCHEMA_VERSIONS)})",
                source=source,
                field="schema_version",
            )
        return cls(**{k: data[k] for k in names})


def task_dir(root: str | os.PathLike[str], task: str) -> str:
    """``{root}/{task}`` as a local absolute path or a URI."""
    _check_task(task)
    return _join(root, task)


def split_dir(root: str | os.PathLike[str], task: str, split: str) -> str:
    """``{root}/{task}/split={split}`` as a local absolute path or a URI."""
    _check_split(split)
    return _join(root, task, f"split={split}")


def shard_relpath(split: str, hospital: int, index: int) -> str:
    """Path of one shard file inside a task directory."""
    return f"split={split}/hospital={hospital}/part-{index:05d}.parquet"


def write_dataset(
    records: Iterable[Mapping[str, Any]],
    root: str | os.PathLike[str],
    task: str,
    *,
    rows_per_file: int = 256,
    generator: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write the sample records of one task as a dataset under ``{root}/{task}``, atomically.

    Records are streamed: at most ``rows_per_file`` records per (split, hospital) are held in
    memory. Every shard is validated (dipro.data.schema.validate) before it is written; all
    records must share one region mode and crop / feature size.

    Raises:
        FileExistsError: the dataset exists and ``overwrite`` is False (nothing is written).
        SchemaError: a record breaks the schema (names the shard, the record and the field).
        ValueError: no records, or no records in the training split.
    """
    _check_task(task)
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    fs, base = storage.resolve_filesystem(root)
    final = posixpath.join(base, task)
    if _exists(fs, final) and not overwrite:
        raise FileExistsError(_exists_message(root, task))
    _remove_stale_tmp(fs, base, task)
    tmp = posixpath.join(base, f".{task}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex}")
    fs.create_dir(tmp, recursive=True)
    try:
        manifest = _write_all(records, fs, tmp, root, task, rows_per_file, dict(generator or {}))
        _publish(fs, tmp, final, root, task, overwrite)
    finally:
        if _exists(fs, tmp):
            fs.delete_dir(tmp)
    return manifest


class _Writer:
    """Buffers records per (split, hospital) and writes full shards into a directory."""

    def __init__(self, fs: pafs.FileSystem, directory: str, shown: str, rows_per_file: int) -> None:
        self.fs, self.directory, self.shown = fs, directory, shown
        self.rows_per_file = rows_per_file
        self.buffers: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
        self.next_index: dict[tuple[str, int], int] = defaultdict(int)
        self.files: list[str] = []

    def add(self, record: Mapping[str, Any]) -> None:
        key = (str(record["split"]), int(record["hospital"]))
        self.buffers[key].append(record)
        if len(self.buffers[key]) >= self.rows_per_file:
            self.flush(key)

    def flush(self, key: tuple[str, int]) -> None:
        rows = self.buffers.pop(key, [])
        if not rows:
            return
        split, hospital = key
        rel = shard_relpath(split, hospital, self.next_index[key])
        self.next_index[key] += 1
        source = f"{self.shown}/{rel}"
        try:
            table = records_to_table(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise SchemaError(f"records do not fit the schema: {err}", source=source) from err
        validate(table, source)
        path = posixpath.join(self.directory, rel)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(table, path, filesystem=self.fs, compression=COMPRESSION)
        self.files.append(rel)

    def close(self) -> None:
        for key in sorted(self.buffers):
            self.flush(key)


def _write_all(
    records: Iterable[Mapping[str, Any]],
    fs: pafs.FileSystem,
    tmp: str,
    root: str | os.PathLike[str],
    task: str,
    rows_per_file: int,
    generator: dict[str, Any],
) -> Manifest:
    shown = _join(root, task)
    writer = _Writer(fs, tmp, shown, rows_per_file)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    subjects: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    mode: tuple[str, int] | None = None
    for record in records:
        rid = f"subject_id={record.get('subject_id')} stay_id={record.get('stay_id')}"
        if record.get("task") != task:
            raise SchemaError(
                f"record of task {record.get('task')!r} in the {task!r} dataset",
                source=shown,
                record=rid,
                field="task",
            )
        this = _region_mode(record, shown, rid)
        if mode is None:
            mode = this
        elif this != mode:
            raise SchemaError(
                f"region mode {this} differs from the dataset's {mode}",
                source=shown,
                record=rid,
                field="crops",
            )
        split, hospital = str(record["split"]), str(record["hospital"])
        counts[split][hospital] += 1
        subjects[split][hospital].add(int(record["subject_id"]))
        writer.add(record)
    writer.close()
    if mode is None:
        raise ValueError(f"no records to write for task {task!r}")
    train = sorted(rel for rel in writer.files if rel.startswith("split=train/"))
    if not train:
        raise ValueError(f"no training records for task {task!r}: cannot fit normalisation")
    stats = fit_norm_stats(
        pq.read_table(
            posixpath.join(tmp, rel), columns=list(NORM_COLUMNS), filesystem=fs, partitioning=None
        )
        for rel in train
    )
    labels = LabelCounts.zeros()
    for rel in train:
        labels = labels + LabelCounts.from_table(
            pq.read_table(
                posixpath.join(tmp, rel),
                columns=list(LABEL_COLUMNS),
                filesystem=fs,
                partitioning=None,
            )
        )
    manifest = Manifest(
        task=task,
        schema_version=SCHEMA_VERSION,
        region_mode=mode[0],
        crop_size=mode[1] if mode[0] == "crops" else None,
        feature_dim=mode[1] if mode[0] == "features" else None,
        rows_per_file=rows_per_file,
        counts=_sorted_counts(counts),
        subjects=_sorted_counts(
            {s: {h: len(v) for h, v in d.items()} for s, d in subjects.items()}
        ),
        train_label_counts=labels.to_dict(),
        norm_stats=stats.to_dict(),
        generator=generator,
        files={rel: _sha256(fs, posixpath.join(tmp, rel)) for rel in sorted(writer.files)},
    )
    with fs.open_output_stream(posixpath.join(tmp, MANIFEST_NAME)) as out:
        out.write(_manifest_bytes(manifest))
    return manifest


def _region_mode(record: Mapping[str, Any], source: str, rid: str) -> tuple[str, int]:
    if record.get("crops") is not None:
        size = record.get("crop_size")
        if size is None:
            raise SchemaError(
                "crops without crop_size", source=source, record=rid, field="crop_size"
            )
        return ("crops", int(size))
    size = record.get("feature_dim")
    if record.get("features") is None or size is None:
        raise SchemaError(
            "neither crops nor features (with feature_dim) are set",
            source=source,
            record=rid,
            field="crops",
        )
    return ("features", int(size))


def _publish(
    fs: pafs.FileSystem,
    tmp: str,
    final: str,
    root: str | os.PathLike[str],
    task: str,
    overwrite: bool,
) -> None:
    """Make the finished dataset in ``tmp`` visible at ``final`` (see the module docstring)."""
    present = _exists(fs, final)
    if present and not overwrite:
        raise FileExistsError(_exists_message(root, task))
    if storage.has_atomic_rename(fs):
        if not present:
            fs.move(tmp, final)
            return
        old = posixpath.join(posixpath.dirname(final), f".{task}.old-{uuid.uuid4().hex}")
        fs.move(final, old)
        fs.move(tmp, final)
        fs.delete_dir(old)
        return
    if present:
        manifest = posixpath.join(final, MANIFEST_NAME)
        if _exists(fs, manifest):
            fs.delete_file(manifest)
        fs.delete_dir(final)
    selector = pafs.FileSelector(tmp, recursive=True)
    for info in sorted(fs.get_file_info(selector), key=lambda i: i.path.endswith(MANIFEST_NAME)):
        if info.type == pafs.FileType.File:
            target = posixpath.join(final, posixpath.relpath(info.path, tmp))
            fs.create_dir(posixpath.dirname(target), recursive=True)
            fs.copy_file(info.path, target)


def read_manifest(root: str | os.PathLike[str], task: str) -> Manifest:
    """The manifest of ``{root}/{task}``.

    Raises:
        FileNotFoundError: no (complete) dataset for ``task`` under ``root``.
        SchemaError: the manifest is unreadable or of an unknown schema version.
    """
    uri = _join(root, task, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"no {task!r} dataset under {os.fspath(root)!r}: {uri} is missing (generate one "
            "with `python -m ray_jobs.demo` or ray_jobs.preprocess)"
        ) from err
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SchemaError(f"manifest is not valid JSON: {err}", source=uri) from err
    return Manifest.from_dict(data, source=uri)


def format_counts(manifests: Mapping[str, Manifest]) -> str:
    """A table of samples (and subjects) per task, split and hospital."""
    hospitals = sorted({h for m in manifests.values() for h in m.hospitals})
    header = f"{'task':<20} {'split':<6} " + " ".join(f"{'h' + str(h):>6}" for h in hospitals)
    lines = [header + f" {'total':>7} {'subjects':>8}"]
    for task, manifest in manifests.items():
        for split in vocab.SPLITS:
            per = manifest.counts.get(split, {})
            cells = " ".join(f"{per.get(str(h), 0):>6}" for h in hospitals)
            subjects = sum(manifest.subjects.get(split, {}).values())
            lines.append(
                f"{task:<20} {split:<6} {cells} {manifest.num_samples(split):>7} {subjects:>8}"
            )
    return "\n".join(lines)


def model_manifest(
    root: str | os.PathLike[str],
    task: str,
    region_mode: str,
    key: str,
    *,
    splits: Sequence[str] = (),
) -> Manifest:
    """The task's manifest under ``root`` (set by the config key ``key``), for a model of
    ``region_mode`` that reads ``splits``: a missing dataset, one of another region mode or an
    empty split is a ConfigError naming ``key``. Every entrypoint checks its data here."""
    try:
        manifest = read_manifest(root, task)
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from err
    if manifest.region_mode != region_mode:
        raise ConfigError(
            f"the {task} dataset under {root} ({key}) stores {manifest.region_mode}, but "
            f"model.region_mode={region_mode}"
        )
    for split in splits:
        if manifest.num_samples(split) == 0:
            raise ConfigError(f"the {task} dataset under {root} ({key}) has no {split} samples")
    return manifest


def list_shards(
    root: str | os.PathLike[str],
    task: str,
    split: str,
    hospitals: Iterable[int] | None = None,
) -> list[str]:
    """Shard files of one split (optionally only some hospitals), from the manifest, sorted.

    Paths are absolute local paths, or URIs when ``root`` is a URI: strings, the form pyarrow
    and ``ray.data.read_parquet`` accept.
    """
    _check_split(split)
    manifest = read_manifest(root, task)
    wanted = None if hospitals is None else {int(h) for h in hospitals}
    out = []
    for rel in sorted(manifest.files):
        parts = rel.split("/")
        if parts[0] != f"split={split}":
            continue
        if wanted is not None and int(parts[1].removeprefix("hospital=")) not in wanted:
            continue
        out.append(_join(root, task, rel))
    return out


class ChecksumError(ValueError):
    """Shards whose bytes are missing or differ from the sha256 the manifest recorded."""


def verify_shards(
    root: str | os.PathLike[str],
    task: str,
    paths: Sequence[str] | None = None,
    *,
    checksums: bool = True,
    threads: int = 8,
) -> None:
    """Check shards of ``{root}/{task}`` before a run reads them: each file's footer against the
    schema (version, columns, types) and, with ``checksums``, its sha256 against the manifest.

    ``paths`` are shards as :func:`list_shards` returns them (all of the manifest's when None).
    Files are hashed streamed (1 MiB at a time) in ``threads`` parallel threads. A file this
    process verified before and whose size and modification time are unchanged is not hashed
    again, so every reader may call this at its first use of a file and a run pays one pass.

    Raises:
        SchemaError: a footer breaks the schema (naming the file and the field).
        ChecksumError: naming every file that is missing, unknown to the manifest or altered.
    """
    manifest = read_manifest(root, task)
    by_path = {_join(root, task, rel): digest for rel, digest in manifest.files.items()}
    wanted = sorted(by_path) if paths is None else [os.fspath(p) for p in paths]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(wanted)))) as pool:
        faults = list(
            pool.map(lambda path: _verify_shard(path, by_path.get(path), checksums), wanted)
        )
    bad = [fault for fault in faults if fault]
    if bad:
        raise ChecksumError(
            f"{len(bad)} shard(s) of {_join(root, task)} do not match its manifest: "
            + "; ".join(bad)
            + " (to read them anyway, knowingly: data.verify_checksums=false)"
        )


def verify_checksums(root: str | os.PathLike[str], task: str) -> None:
    """Raise ChecksumError naming every shard whose sha256 differs from the manifest's."""
    verify_shards(root, task)


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
        actual = _sha256(fs, inner)
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


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def _sorted_counts(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {
        split: {h: int(counts[split][h]) for h in sorted(counts[split], key=int)}
        for split in vocab.SPLITS
        if split in counts
    }


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(fs: pafs.FileSystem, base: str, task: str) -> None:
    """Delete the temporary directories of ``task`` left by writers of this host that no longer
    run (a writer killed before its ``finally``); those of live or other hosts' writers stay."""
    if not _exists(fs, base):
        return
    prefix = f".{task}.tmp-{_host()}-"
    for info in fs.get_file_info(pafs.FileSelector(base)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            fs.delete_dir(info.path)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _exists_message(root: str | os.PathLike[str], task: str) -> str:
    return (
        f"a {task!r} dataset already exists at {_join(root, task)}; pass overwrite=True to "
        "replace it whole"
    )


def _join(root: str | os.PathLike[str], *parts: str) -> str:
    text = os.fspath(root)
    if not storage.is_remote(text) and "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
    return storage.join(text, *parts)


def _check_task(task: str) -> None:
    if task not in vocab.TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {vocab.TASKS}")


def _check_split(split: str) -> None:
    if split not in vocab.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {vocab.SPLITS}")

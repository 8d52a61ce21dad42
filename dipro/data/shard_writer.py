"""Writing a task's dataset (``dipro.data.layout``) whole, or not at all: :func:`write_dataset`.

Atomicity: a dataset is written whole into a hidden sibling directory ``{root}/.{task}.tmp-*``,
validated, then renamed to ``{root}/{task}``. Replacing an existing dataset (``overwrite=True``)
renames the old one away, renames the new one in and deletes the old one, so a reader sees the
old dataset or the new one, never a mix; a failed write deletes its temporary directory and
leaves any previous dataset untouched. The temporary directory is named
``.{task}.tmp-{host}-{pid}-{random}``: one left by a process of this host that no longer runs (a
killed writer) is deleted by the next write of the task. On object stores, which cannot rename
directories, files are copied into place with the manifest last (after the old manifest is
deleted), so readers that go through the manifest (``dipro.data.layout.list_shards``) never see a
partial dataset.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Final

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dipro import storage, vocab
from dipro.data.labels import LABEL_COLUMNS, LabelCounts
from dipro.data.layout import MANIFEST_NAME, Manifest, file_sha256, shard_relpath, task_dir
from dipro.data.normalize import NORM_COLUMNS, fit_norm_stats
from dipro.data.schema import SCHEMA_VERSION, SchemaError, records_to_table, validate

COMPRESSION: Final[str] = "zstd"


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
    shown = task_dir(root, task)
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    fs, base = storage.resolve_filesystem(root)
    final = posixpath.join(base, task)
    if _exists(fs, final) and not overwrite:
        raise FileExistsError(_exists_message(shown, task))
    _remove_stale_tmp(fs, base, task)
    tmp = posixpath.join(base, f".{task}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex}")
    fs.create_dir(tmp, recursive=True)
    try:
        manifest = _write_all(records, fs, tmp, shown, task, rows_per_file, dict(generator or {}))
        _publish(fs, tmp, final, shown, task, overwrite)
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
    shown: str,
    task: str,
    rows_per_file: int,
    generator: dict[str, Any],
) -> Manifest:
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
        files={rel: file_sha256(fs, posixpath.join(tmp, rel)) for rel in sorted(writer.files)},
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
    shown: str,
    task: str,
    overwrite: bool,
) -> None:
    """Make the finished dataset in ``tmp`` visible at ``final`` (see the module docstring)."""
    present = _exists(fs, final)
    if present and not overwrite:
        raise FileExistsError(_exists_message(shown, task))
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


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def _sorted_counts(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {
        split: {h: int(counts[split][h]) for h in sorted(counts[split], key=int)}
        for split in vocab.SPLITS
        if split in counts
    }


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


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _exists_message(shown: str, task: str) -> str:
    return f"a {task!r} dataset already exists at {shown}; pass overwrite=True to replace it whole"

"""Where a task's dataset lies and what its manifest says: paths, :class:`Manifest`, reading it.

Layout of one task's dataset (``root`` a local path or a pyarrow filesystem URI)::

    {root}/{task}/manifest.json
    {root}/{task}/split={train,val,test}/hospital={id}/part-NNNNN.parquet   (zstd, SCHEMA)

The manifest holds the schema version, the region mode and crop size / feature size, sample and
subject counts per split and hospital, training-split label counts, the EHR/demographic
normalisation statistics fitted on the training split only, the generator config and a sha256
checksum per file. It is written last (``dipro.data.shard_writer``) and is what readers list
shards from (:class:`Dataset`: the manifest read once, the shard paths of a split).

The files carry ``split`` and ``hospital`` as columns: Ray Data readers should pass
``partitioning=None`` so the hive-style directory names are not added a second time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import pyarrow.fs as pafs

from dipro import storage, vocab
from dipro.config import ConfigError
from dipro.data.labels import LabelCounts
from dipro.data.normalize import NormStats
from dipro.data.schema import KNOWN_SCHEMA_VERSIONS, SchemaError

MANIFEST_NAME: Final[str] = "manifest.json"


def files_digest(files: Mapping[str, str]) -> str:
    """sha256 over ``path:checksum`` lines of a manifest's ``files``, sorted by path."""
    lines = "".join(f"{path}:{files[path]}\n" for path in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def file_sha256(fs: pafs.FileSystem, path: str) -> str:
    """The sha256 of the file at ``path`` in ``fs`` (the checksum a manifest records), read
    1 MiB at a time."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
    return dataset_path(root, task)


def split_dir(root: str | os.PathLike[str], task: str, split: str) -> str:
    """``{root}/{task}/split={split}`` as a local absolute path or a URI."""
    _check_split(split)
    return dataset_path(root, task, f"split={split}")


def shard_relpath(split: str, hospital: int, index: int) -> str:
    """Path of one shard file inside a task directory."""
    return f"split={split}/hospital={hospital}/part-{index:05d}.parquet"


def read_manifest(root: str | os.PathLike[str], task: str) -> Manifest:
    """The manifest of ``{root}/{task}``.

    Raises:
        FileNotFoundError: no (complete) dataset for ``task`` under ``root``.
        SchemaError: the manifest is unreadable or of an unknown schema version.
    """
    uri = dataset_path(root, task, MANIFEST_NAME)
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


@dataclass(frozen=True)
class Dataset:
    """One task's dataset under ``root`` with its manifest, read once (``Dataset.open``): the
    shard paths of a split, their checksums, counts, normalisation statistics and label counts
    all come from it. Small and picklable: a run hands it to Ray Data's readers as it is."""

    root: str
    task: str
    manifest: Manifest

    @classmethod
    def open(cls, root: str | os.PathLike[str], task: str) -> Dataset:
        """Read ``{root}/{task}/manifest.json`` (errors as ``read_manifest``)."""
        return cls(os.fspath(root), task, read_manifest(root, task))

    def shards(self, split: str, hospitals: Iterable[int] | None = None) -> list[str]:
        """Shard files of one split (optionally only some hospitals), sorted.

        Paths are absolute local paths, or URIs when ``root`` is a URI: strings, the form
        pyarrow and ``ray.data.read_parquet`` accept.
        """
        _check_split(split)
        wanted = None if hospitals is None else {int(h) for h in hospitals}
        out = []
        for rel in sorted(self.manifest.files):
            parts = rel.split("/")
            if parts[0] != f"split={split}":
                continue
            if wanted is not None and int(parts[1].removeprefix("hospital=")) not in wanted:
                continue
            out.append(dataset_path(self.root, self.task, rel))
        return out

    def checksums(self) -> dict[str, str]:
        """Every shard's path (as ``shards`` gives it) -> its sha256 in the manifest."""
        return {
            dataset_path(self.root, self.task, rel): digest
            for rel, digest in self.manifest.files.items()
        }


def list_shards(
    root: str | os.PathLike[str],
    task: str,
    split: str,
    hospitals: Iterable[int] | None = None,
) -> list[str]:
    """``Dataset.open(root, task).shards(split, hospitals)``: for a reader that lists once."""
    return Dataset.open(root, task).shards(split, hospitals)


def model_dataset(
    root: str | os.PathLike[str],
    task: str,
    region_mode: str,
    key: str,
    *,
    splits: Sequence[str] = (),
) -> Dataset:
    """The task's dataset under ``root`` (set by the config key ``key``), for a model of
    ``region_mode`` that reads ``splits``: a missing dataset, one of another region mode or an
    empty split is a ConfigError naming ``key``. Every entrypoint checks its data here."""
    try:
        dataset = Dataset.open(root, task)
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from err
    manifest = dataset.manifest
    if manifest.region_mode != region_mode:
        raise ConfigError(
            f"the {task} dataset under {root} ({key}) stores {manifest.region_mode}, but "
            f"model.region_mode={region_mode}"
        )
    for split in splits:
        if manifest.num_samples(split) == 0:
            raise ConfigError(f"the {task} dataset under {root} ({key}) has no {split} samples")
    return dataset


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


def dataset_path(root: str | os.PathLike[str], *parts: str) -> str:
    """``parts`` joined onto ``root``: an absolute local path (``~`` expanded), or a URI."""
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

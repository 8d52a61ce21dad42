"""The training read path refuses bad data: a bad record stops ``ray_jobs.train`` before any
training step with one error naming shard, record and field; a shard that no longer matches its
manifest's sha256 is refused by training, evaluation and the federated site."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL, compose_train
from tiny_model import RANDOM_BACKBONE_EXPECTED

from dipro.checkpoint import save_checkpoint
from dipro.data.layout import MANIFEST_NAME, Dataset, read_manifest
from dipro.data.schema import SCHEMA, SchemaError
from dipro.data.shard_reader import ChecksumError, verify_shards
from dipro.model import build_model
from dipro.run_report import evaluate_to_report
from federated.config import compose_config, parse_run
from federated.site import load_site
from ray_jobs.data import iter_batches, read_split
from ray_jobs.training import check_config, stopping_error


def _first_train_shard(root: Path, task: str) -> Path:
    files = read_manifest(root, task).files
    return root / task / sorted(rel for rel in files if rel.startswith("split=train/"))[0]


def _write_shard(
    root: Path, task: str, shard: Path, table: pa.Table, update_manifest: bool
) -> None:
    """Rewrite ``shard``; with ``update_manifest`` record its new sha256, as a faulty writer
    would (so that only the records are wrong)."""
    pq.write_table(table, shard, compression="zstd")
    if update_manifest:
        path = root / task / MANIFEST_NAME
        manifest = json.loads(path.read_text())
        manifest["files"][shard.relative_to(root / task).as_posix()] = hashlib.sha256(
            shard.read_bytes()
        ).hexdigest()
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _bad_copy(
    src: Path,
    dst: Path,
    task: str,
    spoil: Callable[[dict[str, Any]], None] | None = None,
    drop: str | None = None,
) -> tuple[Path, str]:
    """``{src}/{task}`` copied to ``dst`` with the first record of its first training shard
    spoiled (or column ``drop`` removed). Returns the shard and the record's subject/stay id."""
    shutil.copytree(src / task, dst / task)
    shard = _first_train_shard(dst, task)
    rows = pq.read_table(shard, partitioning=None).to_pylist()
    record = f"subject_id={rows[0]['subject_id']} stay_id={rows[0]['stay_id']}"
    if spoil is not None:
        spoil(rows[0])
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    _write_shard(dst, task, shard, table.drop_columns([drop]) if drop else table, True)
    return shard, record


def _tampered_copy(src: Path, dst: Path, task: str = "mortality") -> Path:
    """``{src}/{task}`` copied to ``dst`` with every mortality label of one training shard
    flipped and the manifest left as it was."""
    shutil.copytree(src / task, dst / task)
    shard = _first_train_shard(dst, task)
    table = pq.read_table(shard, partitioning=None)
    flipped = pc.subtract(pa.scalar(1, pa.int8()), table.column("mortality"))
    index = table.schema.get_field_index("mortality")
    _write_shard(
        dst, task, shard, table.set_column(index, SCHEMA.field("mortality"), flipped), False
    )
    return shard


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def spoil(row: dict[str, Any]) -> None:
        row[field] = value

    return spoil


def _reverse_times(row: dict[str, Any]) -> None:
    row["cxr_times"] = row["cxr_times"][::-1]


def _code_five(row: dict[str, Any]) -> None:
    row["progression"] = [5, *row["progression"][1:]]


def _short_crops(row: dict[str, Any]) -> None:
    row["crops"] = row["crops"][:-16]


BAD_RECORDS = [
    ("mortality", "mortality", _set("mortality", 2)),
    ("length_of_stay", "los_days", _set("los_days", float("nan"))),
    ("mortality", "cxr_times", _reverse_times),
    ("disease_progression", "progression", _code_five),
    ("disease_progression", "crops", _short_crops),
]


def _train_overrides(root: Path, runs: Path, task: str, *extra: str) -> list[str]:
    return [
        f"task={task}",
        f"data.root={root}",
        f"storage_path={runs}",
        "run_name=bad",
        *TINY_MODEL,
        "train.max_epochs=1",
        *extra,
    ]


@pytest.mark.ray
@pytest.mark.parametrize(
    ("task", "field", "spoil"), BAD_RECORDS, ids=[f"{t}-{f}" for t, f, _ in BAD_RECORDS]
)
def test_ray_data_path_names_shard_record_and_field(
    tiny_data_root, ray_session, tmp_path, task, field, spoil
):
    """Validation runs in Ray Data's map over the blocks it reads (in a Ray task); the error
    that reaches the consumer, unwrapped, is the one-line SchemaError."""
    shard, record = _bad_copy(tiny_data_root, tmp_path, task, spoil)
    dataset = read_split(Dataset.open(tmp_path, task), "train", "crops")
    norm = read_manifest(tmp_path, task).norm_stats
    with pytest.raises(Exception) as info:  # noqa: PT011 - Ray's wrapper, unwrapped below
        for _ in iter_batches(
            dataset.iterator(), batch_size=4, norm_stats=norm, shuffle_buffer=None
        ):
            pass
    error = stopping_error(info.value)
    assert isinstance(error, SchemaError), info.value
    assert (error.source, error.record, error.field) == (str(shard), record, field)
    assert "\n" not in str(error)


@pytest.mark.ray
def test_bad_record_stops_the_train_job_before_any_step(
    tiny_data_root, ray_session, entrypoint, tree_checksums, tmp_path
):
    """The whole job on one bad record (a progression code out of range): exit status 2, one
    line, nothing written. Every other bad field of ``BAD_RECORDS`` reaches the job through the
    same Ray Data read and the same unwrapping (``stopping_error``), which the test above checks
    field by field."""
    task, field, spoil = BAD_RECORDS[3]
    data, runs = tmp_path / "data", tmp_path / "runs"
    shard, record = _bad_copy(tiny_data_root, data, task, spoil)
    before = tree_checksums(data)
    code, lines = entrypoint(
        "ray_jobs.train",
        *_train_overrides(data, runs, task),
        f"log_dir={tmp_path / 'logs'}",
        "tracking.enabled=false",
    )
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"data error: {shard}, record {record}, field '{field}':")
    assert not (runs / "bad" / "epoch_metrics.jsonl").exists()
    assert not list((runs / "bad").glob("checkpoint_*"))
    assert tree_checksums(data) == before


def test_missing_column_is_refused_before_ray_starts(tiny_data_root, tmp_path):
    shard, _ = _bad_copy(tiny_data_root, tmp_path / "data", "mortality", drop="demographics")
    cfg = compose_train(_train_overrides(tmp_path / "data", tmp_path / "runs", "mortality"))
    with pytest.raises(SchemaError, match="missing column") as info:
        check_config(cfg)
    assert (info.value.source, info.value.field) == (str(shard), "demographics")


def test_tampered_shard_is_refused_by_training_unless_skipped(tiny_data_root, tmp_path):
    shard = _tampered_copy(tiny_data_root, tmp_path / "data")
    overrides = _train_overrides(tmp_path / "data", tmp_path / "runs", "mortality")
    with pytest.raises(ChecksumError, match="fails its checksum") as info:
        check_config(compose_train(overrides))
    assert str(shard) in str(info.value) and "data.verify_checksums=false" in str(info.value)
    check_config(compose_train([*overrides, "data.verify_checksums=false"]))


@RANDOM_BACKBONE_EXPECTED
def test_tampered_shard_is_refused_by_evaluation(tiny_data_root, tmp_path):
    shutil.copytree(tiny_data_root / "mortality", tmp_path / "data" / "mortality")
    victim = (
        tmp_path
        / "data"
        / "mortality"
        / sorted(
            rel
            for rel in read_manifest(tmp_path / "data", "mortality").files
            if rel.startswith("split=test/")
        )[0]
    )
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    model_cfg = compose_train(_train_overrides(tmp_path, tmp_path, "mortality")).model
    model_cfg = {**dict(model_cfg), "ablation": dict(model_cfg.ablation)}
    checkpoint = save_checkpoint(
        tmp_path / "model.pt",
        build_model(model_cfg, "mortality"),
        model_cfg=model_cfg,
        task="mortality",
        norm_stats=read_manifest(tmp_path / "data", "mortality").norm_statistics(),
    )
    with pytest.raises(ChecksumError, match="fails its checksum") as info:
        evaluate_to_report(checkpoint, tmp_path / "data", split="test", out_dir=tmp_path / "r")
    assert str(victim) in str(info.value)


def test_tampered_shard_is_refused_by_the_federated_site(tiny_data_root, tmp_path):
    shard = _tampered_copy(tiny_data_root, tmp_path / "data")
    cfg = compose_config(["task=mortality", f"data.root={tmp_path / 'data'}"])
    with pytest.raises(ChecksumError, match="fails its checksum") as info:
        load_site({"data-path": str(tmp_path / "data")}, parse_run(cfg))
    assert str(shard) in str(info.value)


def test_a_shard_changed_after_its_check_is_checked_again(tiny_data_root, tmp_path):
    """Checks are remembered per process (one pass per run), but not across a change."""
    shutil.copytree(tiny_data_root / "mortality", tmp_path / "mortality")
    verify_shards(Dataset.open(tmp_path, "mortality"))
    shard = _first_train_shard(tmp_path, "mortality")
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(ChecksumError, match=re.escape(str(shard))):
        verify_shards(Dataset.open(tmp_path, "mortality"))

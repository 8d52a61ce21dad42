"""Parquet shards: layout, manifest, atomic replacement, interrupted writes and the reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dipro import vocab
from dipro.data.collate import collate
from dipro.data.layout import list_shards, read_manifest
from dipro.data.normalize import fit_norm_stats
from dipro.data.schema import model_columns
from dipro.data.shard_reader import iter_numpy_batches, read_table, verify_checksums
from dipro.data.shard_writer import write_dataset
from dipro.data.synthetic import Cohort, SyntheticConfig, cohort_records, write_synthetic_dataset


def _files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def test_layout_manifest_and_counts(tiny_dataset: Path, tiny_cohort: Cohort) -> None:
    for task in vocab.TASKS:
        manifest = read_manifest(tiny_dataset, task)
        task_dir = tiny_dataset / task
        assert _files_under(task_dir) == {*manifest.files, "manifest.json"}
        for rel in manifest.files:
            split, hospital, name = rel.split("/")
            assert split.removeprefix("split=") in vocab.SPLITS
            assert hospital.startswith("hospital=") and name.startswith("part-")
            assert pq.read_metadata(task_dir / rel).num_rows <= manifest.rows_per_file
        records = list(cohort_records(tiny_cohort, task))
        for split in vocab.SPLITS:
            expected = sum(r["split"] == split for r in records)
            assert manifest.num_samples(split) == expected
            assert read_table(list_shards(tiny_dataset, task, split)).num_rows == expected
        assert manifest.region_mode == "crops" and manifest.crop_size == 16
        verify_checksums(tiny_dataset, task)
    assert len(list_shards(tiny_dataset, "mortality", "train")) > 1  # rows_per_file = 8


def test_hospital_filter(tiny_dataset: Path) -> None:
    manifest = read_manifest(tiny_dataset, "mortality")
    for h in manifest.hospitals:
        table = read_table(
            list_shards(tiny_dataset, "mortality", "train", hospitals=[h]), columns=["hospital"]
        )
        assert table.num_rows == manifest.counts["train"][str(h)]
        assert set(table.column("hospital").to_pylist()) == {h}


def test_norm_stats_come_from_the_training_split_only(tiny_dataset: Path) -> None:
    stats = read_manifest(tiny_dataset, "mortality").norm_statistics()
    cols = ["ehr_values", "ehr_observed", "demographics"]
    train = fit_norm_stats([read_table(list_shards(tiny_dataset, "mortality", "train"), cols)])
    everything = fit_norm_stats(
        [read_table(list_shards(tiny_dataset, "mortality", s), cols) for s in vocab.SPLITS]
    )
    np.testing.assert_allclose(stats.ehr_mean, train.ehr_mean, rtol=1e-6)
    np.testing.assert_allclose(stats.demo_std, train.demo_std, rtol=1e-6)
    assert not np.allclose(stats.ehr_mean, everything.ehr_mean)


def _records(cohort: Cohort, task: str = "mortality") -> list[dict]:
    return list(cohort_records(cohort, task))


def test_existing_dataset_is_refused_then_replaced_whole(
    tmp_path: Path, tiny_cohort: Cohort
) -> None:
    first = write_dataset(_records(tiny_cohort), tmp_path, "mortality", rows_per_file=4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_dataset(_records(tiny_cohort), tmp_path, "mortality")
    assert read_manifest(tmp_path, "mortality") == first
    fewer = [r for r in _records(tiny_cohort) if r["hospital"] == 0]
    second = write_dataset(fewer, tmp_path, "mortality", rows_per_file=50, overwrite=True)
    assert _files_under(tmp_path / "mortality") == {*second.files, "manifest.json"}
    assert second.hospitals == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mortality"]  # no temporary left
    verify_checksums(tmp_path, "mortality")


def test_interrupted_write_leaves_no_partial_shard(
    tmp_path: Path, tiny_cohort: Cohort, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = pq.write_table
    calls = []

    def crash_after_first(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        real_write(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", crash_after_first)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(_records(tiny_cohort), tmp_path, "mortality", rows_per_file=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="mortality"):
        list_shards(tmp_path, "mortality", "train")

    monkeypatch.setattr(pq, "write_table", real_write)
    before = write_dataset(_records(tiny_cohort), tmp_path, "mortality", rows_per_file=4)
    calls.clear()
    monkeypatch.setattr(pq, "write_table", crash_after_first)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(_records(tiny_cohort)[:5], tmp_path, "mortality", overwrite=True)
    assert read_manifest(tmp_path, "mortality") == before
    assert _files_under(tmp_path / "mortality") == {*before.files, "manifest.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mortality"]
    verify_checksums(tmp_path, "mortality")


def test_a_bad_record_aborts_the_write(tmp_path: Path, tiny_cohort: Cohort) -> None:
    records = _records(tiny_cohort)
    records[3]["cxr_times"] = records[3]["cxr_times"][::-1].copy()
    with pytest.raises(Exception, match="cxr_times"):
        write_dataset(records, tmp_path, "mortality")
    assert list(tmp_path.iterdir()) == []


def test_tampered_shard_fails_the_checksum(tmp_path: Path, tiny_dataset: Path) -> None:
    shutil.copytree(tiny_dataset / "mortality", tmp_path / "mortality")
    victim = tmp_path / "mortality" / sorted(read_manifest(tmp_path, "mortality").files)[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="checksum"):
        verify_checksums(tmp_path, "mortality")


def test_numpy_batches_feed_the_collate(tiny_dataset: Path) -> None:
    paths = list_shards(tiny_dataset, "disease_progression", "train")
    total = read_table(paths, ["sample_id"]).num_rows
    columns = model_columns("crops")
    batches = list(iter_numpy_batches(paths, 5, columns))
    assert sum(len(b["subject_id"]) for b in batches) == total
    assert all(len(b["subject_id"]) == 5 for b in batches[:-1])
    first = batches[0]
    assert set(first) == set(columns)
    assert first["ehr_values"].dtype == object and isinstance(first["ehr_values"][0], np.ndarray)
    assert isinstance(first["crops"][0], bytes)
    batch = collate(first, read_manifest(tiny_dataset, "disease_progression").norm_statistics())
    assert batch.crops is not None and batch.crops.shape[1:] == (2, vocab.NUM_REGIONS, 16, 16)

    def order(seed: int | None) -> list[str]:
        return [
            s for b in iter_numpy_batches(paths, 7, ["sample_id"], seed) for s in b["sample_id"]
        ]

    assert order(3) == order(3)
    assert order(3) != order(None) and sorted(order(3)) == sorted(order(None))


def test_file_uri_root(tmp_path: Path, tiny_cohort: Cohort) -> None:
    uri = tmp_path.as_uri()
    manifest = write_dataset(_records(tiny_cohort), uri, "mortality")
    assert read_manifest(uri, "mortality") == manifest
    shards = list_shards(uri, "mortality", "test")
    assert shards and all(s.startswith("file://") for s in shards)
    assert read_table(shards).num_rows == manifest.num_samples("test")
    assert json.loads((tmp_path / "mortality" / "manifest.json").read_text())["task"] == "mortality"


def test_unknown_split_and_task(tiny_dataset: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        list_shards(tiny_dataset, "mortality", "training")
    with pytest.raises(ValueError, match="unknown task"):
        write_dataset([], tiny_dataset, "mortalty")


def test_config_rows_per_file_reaches_the_shards(tmp_path: Path) -> None:
    cfg = SyntheticConfig(seed=4, num_patients=10, image_size=32, crop_size=4, rows_per_file=3)
    manifest = write_synthetic_dataset(cfg, tmp_path, tasks=("mortality",))["mortality"]
    assert manifest.rows_per_file == 3 and manifest.generator["seed"] == 4


_SLOW_WRITER = """
import sys, time
from dipro.data.shard_writer import write_dataset
from dipro.data.synthetic import SyntheticConfig, cohort_records, simulate_cohort

cohort = simulate_cohort(SyntheticConfig(seed=7, num_patients=24, image_size=64, crop_size=16))

def records():
    for i, record in enumerate(cohort_records(cohort, "mortality")):
        if i == 3:
            time.sleep(600)  # killed here, its temporary directory half written
        yield record

write_dataset(records(), sys.argv[1], "mortality", rows_per_file=1)
"""


def test_a_killed_writer_leaves_a_temporary_directory_the_next_write_removes(
    tmp_path: Path, tiny_cohort: Cohort
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mortality.tmp-*/split=*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    (stale,) = tmp_path.glob(".mortality.tmp-*")
    live = tmp_path / f".mortality.tmp-{stale.name.split('-')[1]}-{os.getpid()}-0"
    live.mkdir()  # a writer of this host that still runs (this process)

    write_dataset(_records(tiny_cohort), tmp_path, "mortality", rows_per_file=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mortality", live.name])
    verify_checksums(tmp_path, "mortality")

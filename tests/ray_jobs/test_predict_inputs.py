"""What the predict job reads, checked before Ray starts: shard folders, one schema version."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import CONFIGS
from hydra import compose, initialize_config_dir

from dipro.data.layout import list_shards
from dipro.data.schema import PROVENANCE_COLUMNS, VERSION_KEY
from dipro.data.shard_reader import read_table
from ray_jobs.predict import PredictionError, dataset_version, input_paths

TASK = "mortality"


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("predict", overrides=["checkpoint=unused.pt", *overrides])


def test_a_split_or_every_parquet_file_of_a_folder(tiny_dataset: Path, tmp_path: Path) -> None:
    paths, name = input_paths(_cfg(f"data.root={tiny_dataset}", "split=val"), TASK, None)
    assert paths == list_shards(tiny_dataset, TASK, "val") and name == "val"
    with pytest.raises(PredictionError, match="no data.root or shards"):
        input_paths(_cfg(), TASK, None)

    folder = tmp_path / "tonight"
    (folder / "a").mkdir(parents=True)
    table = read_table(paths)
    pq.write_table(table, folder / "a" / "x.parquet")
    pq.write_table(table, folder / "y.parquet")
    (folder / "notes.txt").write_text("not a shard")
    found, name = input_paths(_cfg(f"shards={folder}"), TASK, None)
    assert found == [str(folder / "a" / "x.parquet"), str(folder / "y.parquet")]
    assert name == "tonight" and dataset_version(found) == 2

    old = table.drop_columns(list(PROVENANCE_COLUMNS)).replace_schema_metadata({VERSION_KEY: b"1"})
    pq.write_table(old, folder / "a" / "x.parquet")
    assert dataset_version([str(folder / "a" / "x.parquet")]) == 1
    with pytest.raises(PredictionError, match="mix schema versions: version 1 .*version 2"):
        dataset_version(found)

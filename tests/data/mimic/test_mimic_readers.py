"""Readers of the raw files: StudyTime, MIMIC-IV column sets and layouts, clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest

from dipro import vocab
from dipro.data.mimic import readers
from dipro.data.mimic.fixture_tree import write_raw_tree


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("213014.531", "213014"),
        ("45.0", "000045"),
        ("45", "000045"),
        ("0.0", "000000"),
        ("91512.0", "091512"),
    ],
)
def test_study_time_pads_dropped_leading_zeros(raw: str, expected: str) -> None:
    assert readers.parse_study_time(raw) == expected


def test_metadata_study_time_45_is_45_seconds_after_midnight(raw_tree) -> None:
    meta = readers.read_cxr_metadata(raw_tree.mimic_cxr)
    with gzip.open(raw_tree.mimic_cxr / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as f:
        assert ",45.0," in f.read()  # the file really holds the short form
    row = meta[meta["StudyTime"] == 45.0].iloc[0]
    assert row["study_datetime"].strftime("%H:%M:%S") == "00:00:45"


@pytest.mark.parametrize("version", ["1.0", "2.0", "2.2"])
def test_every_mimic_iv_column_set_loads(tmp_path: Path, version: str) -> None:
    tree = write_raw_tree(
        tmp_path, version=version, compress=version != "2.0", real_cxr=False, image_size=(64, 64)
    )
    adm = readers.read_admissions(tree.mimic_iv)
    pat = readers.read_patients(tree.mimic_iv)
    icu = readers.read_icustays(tree.mimic_iv)
    assert list(adm.columns) == readers.ADMISSION_COLUMNS
    assert adm["race"].notna().all()  # 1.0's ethnicity arrives as race
    assert list(pat.columns) == readers.PATIENT_COLUMNS
    assert len(icu) == 15 and icu["intime"].dtype.kind == "M"
    header = pd.read_csv(readers.find_table(tree.mimic_iv, ["icu/chartevents.csv"]), nrows=0)
    assert ("caregiver_id" in header.columns) == (version == "2.2")


def test_missing_column_names_file_and_field(tmp_path: Path) -> None:
    icu = tmp_path / "icu"
    icu.mkdir()
    (icu / "icustays.csv").write_text("subject_id,hadm_id,stay_id,intime,outtime,los\n")
    with pytest.raises(readers.RawDataError, match=r"icustays\.csv.*'first_careunit'"):
        readers.read_icustays(tmp_path)


def test_bad_timestamp_names_line_and_field(tmp_path: Path) -> None:
    icu = tmp_path / "icu"
    icu.mkdir()
    (icu / "icustays.csv").write_text(
        "subject_id,hadm_id,stay_id,first_careunit,last_careunit,intime,outtime,los\n"
        "10000001,20000001,30000001,MICU,MICU,2150-01-01 00:00:00,yesterday,1.0\n"
    )
    with pytest.raises(readers.RawDataError, match=r"line 2, field 'outtime'"):
        readers.read_icustays(tmp_path)


def test_scene_graph_boxes_and_edema_alias(raw_tree) -> None:
    current, previous = raw_tree.gold_pair
    graph = readers.read_scene_graph(readers.scene_graph_path(raw_tree.scene_graph_dir, current))
    assert "left costophrenic angle" not in graph.boxes  # this image lacks that box
    assert set(graph.boxes) == set(vocab.REGIONS) - {"left costophrenic angle"}
    assert all(c.previous == previous for c in graph.comparisons)
    path = raw_tree.scene_graph_dir / "x_SceneGraph.json"
    path.write_text(
        '{"image_id": "x", "objects": [], "relationships": [{"bbox_name": "left '
        'lung", "relationship_names": ["comparison|yes|improved"], "attributes": '
        '["anatomicalfinding|yes|pulmonary edema/hazy opacity"], "subject_id": '
        '"x_left lung", "object_id": "y_left lung"}]}'
    )
    (comparison,) = readers.read_scene_graph(path).comparisons
    path.unlink()
    assert (comparison.current, comparison.previous, comparison.finding, comparison.code) == (
        "x",
        "y",
        "pulmonary edema",
        vocab.IMPROVED,
    )


def test_gold_file_rows(raw_tree) -> None:
    (row,) = readers.read_gold_comparisons(raw_tree.gold_file)
    assert (row.current, row.previous) == raw_tree.gold_pair
    assert (row.region, row.finding, row.code) == raw_tree.gold_label

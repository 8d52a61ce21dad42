"""Schema version 2: provenance of every record, version-1 shards read back without it, and the
inference rules (labels optional, a single CXR for the ICU tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from dipro.data.schema import (
    PROVENANCE_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    VERSION_KEY,
    SchemaError,
    records_to_table,
    validate,
)
from dipro.data.shard_reader import read_table
from dipro.data.synthetic import GENERATOR_VERSION, Cohort, cohort_records, cxr_identifiers


def _records(cohort: Cohort, task: str, n: int = 3) -> list[dict[str, Any]]:
    return [rec for _, rec in zip(range(n), cohort_records(cohort, task), strict=False)]


def test_synthetic_records_name_their_cxrs(tiny_cohort: Cohort) -> None:
    dicom_ids, study_ids = cxr_identifiers(tiny_cohort)
    assert len(set(dicom_ids)) == len(dicom_ids) and np.all(np.diff(study_ids) > 0)
    index = {int(s): i for i, s in enumerate(tiny_cohort.stay_id)}
    for rec in _records(tiny_cohort, "mortality", 5):
        i = index[rec["stay_id"]]
        cxrs = np.arange(*tiny_cohort.cxr_slice(i).indices(len(tiny_cohort.cxr_times)))
        early = cxrs[tiny_cohort.cxr_times[cxrs] < tiny_cohort.config.icu_window_hours]
        assert list(rec["dicom_ids"]) == list(dicom_ids[early])
        assert list(rec["study_ids"]) == list(study_ids[early])
        assert rec["source"] == "synthetic"
        assert rec["source_version"] == f"generator {GENERATOR_VERSION}"
    table = records_to_table(_records(tiny_cohort, "disease_progression"))
    validate(table)
    assert table.schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode() == b"2"


def test_version_1_shard_reads_with_empty_provenance(tiny_cohort: Cohort, tmp_path: Path) -> None:
    table = records_to_table(_records(tiny_cohort, "mortality"))
    old = table.drop_columns(list(PROVENANCE_COLUMNS)).replace_schema_metadata({VERSION_KEY: b"1"})
    path = tmp_path / "part-00000.parquet"
    pq.write_table(old, path)
    back = read_table([str(path)])
    assert back.schema.metadata[VERSION_KEY] == b"2"
    assert back.column_names == list(SCHEMA.names)
    for name in PROVENANCE_COLUMNS:
        assert back.column(name).null_count == back.num_rows, name
    assert back.drop_columns(list(PROVENANCE_COLUMNS)).equals(
        table.drop_columns(list(PROVENANCE_COLUMNS))
    )


def test_dicom_ids_must_match_the_cxrs(tiny_cohort: Cohort) -> None:
    rec = _records(tiny_cohort, "disease_progression", 1)[0]
    rec["dicom_ids"] = rec["dicom_ids"][:1]
    with pytest.raises(SchemaError, match=r"stay_id=\d+, field 'dicom_ids': has 1 values"):
        validate(records_to_table([rec]), "shard.parquet")


@pytest.mark.parametrize("task", ["disease_progression", "mortality"])
def test_labels_are_optional_for_prediction_only(tiny_cohort: Cohort, task: str) -> None:
    rec = _records(tiny_cohort, task, 1)[0]
    for name in ("region_labels", "progression", "mortality", "los_days"):
        rec[name] = None
    table = records_to_table([rec])
    validate(table, "new.parquet", labels_required=False)
    field = "region_labels"
    with pytest.raises(SchemaError, match=f"new.parquet, record .*field '{field}': is null"):
        validate(table, "new.parquet")


def test_a_single_cxr_is_valid_for_icu_prediction_only(tiny_cohort: Cohort) -> None:
    rec = _records(tiny_cohort, "mortality", 1)[0]
    R, S = rec["region_present"].shape[1], rec["crop_size"]
    single = {
        **rec,
        "cxr_times": rec["cxr_times"][-1:],
        "crops": rec["crops"][-1:],
        "region_present": rec["region_present"][-1:],
        "region_labels": np.zeros((0, R, 7), np.int8),
        "dicom_ids": rec["dicom_ids"][-1:],
        "study_ids": rec["study_ids"][-1:],
    }
    assert single["crops"].shape == (1, R, S, S)
    table = records_to_table([single])
    validate(table, labels_required=False)
    with pytest.raises(SchemaError, match="has 1 CXRs, at least 2 are needed"):
        validate(table)
    pair = _records(tiny_cohort, "disease_progression", 1)[0]
    pair = {**pair, **{k: single[k] for k in ("cxr_times", "crops", "region_present")}}
    pair.update(region_labels=None, progression=None, dicom_ids=None, study_ids=None)
    with pytest.raises(SchemaError, match="has 1 CXRs, at least 2 are needed"):
        validate(records_to_table([pair]), labels_required=False)

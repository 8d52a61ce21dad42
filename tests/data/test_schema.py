"""The sample-record schema: round trip and a clear error for every kind of bad record."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dipro.data.schema import (
    SCHEMA,
    VERSION_KEY,
    SchemaError,
    first_fault,
    records_to_table,
    validate,
)
from dipro.data.shard_reader import read_table
from dipro.data.synthetic import Cohort, cohort_records


def _records(cohort: Cohort, task: str, n: int = 3) -> list[dict[str, Any]]:
    return [rec for _, rec in zip(range(n), cohort_records(cohort, task), strict=False)]


@pytest.mark.parametrize("task", ["disease_progression", "mortality", "length_of_stay"])
def test_round_trip_through_parquet(tiny_cohort: Cohort, task: str, tmp_path: Path) -> None:
    records = _records(tiny_cohort, task)
    table = records_to_table(records)
    validate(table)
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path, compression="zstd")
    back = read_table([str(path)])
    assert back.equals(table)
    assert back.schema.metadata[VERSION_KEY] == SCHEMA.metadata[VERSION_KEY]
    row, rec = back.slice(0, 1).to_pylist()[0], records[0]
    S = rec["crop_size"]
    crops = np.frombuffer(row["crops"], np.uint8).reshape(-1, 10, S, S)
    np.testing.assert_array_equal(crops, rec["crops"])
    np.testing.assert_array_equal(
        np.reshape(row["ehr_values"], rec["ehr_values"].shape), rec["ehr_values"]
    )
    np.testing.assert_array_equal(
        np.reshape(row["region_labels"], rec["region_labels"].shape), rec["region_labels"]
    )


def _shorter_ehr(rec: dict[str, Any]) -> None:
    rec["ehr_values"] = rec["ehr_values"].reshape(-1)[:-1]


def _one_cxr(rec: dict[str, Any]) -> None:
    rec["cxr_times"] = rec["cxr_times"][:1]
    rec["crops"] = rec["crops"][:1]
    rec["region_present"] = rec["region_present"][:1]
    rec["region_labels"] = rec["region_labels"][:0]


def _bad_code(rec: dict[str, Any]) -> None:
    rec["progression"] = np.array([0, 1, 2, 3, 4, 0, 1], np.int8)


def _bad_region_code(rec: dict[str, Any]) -> None:
    rec["region_labels"] = np.full_like(rec["region_labels"], -1)


def _nan_label(rec: dict[str, Any]) -> None:
    rec["los_days"] = float("nan")


def _times_backwards(rec: dict[str, Any]) -> None:
    rec["cxr_times"] = rec["cxr_times"][::-1].copy()


def _mortality_two(rec: dict[str, Any]) -> None:
    rec["mortality"] = 2


def _progression_five(rec: dict[str, Any]) -> None:
    rec["progression"] = np.array([0, 1, 2, 3, 5, 0, 1], np.int8)


def _short_crop_buffer(rec: dict[str, Any]) -> None:
    rec["crops"] = rec["crops"].reshape(-1)[:-7]


def _nan_ehr(rec: dict[str, Any]) -> None:
    rec["ehr_values"] = rec["ehr_values"].copy()
    rec["ehr_values"][-1, -1] = np.nan


def _missing_demographic(rec: dict[str, Any]) -> None:
    rec["demographics"] = rec["demographics"][:-1]


BAD_RECORDS: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("disease_progression", "ehr_values", _shorter_ehr),
    ("disease_progression", "cxr_times", _one_cxr),
    ("disease_progression", "progression", _bad_code),
    ("mortality", "region_labels", _bad_region_code),
    ("length_of_stay", "los_days", _nan_label),
    ("mortality", "cxr_times", _times_backwards),
    ("mortality", "mortality", _mortality_two),
    ("disease_progression", "progression", _progression_five),
    ("disease_progression", "crops", _short_crop_buffer),
    ("length_of_stay", "ehr_values", _nan_ehr),
    ("mortality", "demographics", _missing_demographic),
]


@pytest.mark.parametrize(
    ("task", "field", "spoil"), BAD_RECORDS, ids=[f"{t}-{f}" for t, f, _ in BAD_RECORDS]
)
def test_bad_record_names_shard_record_and_field(
    tiny_cohort: Cohort,
    tmp_path: Path,
    task: str,
    field: str,
    spoil: Callable[[dict[str, Any]], None],
) -> None:
    records = _records(tiny_cohort, task)
    bad = records[1]
    spoil(bad)
    path = tmp_path / "split=train" / "part-00003.parquet"
    path.parent.mkdir()
    pq.write_table(records_to_table(records), path)
    with pytest.raises(SchemaError) as info:
        read_table([str(path)])
    message = str(info.value)
    assert str(path) in message
    assert f"subject_id={bad['subject_id']} stay_id={bad['stay_id']}" in message
    assert repr(field) in message
    assert info.value.field == field
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args


def test_the_earliest_bad_record_is_named_across_chunks(tiny_cohort: Cohort) -> None:
    """Column-wise checks still name the first bad row, wherever its chunk and whatever the
    order of the checks that catch the later rows."""
    records = _records(tiny_cohort, "mortality", 6)
    records[2]["cxr_times"] = records[2]["cxr_times"][::-1].copy()
    records[3]["mortality"] = 2
    records[5]["los_days"] = -1.0
    table = pa.concat_tables([records_to_table(records[:3]), records_to_table(records[3:])])
    assert table.column("cxr_times").num_chunks == 2
    fault = first_fault(table)
    assert fault is not None and (fault.row, fault.field) == (2, "cxr_times")
    assert first_fault(table.slice(3)).field == "mortality"
    assert first_fault(table.slice(4)).field == "los_days"
    assert first_fault(table.slice(0, 2)) is None


def _write_table(tmp_path: Path, table: pa.Table) -> Path:
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path)
    return path


def test_wrong_dtype_names_shard_and_field(tiny_cohort: Cohort, tmp_path: Path) -> None:
    table = records_to_table(_records(tiny_cohort, "mortality"))
    schema = SCHEMA.set(
        SCHEMA.get_field_index("ehr_values"),
        pa.field("ehr_values", pa.list_(pa.float64()), nullable=False),
    )
    path = _write_table(tmp_path, table.cast(schema))
    with pytest.raises(SchemaError, match="ehr_values") as info:
        read_table([str(path)])
    assert str(path) in str(info.value) and "double" in str(info.value)


def test_missing_column_names_shard_and_field(tiny_cohort: Cohort, tmp_path: Path) -> None:
    table = records_to_table(_records(tiny_cohort, "mortality")).drop_columns(["region_present"])
    path = _write_table(tmp_path, table)
    with pytest.raises(SchemaError, match="missing column") as info:
        read_table([str(path)])
    assert info.value.field == "region_present" and str(path) in str(info.value)


@pytest.mark.parametrize("version", [b"99", None])
def test_unknown_or_absent_schema_version_is_rejected(
    tiny_cohort: Cohort, tmp_path: Path, version: bytes | None
) -> None:
    table = records_to_table(_records(tiny_cohort, "mortality"))
    meta = {} if version is None else {VERSION_KEY: version}
    path = _write_table(tmp_path, table.replace_schema_metadata(meta))
    with pytest.raises(SchemaError, match="schema version|schema_version") as info:
        read_table([str(path)])
    assert str(path) in str(info.value)


def test_unknown_field_in_a_record_is_rejected(tiny_cohort: Cohort) -> None:
    rec = _records(tiny_cohort, "mortality", 1)[0]
    rec["lactate"] = 2.0
    with pytest.raises(SchemaError, match="lactate"):
        records_to_table([rec])

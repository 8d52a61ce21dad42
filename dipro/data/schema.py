"""The one sample record of DiPro, as an Arrow schema, and its validation.

A record is one training sample of one task. Sequences are stored as plain Arrow lists,
flattened row-major, with their leading sizes implied by other columns:

| column         | Arrow type         | logical shape      | meaning                            |
|----------------|--------------------|--------------------|------------------------------------|
| sample_id      | string             |                    | unique within a dataset            |
| subject_id     | int64              |                    | patient                            |
| stay_id        | int64              |                    | ICU stay                           |
| hospital       | int32              |                    | site (federated partition)         |
| split          | string             |                    | train / val / test                 |
| task           | string             |                    | one of vocab.TASKS                 |
| cxr_times      | list<float32>      | [T]                | hours since admission, increasing  |
| crop_size      | int32 (nullable)   |                    | S, when crops are stored           |
| crops          | binary (nullable)  | [T, R, S, S] uint8 | region crops ("crops" region mode) |
| feature_dim    | int32 (nullable)   |                    | F, when features are stored        |
| features       | list<float32> (n.) | [T, R, F]          | region features ("features" mode)  |
| region_present | list<bool>         | [T, R]             | region has a box on that CXR       |
| ehr_times      | list<float32>      | [L]                | hours since admission, increasing  |
| ehr_values     | list<float32>      | [L, V]             | raw units, clipped, forward filled |
| ehr_observed   | list<bool>         | [L, V]             | value measured in that hour        |
| demographics   | list<float32>      | [G]                | age, height, weight raw; one-hots  |
| region_labels  | list<int8>         | [P, R, K]          | code per pair, region, finding     |
| progression    | list<int8> (n.)    | [K]                | finding-level codes (progression)  |
| mortality      | int8 (nullable)    |                    | in-hospital death 0/1              |
| los_days       | float32 (nullable) |                    | ICU length of stay in days         |
| dicom_ids      | list<string> (n.)  | [T]                | MIMIC-CXR dicom_id of each CXR     |
| study_ids      | list<int64> (n.)   | [T]                | MIMIC-CXR study_id of each CXR     |
| source         | string (nullable)  |                    | "synthetic" or "mimic"             |
| source_version | string (nullable)  |                    | generator / dataset versions       |

T >= 2 CXRs, P = T - 1 pairs, R = 10 regions, K = 7 findings, V = 38 EHR variables, G = 17
demographic features; L >= 0 EHR hours. Exactly one of ``crops`` / ``features`` is set in a
dataset. The schema version travels in the Arrow schema metadata under ``dipro.schema_version``.

Provenance (version 2): ``dicom_ids`` / ``study_ids`` name the images a record was built from,
``source`` / ``source_version`` the data set (``synthetic`` with its generator version, or
``mimic`` with the MIMIC-IV / MIMIC-CXR-JPG / Chest ImaGenome versions). Version-1 shards have
no provenance columns; :func:`upgrade` gives them null ones, so they still read.

Labels are required for training and evaluation. For prediction (``validate(...,
labels_required=False)``) a record may have no labels (null ``progression``, ``mortality``,
``los_days``, ``region_labels``), and a mortality / length-of-stay record may have a single CXR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import pyarrow as pa

from dipro import vocab

SCHEMA_VERSION: Final[int] = 2
KNOWN_SCHEMA_VERSIONS: Final[frozenset[int]] = frozenset({1, 2})
VERSION_KEY: Final[bytes] = b"dipro.schema_version"

REGION_MODES: Final[tuple[str, ...]] = ("crops", "features")

_FIELDS: Final[list[pa.Field]] = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("subject_id", pa.int64(), nullable=False),
    pa.field("stay_id", pa.int64(), nullable=False),
    pa.field("hospital", pa.int32(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("cxr_times", pa.list_(pa.float32()), nullable=False),
    pa.field("crop_size", pa.int32()),
    pa.field("crops", pa.binary()),
    pa.field("feature_dim", pa.int32()),
    pa.field("features", pa.list_(pa.float32())),
    pa.field("region_present", pa.list_(pa.bool_()), nullable=False),
    pa.field("ehr_times", pa.list_(pa.float32()), nullable=False),
    pa.field("ehr_values", pa.list_(pa.float32()), nullable=False),
    pa.field("ehr_observed", pa.list_(pa.bool_()), nullable=False),
    pa.field("demographics", pa.list_(pa.float32()), nullable=False),
    pa.field("region_labels", pa.list_(pa.int8()), nullable=False),
    pa.field("progression", pa.list_(pa.int8())),
    pa.field("mortality", pa.int8()),
    pa.field("los_days", pa.float32()),
    pa.field("dicom_ids", pa.list_(pa.string())),
    pa.field("study_ids", pa.list_(pa.int64())),
    pa.field("source", pa.string()),
    pa.field("source_version", pa.string()),
]
PROVENANCE_COLUMNS: Final[tuple[str, ...]] = ("dicom_ids", "study_ids", "source", "source_version")

SCHEMA: Final[pa.Schema] = pa.schema(
    _FIELDS, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()}
)
COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in _FIELDS)

# What the model needs from a record, per region mode (ids kept for reporting).
_COMMON_MODEL_COLUMNS: Final[tuple[str, ...]] = (
    "subject_id",
    "stay_id",
    "hospital",
    "cxr_times",
    "region_present",
    "ehr_times",
    "ehr_values",
    "ehr_observed",
    "demographics",
    "region_labels",
    "progression",
    "mortality",
    "los_days",
)


def model_columns(region_mode: str) -> list[str]:
    """Columns a training or evaluation reader must load for ``region_mode``."""
    if region_mode == "crops":
        return [*_COMMON_MODEL_COLUMNS, "crop_size", "crops"]
    if region_mode == "features":
        return [*_COMMON_MODEL_COLUMNS, "feature_dim", "features"]
    raise ValueError(f"unknown region mode {region_mode!r}; expected one of {REGION_MODES}")


class SchemaError(ValueError):
    """A shard or record that breaks the sample-record contract."""

    def __init__(
        self, message: str, *, source: str = "<memory>", record: str = "", field: str = ""
    ) -> None:
        where = source + (f", record {record}" if record else "") + (
            f", field {field!r}" if field else ""
        )
        super().__init__(f"{where}: {message}")
        self.source = source
        self.record = record
        self.field = field


def records_to_table(records: list[Mapping[str, Any]]) -> pa.Table:
    """Build an Arrow table with the project schema from records (numpy arrays are flattened)."""
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for rec in records:
        unknown = set(rec) - set(COLUMNS)
        if unknown:
            raise SchemaError(
                f"unknown fields {sorted(unknown)}",
                record=_record_id(rec),
                field=sorted(unknown)[0],
            )
        for name in COLUMNS:
            value = rec.get(name)
            if isinstance(value, np.ndarray):
                value = value.tobytes() if name == "crops" else value.reshape(-1).tolist()
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _record_id(rec: Mapping[str, Any]) -> str:
    return f"subject_id={rec.get('subject_id')} stay_id={rec.get('stay_id')}"


def schema_version_of(schema: pa.Schema, source: str = "<memory>") -> int:
    """The schema version in ``schema``'s metadata; raises SchemaError if absent or unknown."""
    meta = schema.metadata or {}
    if VERSION_KEY not in meta:
        raise SchemaError("no dipro.schema_version in the schema metadata", source=source)
    try:
        version = int(meta[VERSION_KEY])
    except ValueError as err:
        raise SchemaError(
            f"schema version {meta[VERSION_KEY]!r} is not an integer", source=source
        ) from err
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise SchemaError(
            f"schema version {version} is not known (this code reads "
            f"{sorted(KNOWN_SCHEMA_VERSIONS)})",
            source=source,
        )
    return version


def upgrade(table: pa.Table, source: str = "<memory>") -> pa.Table:
    """``table`` in the current schema version: a version-1 table gets null provenance columns."""
    version = schema_version_of(table.schema, source)
    if version == SCHEMA_VERSION:
        return table
    for name in PROVENANCE_COLUMNS:
        if name not in table.column_names:
            field = SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    meta = {**(table.schema.metadata or {}), VERSION_KEY: str(SCHEMA_VERSION).encode()}
    return table.replace_schema_metadata(meta)


def validate(table: pa.Table, source: str = "<memory>", *, labels_required: bool = True) -> None:
    """Check every record of ``table`` against the contract; raise SchemaError on the first fault.

    The error names ``source`` (the shard), the record's subject/stay id and the field.
    ``labels_required=False``: the rules of an inference dataset (module docstring).
    """
    schema_version_of(table.schema, source)
    for f in SCHEMA:
        if f.name not in table.column_names:
            raise SchemaError("missing column", source=source, field=f.name)
        actual = table.schema.field(f.name).type
        if actual != f.type:
            raise SchemaError(f"has type {actual}, expected {f.type}", source=source, field=f.name)
    rows = table.to_pylist()
    for row in rows:
        _validate_row(row, source, labels_required)


def _fail(row: Mapping[str, Any], source: str, field: str, message: str) -> SchemaError:
    return SchemaError(message, source=source, record=_record_id(row), field=field)


def _check_array(
    row: Mapping[str, Any], source: str, field: str, expected: int, what: str
) -> np.ndarray:
    value = row[field]
    if value is None:
        raise _fail(row, source, field, "is null")
    arr = np.asarray(value)
    if arr.size != expected:
        raise _fail(row, source, field, f"has {arr.size} values, expected {expected} ({what})")
    return arr


def _validate_row(row: Mapping[str, Any], source: str, labels_required: bool) -> None:
    R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
    for name in ("sample_id", "subject_id", "stay_id", "hospital", "split", "task"):
        if row[name] is None:
            raise _fail(row, source, name, "is null")
    if row["split"] not in vocab.SPLITS:
        raise _fail(row, source, "split", f"{row['split']!r} is not one of {vocab.SPLITS}")
    task = row["task"]
    if task not in vocab.TASKS:
        raise _fail(row, source, "task", f"{task!r} is not one of {vocab.TASKS}")

    times = np.asarray(row["cxr_times"] or [], dtype=np.float64)
    T = times.size
    min_cxrs = 1 if not labels_required and task != "disease_progression" else 2
    if T < min_cxrs:
        raise _fail(row, source, "cxr_times", f"has {T} CXRs, at least {min_cxrs} are needed")
    if not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
        raise _fail(row, source, "cxr_times", "times are not finite and strictly increasing")
    P = T - 1

    has_crops, has_features = row["crops"] is not None, row["features"] is not None
    if has_crops == has_features:
        raise _fail(row, source, "crops", "exactly one of crops / features must be set")
    if has_crops:
        S = row["crop_size"]
        if S is None or S <= 0:
            raise _fail(row, source, "crop_size", f"{S!r} is not a positive crop size")
        if len(row["crops"]) != T * R * S * S:
            raise _fail(
                row, source, "crops",
                f"has {len(row['crops'])} bytes, expected T*R*S*S = {T}*{R}*{S}*{S}",
            )
    else:
        F = row["feature_dim"]
        if F is None or F <= 0:
            raise _fail(row, source, "feature_dim", f"{F!r} is not a positive feature size")
        feats = _check_array(row, source, "features", T * R * F, f"T*R*F = {T}*{R}*{F}")
        if not np.all(np.isfinite(feats.astype(np.float64))):
            raise _fail(row, source, "features", "contains NaN or infinite values")

    _check_array(row, source, "region_present", T * R, f"T*R = {T}*{R}")

    ehr_times = np.asarray(row["ehr_times"] or [], dtype=np.float64)
    L = ehr_times.size
    if not np.all(np.isfinite(ehr_times)) or np.any(np.diff(ehr_times) <= 0):
        raise _fail(row, source, "ehr_times", "times are not finite and strictly increasing")
    values = _check_array(row, source, "ehr_values", L * V, f"L*V = {L}*{V}")
    if not np.all(np.isfinite(values.astype(np.float64))):
        raise _fail(row, source, "ehr_values", "contains NaN or infinite values")
    _check_array(row, source, "ehr_observed", L * V, f"L*V = {L}*{V}")
    demo = _check_array(row, source, "demographics", G, f"G = {G}")
    if not np.all(np.isfinite(demo.astype(np.float64))):
        raise _fail(row, source, "demographics", "contains NaN or infinite values")

    for name in ("dicom_ids", "study_ids"):
        if row.get(name) is not None:
            _check_array(row, source, name, T, f"T = {T}")

    if labels_required or row["region_labels"] is not None:
        region_labels = _check_array(
            row, source, "region_labels", P * R * K, f"P*R*K = {P}*{R}*{K}"
        )
        _check_codes(row, source, "region_labels", region_labels)

    if task == "disease_progression":
        if T != 2:
            raise _fail(row, source, "cxr_times", f"a progression sample has 2 CXRs, not {T}")
        if labels_required or row["progression"] is not None:
            codes = _check_array(row, source, "progression", K, f"K = {K}")
            _check_codes(row, source, "progression", codes)
    else:
        mortality = row["mortality"]
        if (labels_required or mortality is not None) and mortality not in (0, 1):
            raise _fail(row, source, "mortality", f"{mortality!r} is not 0 or 1")
        los = row["los_days"]
        if (labels_required or los is not None) and (
            los is None or not np.isfinite(los) or los <= 0
        ):
            raise _fail(row, source, "los_days", f"{los!r} is not a positive number of days")


def _check_codes(row: Mapping[str, Any], source: str, field: str, codes: np.ndarray) -> None:
    bad = (codes < 0) | (codes > vocab.NOT_MENTIONED)
    if np.any(bad):
        raise _fail(
            row, source, field, f"code {int(codes[bad][0])} is outside 0..{vocab.NOT_MENTIONED}"
        )

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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

SCHEMA: Final[pa.Schema] = pa.schema(_FIELDS, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})
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
        where = (
            source
            + (f", record {record}" if record else "")
            + (f", field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {message}")
        self.reason = message
        self.source = source
        self.record = record
        self.field = field

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Keyword-only parts survive pickling (Ray hands the error from a data task to the driver).
        return (
            partial(SchemaError, source=self.source, record=self.record, field=self.field),
            (self.reason,),
        )


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


def validate_schema(schema: pa.Schema, source: str = "<memory>") -> None:
    """Check a shard's schema (its footer is enough): known version, every column of that
    version, every type (a version-1 shard has no provenance columns: :func:`upgrade`)."""
    version = schema_version_of(schema, source)
    for f in SCHEMA:
        if version == 1 and f.name in PROVENANCE_COLUMNS:
            continue
        if f.name not in schema.names:
            raise SchemaError("missing column", source=source, field=f.name)
        actual = schema.field(f.name).type
        if actual != f.type:
            raise SchemaError(f"has type {actual}, expected {f.type}", source=source, field=f.name)


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
    """Check ``table``'s schema and every record; raise SchemaError on the first bad record.

    The error names ``source`` (the shard), the record's subject/stay id and the field. The
    record checks are vectorised over whole columns (see :func:`first_fault`).
    ``labels_required=False``: the rules of an inference dataset (module docstring).
    """
    validate_schema(table.schema, source)
    fault = first_fault(table, labels_required=labels_required)
    if fault is not None:
        raise fault.error(source)


@dataclass(frozen=True)
class Fault:
    """The first bad record of a table: its row, its subject/stay id, the field and why."""

    row: int
    record: str
    field: str
    message: str

    def error(self, source: str) -> SchemaError:
        """The fault as a SchemaError naming ``source``."""
        return SchemaError(self.message, source=source, record=self.record, field=self.field)


def first_fault(table: pa.Table, *, labels_required: bool = True) -> Fault | None:
    """The earliest record of ``table`` (whose columns have the SCHEMA types) that breaks the
    contract, or None. On a record with several faults, the field checked first is named.
    ``labels_required=False``: null labels pass, and an ICU record may hold a single CXR.

    Every check is a numpy/Arrow operation over a whole column (list columns as their flat
    values and per-row lengths), so a block of rows costs a few passes over its buffers.
    """
    n = table.num_rows
    if n == 0:
        return None
    faults = _Faults(table)
    R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
    for name in ("sample_id", "subject_id", "stay_id", "hospital", "split", "task"):
        faults.add(name, _nulls(table, name), lambda r: "is null")
    for name, allowed in (("split", vocab.SPLITS), ("task", vocab.TASKS)):
        column = table.column(name)
        known = pc.is_in(column, value_set=pa.array(allowed)).to_numpy(zero_copy_only=False)
        faults.add(
            name, ~known, lambda r, c=column, a=allowed: f"{c[r].as_py()!r} is not one of {a}"
        )

    progression = (
        pc.equal(table.column("task"), "disease_progression")
        .fill_null(False)
        .to_numpy(zero_copy_only=False)
    )
    T = np.maximum(_lengths(table, "cxr_times"), 0)
    min_cxrs = np.where(progression | labels_required, 2, 1)
    faults.add(
        "cxr_times",
        min_cxrs > T,
        lambda r: f"has {T[r]} CXRs, at least {min_cxrs[r]} are needed",
    )
    faults.add(
        "cxr_times",
        _not_increasing(table, "cxr_times"),
        lambda r: "times are not finite and strictly increasing",
    )
    P = np.maximum(T - 1, 0)

    has_crops, has_features = ~_nulls(table, "crops"), ~_nulls(table, "features")
    faults.add(
        "crops",
        has_crops == has_features,
        lambda r: "exactly one of crops / features must be set",
    )
    S = _integers(table, "crop_size")
    faults.add(
        "crop_size",
        has_crops & ~(S > 0),
        lambda r: f"{table.column('crop_size')[r].as_py()!r} is not a positive crop size",
    )
    crop_bytes = pc.binary_length(table.column("crops")).fill_null(0).to_numpy()
    expected_bytes = T * R * S * S
    faults.add(
        "crops",
        has_crops & (crop_bytes != expected_bytes),
        lambda r: f"has {crop_bytes[r]} bytes, expected T*R*S*S = {T[r]}*{R}*{S[r]}*{S[r]}",
    )
    F = _integers(table, "feature_dim")
    faults.add(
        "feature_dim",
        has_features & ~(F > 0),
        lambda r: f"{table.column('feature_dim')[r].as_py()!r} is not a positive feature size",
    )
    faults.add_size("features", has_features, T * R * F, lambda r: f"T*R*F = {T[r]}*{R}*{F[r]}")
    faults.add(
        "features",
        has_features & _not_finite(table, "features"),
        lambda r: "contains NaN or infinite values",
    )

    faults.add_size("region_present", None, T * R, lambda r: f"T*R = {T[r]}*{R}")

    L = np.maximum(_lengths(table, "ehr_times"), 0)
    faults.add(
        "ehr_times",
        _not_increasing(table, "ehr_times"),
        lambda r: "times are not finite and strictly increasing",
    )
    faults.add_size("ehr_values", None, L * V, lambda r: f"L*V = {L[r]}*{V}")
    faults.add(
        "ehr_values", _not_finite(table, "ehr_values"), lambda r: "contains NaN or infinite values"
    )
    faults.add_size("ehr_observed", None, L * V, lambda r: f"L*V = {L[r]}*{V}")
    faults.add_size("demographics", None, np.full(n, G), lambda r: f"G = {G}")
    faults.add(
        "demographics",
        _not_finite(table, "demographics"),
        lambda r: "contains NaN or infinite values",
    )

    for name in ("dicom_ids", "study_ids"):
        faults.add_size(name, ~_nulls(table, name), T, lambda r: f"T = {T[r]}")

    def labelled(name: str) -> np.ndarray | None:
        """Rows whose label ``name`` must be checked: all, or those that carry it."""
        return None if labels_required else ~_nulls(table, name)

    rows = labelled("region_labels")
    faults.add_size("region_labels", rows, P * R * K, lambda r: f"P*R*K = {P[r]}*{R}*{K}")
    faults.add_codes("region_labels", rows)
    faults.add(
        "cxr_times",
        progression & (T != 2),
        lambda r: f"a progression sample has 2 CXRs, not {T[r]}",
    )
    rows = progression if labels_required else progression & labelled("progression")
    faults.add_size("progression", rows, np.full(n, K), lambda r: f"K = {K}")
    faults.add_codes("progression", rows)

    outcome = ~progression & ~_nulls(table, "task")
    mortality = table.column("mortality")
    mortality_ok = pc.is_in(mortality, value_set=pa.array([0, 1], pa.int8()))
    rows = outcome if labels_required else outcome & labelled("mortality")
    faults.add(
        "mortality",
        rows & ~mortality_ok.to_numpy(zero_copy_only=False),
        lambda r: f"{mortality[r].as_py()!r} is not 0 or 1",
    )
    los = table.column("los_days")
    los_values = pc.fill_null(los, np.nan).to_numpy().astype(np.float64)
    rows = outcome if labels_required else outcome & labelled("los_days")
    faults.add(
        "los_days",
        rows & ~(np.isfinite(los_values) & (los_values > 0)),
        lambda r: f"{los[r].as_py()!r} is not a positive number of days",
    )
    return faults.first


class _Faults:
    """Collects, over column-wise checks, the earliest bad row (ties: the check added first)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.first: Fault | None = None

    def add(self, field: str, bad: np.ndarray, message: Callable[[int], str]) -> None:
        if not bad.any():
            return
        row = int(np.argmax(bad))
        if self.first is None or row < self.first.row:
            subject = self.table.column("subject_id")[row].as_py()
            stay = self.table.column("stay_id")[row].as_py()
            self.first = Fault(row, f"subject_id={subject} stay_id={stay}", field, message(row))

    def add_size(
        self,
        field: str,
        rows: np.ndarray | None,
        expected: np.ndarray,
        what: Callable[[int], str],
    ) -> None:
        """Rows (all, or those of ``rows``) whose list ``field`` is null or of another size."""
        sizes = _lengths(self.table, field)
        bad = sizes != expected
        self.add(
            field,
            bad if rows is None else rows & bad,
            lambda r: (
                "is null"
                if sizes[r] < 0
                else f"has {sizes[r]} values, expected {expected[r]} ({what(r)})"
            ),
        )

    def add_codes(self, field: str, rows: np.ndarray | None) -> None:
        """Rows (all, or those of ``rows``) with a label code outside 0..NOT_MENTIONED."""
        codes = _flat(self.table, field)
        bad_at = np.flatnonzero((codes < 0) | (codes > vocab.NOT_MENTIONED))
        bad = _rows_of(self.table, field, bad_at)
        self.add(
            field,
            bad if rows is None else rows & bad,
            lambda r: (
                f"code {_first_code_of(self.table, field, r)} is outside 0..{vocab.NOT_MENTIONED}"
            ),
        )


def _nulls(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).is_null().to_numpy(zero_copy_only=False)


def _integers(table: pa.Table, name: str) -> np.ndarray:
    """A nullable integer column as int64, with 0 where null."""
    return pc.fill_null(table.column(name), 0).to_numpy().astype(np.int64)


def _lengths(table: pa.Table, name: str) -> np.ndarray:
    """Values per row of a list column, -1 where null."""
    return pc.fill_null(pc.list_value_length(table.column(name)), -1).to_numpy().astype(np.int64)


def _flat(table: pa.Table, name: str) -> np.ndarray:
    """All values of a list column, row after row (null rows contribute none)."""
    return pc.list_flatten(table.column(name)).to_numpy()


def _rows_of(table: pa.Table, name: str, positions: np.ndarray) -> np.ndarray:
    """A per-row mask of the rows that hold the flat ``positions`` of list column ``name``."""
    bad = np.zeros(table.num_rows, bool)
    if positions.size:
        ends = np.cumsum(np.maximum(_lengths(table, name), 0))
        bad[np.searchsorted(ends, positions, side="right")] = True
    return bad


def _not_finite(table: pa.Table, name: str) -> np.ndarray:
    values = _flat(table, name)
    return _rows_of(table, name, np.flatnonzero(~np.isfinite(values)))


def _not_increasing(table: pa.Table, name: str) -> np.ndarray:
    """Rows of a list column of times with a non-finite value or a step that is not > 0."""
    values = _flat(table, name).astype(np.float64)
    bad_at = list(np.flatnonzero(~np.isfinite(values)))
    steps = np.diff(values) <= 0
    starts = np.cumsum(np.maximum(_lengths(table, name), 0))[:-1]
    starts = starts[(starts > 0) & (starts < values.size)]
    steps[starts - 1] = False  # the step from one row's last value to the next row's first
    bad_at.extend(np.flatnonzero(steps) + 1)
    return _rows_of(table, name, np.asarray(bad_at, np.int64))


def _first_code_of(table: pa.Table, name: str, row: int) -> int:
    codes = np.asarray(table.column(name)[row].as_py())
    return int(codes[(codes < 0) | (codes > vocab.NOT_MENTIONED)][0])

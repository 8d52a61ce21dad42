"""Readers of the raw MIMIC-IV, MIMIC-CXR-JPG and Chest ImaGenome files.

Every reader accepts plain and gzip-compressed CSV (``x.csv`` or ``x.csv.gz``, whichever
exists), checks the columns it needs and names the file when one is missing. Extra columns of
later versions (MIMIC-IV 2.2/3.x ``caregiver_id``, ``admit_provider_id``) are ignored. MIMIC-IV
1.0 kept ``admissions``/``patients`` under ``core/`` and called race ``ethnicity``: both are
accepted. Nothing here writes to the raw tree.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dipro import vocab


class RawDataError(ValueError):
    """A raw input file that cannot be read as the format says; names file, record and field."""

    def __init__(self, message: str, *, path: Path | str, record: str = "", field: str = ""):
        where = (
            str(path)
            + (f", record {record}" if record else "")
            + (f", field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {message}")


def find_table(root: Path, candidates: list[str]) -> Path:
    """The first of ``root/candidate`` or ``root/candidate.gz`` that exists."""
    for rel in candidates:
        for name in (rel, rel + ".gz"):
            path = root / name
            if path.is_file():
                return path
    tried = ", ".join(f"{c}[.gz]" for c in candidates)
    raise FileNotFoundError(f"{root}: none of {tried} exists")


# What reading a damaged CSV[.gz] raises: a truncated or corrupt gzip stream, bytes that are not
# UTF-8, a value that does not convert to the column's type, a malformed line.
READ_ERRORS = (EOFError, OSError, zlib.error, UnicodeDecodeError, ValueError)
_KEY_COLUMNS = ("subject_id", "stay_id", "hadm_id", "dicom_id")


def _converts(value: str, dtype: Any) -> bool:
    if value == "" or dtype in (str, "str", "string", object):
        return True
    try:
        (float if dtype in (float, "float", "float64") else int)(value)
    except ValueError:
        return False
    return True


def locate_csv_error(
    path: Path, err: BaseException, *, sep: str = ",", dtype: dict[str, Any] | None = None
) -> RawDataError:
    """The RawDataError of a CSV[.gz] that failed to read with ``err``: the file is read again
    line by line to name the first bad line (with its subject/stay/dicom id), and the column of
    bytes that are not UTF-8 or of a value that is not of the column's ``dtype``."""
    opener = gzip.open if path.suffix == ".gz" else open
    header: list[str] | None = None
    line_no = 0
    try:
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                    bad_bytes = None
                except UnicodeDecodeError as bad:
                    text, bad_bytes = raw.decode("latin-1"), bad
                row = next(csv.reader([text], delimiter=sep), [])
                if header is None:
                    header = [c.strip() for c in row]
                    if bad_bytes is None:
                        continue
                cells = dict(zip(header, row, strict=False))
                keys = ", ".join(f"{k}={cells[k]}" for k in _KEY_COLUMNS if cells.get(k))
                record = f"line {line_no}" + (f" ({keys})" if keys else "")
                if bad_bytes is not None:
                    column = next((c for c, v in cells.items() if not v.isascii()), "")
                    return RawDataError(
                        f"bytes that are not UTF-8 ({bad_bytes.reason}): the file must be "
                        "UTF-8 encoded",
                        path=path,
                        record=record,
                        field=column,
                    )
                for column, kind in (dtype or {}).items():
                    value = cells.get(column, "")
                    if not _converts(value, kind):
                        return RawDataError(
                            f"{value!r} is not a valid {getattr(kind, '__name__', kind)} value",
                            path=path,
                            record=record,
                            field=column,
                        )
    except (EOFError, OSError, zlib.error) as broken:
        return RawDataError(
            f"the file is truncated or corrupt ({broken}); the last whole line is {line_no}",
            path=path,
            record=f"line {line_no + 1}",
        )
    return RawDataError(f"cannot read the file ({' '.join(str(err).split())})", path=path)


def read_csv(
    path: Path,
    required: list[str],
    *,
    dtype: dict[str, Any] | None = None,
    renames: dict[str, str] | None = None,
    parse_dates: list[str] | None = None,
    sep: str = ",",
) -> pd.DataFrame:
    """Read a (possibly gzipped) CSV, keep ``required`` columns, raise naming the missing ones.

    ``renames`` maps alternative column names of older versions to the current ones.
    """
    try:
        header = pd.read_csv(path, nrows=0, sep=sep).columns.tolist()
    except READ_ERRORS as err:
        raise locate_csv_error(path, err, sep=sep) from err
    renames = {old: new for old, new in (renames or {}).items() if old in header}
    present = {renames.get(c, c) for c in header}
    missing = [c for c in required if c not in present]
    if missing:
        raise RawDataError(
            f"missing column(s) {missing}; found {header}", path=path, field=missing[0]
        )
    wanted = [c for c in header if renames.get(c, c) in required]
    types = {k: v for k, v in (dtype or {}).items() if k in wanted}
    try:
        frame = pd.read_csv(
            path, usecols=wanted, sep=sep, dtype=types, keep_default_na=True
        ).rename(columns=renames)
    except READ_ERRORS as err:
        raise locate_csv_error(path, err, sep=sep, dtype=types) from err
    for col in parse_dates or []:
        parsed = pd.to_datetime(frame[col], format="%Y-%m-%d %H:%M:%S", errors="coerce")
        bad = parsed.isna() & frame[col].notna()
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise RawDataError(
                f"cannot parse {frame[col].iloc[row]!r} as YYYY-MM-DD HH:MM:SS",
                path=path,
                record=f"line {row + 2}",
                field=col,
            )
        frame[col] = parsed
    return frame[required]


# --- MIMIC-IV ---------------------------------------------------------------------------------

# icustays.csv as published; every column is read.
ICUSTAY_COLUMNS = [
    "subject_id",
    "hadm_id",
    "stay_id",
    "first_careunit",
    "last_careunit",
    "intime",
    "outtime",
    "los",
]
# admissions.csv as published in 2.0 (1.0 calls race ``ethnicity``; 2.2 adds admit_provider_id),
# and the columns of it that are read.
ADMISSIONS_PUBLISHED_COLUMNS = [
    "subject_id",
    "hadm_id",
    "admittime",
    "dischtime",
    "deathtime",
    "admission_type",
    "admission_location",
    "discharge_location",
    "insurance",
    "language",
    "marital_status",
    "race",
    "edregtime",
    "edouttime",
    "hospital_expire_flag",
]
ADMISSION_COLUMNS = [
    "subject_id",
    "hadm_id",
    "admittime",
    "dischtime",
    "deathtime",
    "language",
    "marital_status",
    "race",
]
# patients.csv as published, and the columns of it that are read.
PATIENTS_PUBLISHED_COLUMNS = [
    "subject_id",
    "gender",
    "anchor_age",
    "anchor_year",
    "anchor_year_group",
    "dod",
]
PATIENT_COLUMNS = PATIENTS_PUBLISHED_COLUMNS[:4]


def read_icustays(mimic_iv: Path) -> pd.DataFrame:
    """``icu/icustays.csv[.gz]`` with intime/outtime as timestamps."""
    path = find_table(mimic_iv, ["icu/icustays.csv"])
    return read_csv(path, ICUSTAY_COLUMNS, parse_dates=["intime", "outtime"])


def read_admissions(mimic_iv: Path) -> pd.DataFrame:
    """``hosp/admissions`` (2.x/3.x) or ``core/admissions`` (1.0, ``ethnicity`` -> ``race``)."""
    path = find_table(mimic_iv, ["hosp/admissions.csv", "core/admissions.csv"])
    return read_csv(
        path,
        ADMISSION_COLUMNS,
        renames={"ethnicity": "race"},
        parse_dates=["admittime", "dischtime", "deathtime"],
    )


def read_patients(mimic_iv: Path) -> pd.DataFrame:
    """``hosp/patients`` (2.x/3.x) or ``core/patients`` (1.0)."""
    path = find_table(mimic_iv, ["hosp/patients.csv", "core/patients.csv"])
    return read_csv(path, PATIENT_COLUMNS)


# --- MIMIC-CXR-JPG ----------------------------------------------------------------------------

# mimic-cxr-2.0.0-metadata.csv as published, and the columns of it that are read.
METADATA_PUBLISHED_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
]


def parse_study_time(value: Any) -> str:
    """StudyTime as HHMMSS: ``213014.531`` -> ``"213014"``, ``45.0`` -> ``"000045"``."""
    return f"{int(float(value)):06d}"


def read_cxr_metadata(mimic_cxr: Path) -> pd.DataFrame:
    """``mimic-cxr-2.0.0-metadata.csv[.gz]`` with a ``study_datetime`` column added."""
    path = find_table(mimic_cxr, ["mimic-cxr-2.0.0-metadata.csv"])
    frame = read_csv(
        path,
        METADATA_COLUMNS,
        dtype={"dicom_id": str, "ViewPosition": str, "StudyDate": "Int64", "StudyTime": float},
    )
    frame["ViewPosition"] = frame["ViewPosition"].fillna("")
    stamps = []
    for dicom_id, date, time in zip(
        frame["dicom_id"], frame["StudyDate"], frame["StudyTime"], strict=True
    ):
        if pd.isna(date) or pd.isna(time):
            raise RawDataError(
                "StudyDate/StudyTime is blank",
                path=path,
                record=dicom_id,
                field="StudyDate" if pd.isna(date) else "StudyTime",
            )
        stamps.append(f"{int(date):08d}{parse_study_time(time)}")
    frame["study_datetime"] = pd.to_datetime(
        pd.Series(stamps, index=frame.index), format="%Y%m%d%H%M%S"
    )
    return frame


def image_path(mimic_cxr: Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """``files/p{first two digits}/p{subject}/s{study}/{dicom}.jpg`` under the MIMIC-CXR root."""
    sid = str(int(subject_id))
    return mimic_cxr / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{int(study_id)}" / f"{dicom_id}.jpg"


# --- Chest ImaGenome --------------------------------------------------------------------------

_COMPARISONS = ("worsened", "improved", "no change")
FINDING_ALIASES: dict[str, str] = {
    "pulmonary edema/hazy opacity": "pulmonary edema",
    **{f: f for f in vocab.FINDINGS},
}


@dataclass(frozen=True)
class RegionComparison:
    """One region-level comparison: ``current`` vs ``previous`` image, region, finding, code."""

    current: str
    previous: str
    region: str
    finding: str
    code: int


@dataclass(frozen=True)
class SceneGraph:
    """What the pipeline needs of one ImaGenome scene graph.

    boxes: region name -> (x1, y1, x2, y2) in original-image pixels, for vocab.REGIONS only.
    """

    dicom_id: str
    boxes: dict[str, tuple[float, float, float, float]]
    comparisons: tuple[RegionComparison, ...]


def scene_graph_path(scene_graph_dir: Path, dicom_id: str) -> Path:
    return scene_graph_dir / f"{dicom_id}_SceneGraph.json"


def read_scene_graph(path: Path) -> SceneGraph:
    """Parse one ``{dicom_id}_SceneGraph.json``: region boxes and comparison relationships.

    A relationship counts when one of its ``relationship_names`` is ``comparison|yes|<c>`` with
    c in worsened/improved/no change; each of its ``category|yes|<finding>`` attributes whose
    finding is in vocab.FINDINGS (after FINDING_ALIASES) gives one RegionComparison.
    """
    record = path.name.removesuffix("_SceneGraph.json")
    try:
        graph = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RawDataError(f"bytes that are not UTF-8 ({err.reason})", path=path) from err
    except json.JSONDecodeError as err:
        raise RawDataError(f"not valid JSON ({err})", path=path, record=record) from err
    if not isinstance(graph, dict):
        raise RawDataError(
            f"a scene graph is a JSON object, this file holds a {type(graph).__name__}",
            path=path,
            record=record,
            field="(top level)",
        )
    dicom_id = str(graph.get("image_id", path.name.removesuffix("_SceneGraph.json")))
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for obj in graph.get("objects", []):
        name = obj.get("bbox_name")
        if name in vocab.REGIONS:
            try:
                box = tuple(
                    float(obj[k])
                    for k in ("original_x1", "original_y1", "original_x2", "original_y2")
                )
            except (KeyError, TypeError, ValueError) as err:
                raise RawDataError(
                    f"bad original box ({err})",
                    path=path,
                    record=str(obj.get("object_id")),
                    field="original_x1",
                ) from err
            boxes[name] = box  # type: ignore[assignment]
    comparisons = []
    for rel in graph.get("relationships", []):
        region = rel.get("bbox_name")
        if region not in vocab.REGIONS:
            continue
        codes = {
            name.split("|")[2]
            for name in rel.get("relationship_names", [])
            if name.startswith("comparison|yes|") and name.split("|")[2] in _COMPARISONS
        }
        if len(codes) != 1:
            continue
        code = vocab.PROGRESSION_CODES[codes.pop()]
        current = str(rel.get("subject_id", "")).removesuffix(f"_{region}")
        previous = str(rel.get("object_id", "")).removesuffix(f"_{region}")
        for attr in rel.get("attributes", []):
            parts = attr.split("|")
            if len(parts) == 3 and parts[1] == "yes" and parts[2] in FINDING_ALIASES:
                comparisons.append(
                    RegionComparison(current, previous, region, FINDING_ALIASES[parts[2]], code)
                )
    return SceneGraph(dicom_id, boxes, tuple(comparisons))


GOLD_COLUMNS = [
    "patient_id",
    "relationship_id",
    "subject_id",
    "object_id",
    "bbox",
    "comparison",
    "attribute",
    "sentence",
    "bbox_coord_224_subject",
    "bbox_coord_224_object",
    "bbox_coord_original_subject",
    "bbox_coord_original_object",
    "label_name",
    "current_image_id",
    "previous_image_id",
]


def read_gold_comparisons(path: Path) -> list[RegionComparison]:
    """The gold comparisons file (tab-separated): one RegionComparison per usable row.

    The finding is ``label_name`` (after FINDING_ALIASES); rows whose finding, region or
    comparison is outside the vocabularies are skipped.
    """
    out = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        needed = (
            "bbox",
            "comparison",
            "label_name",
            "current_image_id",
            "previous_image_id",
            "patient_id",
        )
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise RawDataError(f"missing column(s) {missing}", path=path, field=missing[0])
        for row in reader:
            comparison = row["comparison"].strip().lower()
            finding = FINDING_ALIASES.get(row["label_name"].strip().lower())
            region = row["bbox"].strip().lower()
            if comparison in _COMPARISONS and finding and region in vocab.REGIONS:
                out.append(
                    RegionComparison(
                        row["current_image_id"].strip(),
                        row["previous_image_id"].strip(),
                        region,
                        finding,
                        vocab.PROGRESSION_CODES[comparison],
                    )
                )
    return out


def gold_subjects(path: Path) -> set[int]:
    """Patients (subject_id) that appear in the gold comparisons file."""
    frame = pd.read_csv(path, sep="\t", usecols=["patient_id"])
    return {int(x) for x in frame["patient_id"].dropna()}

"""Hourly EHR of the 38 variables from MIMIC-IV ``chartevents`` and ``outputevents``.

All 38 variables come from MetaVision ``chartevents`` itemids (> 220000) plus urine output
(``outputevents`` itemid 226559, Foley). The itemid map below was written from the MIMIC-IV
``d_items`` documentation; where a variable is charted under several itemids (arterial and
non-invasive blood pressure, serum and whole-blood chemistry) all of them feed it and the last
value of the hour wins.

| variable                          | itemids                 | unit    | clip range    | normal |
|-----------------------------------|-------------------------|---------|---------------|--------|
| Alanine aminotransferase          | 220644                  | IU/L    | 0 - 10000     | 20     |
| Albumin                           | 227456                  | g/dL    | 0.5 - 7       | 4      |
| Alkaline phosphate                | 225612                  | IU/L    | 0 - 5000      | 70     |
| Anion gap                         | 227073                  | mEq/L   | 0 - 60        | 12     |
| Asparate aminotransferase         | 220587                  | IU/L    | 0 - 20000     | 20     |
| Bicarbonate                       | 227443                  | mEq/L   | 0 - 60        | 24     |
| Bilirubin                         | 225690                  | mg/dL   | 0 - 80        | 0.7    |
| Blood urea nitrogen               | 225624                  | mg/dL   | 0 - 300       | 14     |
| Chloride                          | 220602, 226536          | mEq/L   | 50 - 180      | 104    |
| Creatinine                        | 220615                  | mg/dL   | 0 - 30        | 0.9    |
| Diastolic blood pressure          | 220051, 220180          | mmHg    | 0 - 300       | 70     |
| Fraction inspired oxygen          | 223835                  | %       | 21 - 100      | 21     |
| Glascow coma scale eye opening    | 220739                  | score   | 1 - 4         | 4      |
| Glascow coma scale motor response | 223901                  | score   | 1 - 6         | 6      |
| Glascow coma scale verbal response| 223900                  | score   | 1 - 5         | 5      |
| Glucose                           | 220621, 226537, 225664  | mg/dL   | 0 - 2000      | 110    |
| Heart Rate                        | 220045                  | bpm     | 0 - 350       | 80     |
| Height                            | 226730                  | cm      | 100 - 250     | 170    |
| Hematocrit                        | 220545, 226540          | %       | 0 - 80        | 42     |
| Hemoglobin                        | 220228                  | g/dL    | 0 - 25        | 14     |
| Magnesium                         | 220635                  | mg/dL   | 0 - 10        | 2      |
| Mean blood pressure               | 220052, 220181, 225312  | mmHg    | 0 - 350       | 85     |
| Oxygen saturation                 | 220277, 220227          | %       | 0 - 100       | 98     |
| Partial pressure of carbon dioxide| 220235                  | mmHg    | 0 - 250       | 40     |
| Partial thromboplastin time       | 227466                  | s       | 0 - 250       | 30     |
| Platelets                         | 227457                  | K/uL    | 0 - 2000      | 250    |
| Positive end-expiratory pressure  | 220339, 224700          | cmH2O   | 0 - 50        | 0      |
| Potassium                         | 227442, 227464          | mEq/L   | 0 - 15        | 4.2    |
| Prothrombin time                  | 227465                  | s       | 0 - 150       | 12     |
| Respiratory rate                  | 220210, 224690          | /min    | 0 - 150       | 16     |
| Sodium                            | 220645, 226534          | mEq/L   | 50 - 225      | 140    |
| Systolic blood pressure           | 220050, 220179          | mmHg    | 0 - 400       | 120    |
| Temperature                       | 223761 (F), 223762 (C)  | C       | 15 - 47       | 37     |
| Troponin-T                        | 227429                  | ng/mL   | 0 - 50        | 0.01   |
| Urine output                      | outputevents 226559     | mL      | 0 - 5000      | 70     |
| Weight                            | 224639, 226512          | kg      | 0 - 500       | 80     |
| White blood cell count            | 220546                  | K/uL    | 0 - 1000      | 8      |
| pH                                | 223830                  | -       | 6.3 - 8.4     | 7.4    |

Conversions before clipping: 223761 Fahrenheit -> Celsius; FiO2 given as a fraction (<= 1) ->
percent. GCS items use ``valuenum`` when present, else the leading number of the text
(``"4 Spontaneously"`` -> 4), else the MetaVision wording (``"Spontaneously"`` -> 4,
``"No Response-ETT"`` -> 1). Hourly bins: hour h holds events with h <= (charttime - intime) /
1 h < h + 1; the last value in the hour is kept (urine output too); values are forward filled
from the normal value above; ``observed`` is True where the hour had a measurement.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dipro import vocab
from dipro.data.mimic.readers import READ_ERRORS, RawDataError, locate_csv_error

log = logging.getLogger(__name__)

URINE_ITEMID = 226559


@dataclass(frozen=True)
class EhrVariable:
    """One of the 38 EHR variables: its itemids, clip range and normal (fill) value."""

    name: str
    itemids: tuple[int, ...]
    low: float
    high: float
    normal: float


EHR_SPECS: tuple[EhrVariable, ...] = (
    EhrVariable("Alanine aminotransferase", (220644,), 0, 10000, 20),
    EhrVariable("Albumin", (227456,), 0.5, 7, 4),
    EhrVariable("Alkaline phosphate", (225612,), 0, 5000, 70),
    EhrVariable("Anion gap", (227073,), 0, 60, 12),
    EhrVariable("Asparate aminotransferase", (220587,), 0, 20000, 20),
    EhrVariable("Bicarbonate", (227443,), 0, 60, 24),
    EhrVariable("Bilirubin", (225690,), 0, 80, 0.7),
    EhrVariable("Blood urea nitrogen", (225624,), 0, 300, 14),
    EhrVariable("Chloride", (220602, 226536), 50, 180, 104),
    EhrVariable("Creatinine", (220615,), 0, 30, 0.9),
    EhrVariable("Diastolic blood pressure", (220051, 220180), 0, 300, 70),
    EhrVariable("Fraction inspired oxygen", (223835,), 21, 100, 21),
    EhrVariable("Glascow coma scale eye opening", (220739,), 1, 4, 4),
    EhrVariable("Glascow coma scale motor response", (223901,), 1, 6, 6),
    EhrVariable("Glascow coma scale verbal response", (223900,), 1, 5, 5),
    EhrVariable("Glucose", (220621, 226537, 225664), 0, 2000, 110),
    EhrVariable("Heart Rate", (220045,), 0, 350, 80),
    EhrVariable("Height", (226730,), 100, 250, 170),
    EhrVariable("Hematocrit", (220545, 226540), 0, 80, 42),
    EhrVariable("Hemoglobin", (220228,), 0, 25, 14),
    EhrVariable("Magnesium", (220635,), 0, 10, 2),
    EhrVariable("Mean blood pressure", (220052, 220181, 225312), 0, 350, 85),
    EhrVariable("Oxygen saturation", (220277, 220227), 0, 100, 98),
    EhrVariable("Partial pressure of carbon dioxide", (220235,), 0, 250, 40),
    EhrVariable("Partial thromboplastin time", (227466,), 0, 250, 30),
    EhrVariable("Platelets", (227457,), 0, 2000, 250),
    EhrVariable("Positive end-expiratory pressure", (220339, 224700), 0, 50, 0),
    EhrVariable("Potassium", (227442, 227464), 0, 15, 4.2),
    EhrVariable("Prothrombin time", (227465,), 0, 150, 12),
    EhrVariable("Respiratory rate", (220210, 224690), 0, 150, 16),
    EhrVariable("Sodium", (220645, 226534), 50, 225, 140),
    EhrVariable("Systolic blood pressure", (220050, 220179), 0, 400, 120),
    EhrVariable("Temperature", (223761, 223762), 15, 47, 37),
    EhrVariable("Troponin-T", (227429,), 0, 50, 0.01),
    EhrVariable("Urine output", (URINE_ITEMID,), 0, 5000, 70),
    EhrVariable("Weight", (224639, 226512), 0, 500, 80),
    EhrVariable("White blood cell count", (220546,), 0, 1000, 8),
    EhrVariable("pH", (223830,), 6.3, 8.4, 7.4),
)

ITEMID_TO_VARIABLE: dict[int, int] = {
    itemid: index for index, spec in enumerate(EHR_SPECS) for itemid in spec.itemids
}
CHART_ITEMIDS: tuple[int, ...] = tuple(sorted(i for i in ITEMID_TO_VARIABLE if i != URINE_ITEMID))
NORMAL_VALUES: np.ndarray = np.array([s.normal for s in EHR_SPECS], dtype=np.float32)
_LOW = np.array([s.low for s in EHR_SPECS], dtype=np.float64)
_HIGH = np.array([s.high for s in EHR_SPECS], dtype=np.float64)

_FAHRENHEIT = 223761
_FIO2 = 223835
# The GCS items (eye opening, verbal response, motor response): each score's MetaVision text.
GCS_WORDS: dict[int, dict[int, str]] = {
    220739: {4: "Spontaneously", 3: "To Speech", 2: "To Pain", 1: "No Response"},
    223900: {
        5: "Oriented",
        4: "Confused",
        3: "Inappropriate Words",
        2: "Incomprehensible sounds",
        1: "No Response-ETT",
    },
    223901: {
        6: "Obeys Commands",
        5: "Localizes Pain",
        4: "Flex-withdraws",
        3: "Abnormal Flexion",
        2: "Abnormal extension",
        1: "No response",
    },
}
_GCS_ITEMIDS = tuple(GCS_WORDS)
# A GCS text without a leading number (lower case) -> its score.
GCS_TEXT: dict[str, float] = {
    text.lower(): score for words in GCS_WORDS.values() for score, text in words.items()
}
_LEADING_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)")


def gcs_text_to_number(text: str | None) -> float:
    """A GCS chart value as a number: ``"4 Spontaneously"`` -> 4, ``"Confused"`` -> 4."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return math.nan
    match = _LEADING_NUMBER.match(str(text))
    if match:
        return float(match.group(1))
    return float(GCS_TEXT.get(str(text).strip().lower(), math.nan))


@dataclass
class StreamStats:
    """Rows read and rows kept by one streaming pass."""

    rows_read: int = 0
    rows_kept: int = 0


def stream_events(
    path: Path,
    stay_ids: Iterable[int],
    itemids: Iterable[int],
    *,
    block_size: int = 16 << 20,
    stats: StreamStats | None = None,
    progress_every: int = 10_000_000,
) -> pd.DataFrame:
    """Stream a chartevents/outputevents CSV[.gz] once, keeping rows of ``stay_ids`` x ``itemids``.

    Memory is bounded by ``block_size`` plus the kept rows, whatever the file's size. Returns
    columns stay_id, charttime (timestamp), itemid, value (float; valuenum, or the parsed text
    for GCS items, or ``value`` for outputevents).
    """
    stats = stats if stats is not None else StreamStats()
    try:
        header = pd.read_csv(path, nrows=0).columns.tolist()
    except READ_ERRORS as err:
        raise locate_csv_error(path, err) from err
    needed = ["stay_id", "charttime", "itemid", "value"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise RawDataError(
            f"missing column(s) {missing}; found {header}", path=path, field=missing[0]
        )
    has_valuenum = "valuenum" in header
    columns = needed + (["valuenum"] if has_valuenum else [])
    types = {
        "stay_id": pa.int64(),
        "itemid": pa.int64(),
        "charttime": pa.string(),
        "value": pa.string(),
        "valuenum": pa.float64(),
    }
    convert = pacsv.ConvertOptions(
        include_columns=columns,
        column_types={c: types[c] for c in columns},
        strings_can_be_null=True,
    )
    stay_set = pa.array(sorted({int(s) for s in stay_ids}), pa.int64())
    item_set = pa.array(sorted({int(i) for i in itemids}), pa.int64())
    kept: list[pa.Table] = []
    next_report = progress_every
    for batch in _csv_blocks(path, header, convert, block_size):
        stats.rows_read += batch.num_rows
        mask = pc.and_(
            pc.is_in(batch.column("itemid"), value_set=item_set),
            pc.is_in(batch.column("stay_id"), value_set=stay_set),
        )
        selected = batch.filter(pc.fill_null(mask, False))
        if selected.num_rows:
            kept.append(selected)
            stats.rows_kept += selected.num_rows
        if stats.rows_read >= next_report:
            log.info("%s: %d rows read, %d kept", path.name, stats.rows_read, stats.rows_kept)
            next_report += progress_every
    log.info("%s: done, %d rows read, %d kept", path.name, stats.rows_read, stats.rows_kept)
    schema = pa.schema([(c, types[c]) for c in columns])
    frame = (pa.concat_tables(kept) if kept else schema.empty_table()).to_pandas()
    return _numeric_values(frame, path, has_valuenum)


def _csv_blocks(
    path: Path, header: list[str], convert: pacsv.ConvertOptions, block_size: int
) -> Iterator[pa.Table]:
    """Parse a CSV[.gz] in blocks of about ``block_size`` bytes cut at line ends.

    pyarrow's own streaming reader reads ahead without bound when parsing is slower than the
    disk; reading the blocks here keeps at most one block (and its parsed table) in memory.
    Values with embedded newlines are not supported (MIMIC-IV event tables have none).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    read_options = pacsv.ReadOptions(column_names=header)
    types = {"stay_id": int, "itemid": int, "valuenum": float}
    try:
        with opener(path, "rb") as handle:
            handle.readline()
            while block := handle.read(block_size):
                if not block.endswith(b"\n"):
                    block += handle.readline()
                table = pacsv.read_csv(
                    pa.BufferReader(block), read_options=read_options, convert_options=convert
                )
                yield table
    except (pa.ArrowInvalid, *READ_ERRORS) as err:
        raise locate_csv_error(path, err, dtype=types) from err


def _numeric_values(frame: pd.DataFrame, path: Path, has_valuenum: bool) -> pd.DataFrame:
    text = frame["value"]
    value = frame["valuenum"] if has_valuenum else pd.to_numeric(text, errors="coerce")
    value = value.astype(np.float64)
    gcs = frame["itemid"].isin(_GCS_ITEMIDS) & value.isna()
    if gcs.any():
        value.loc[gcs] = text[gcs].map(gcs_text_to_number)
    other = ~frame["itemid"].isin(_GCS_ITEMIDS) & value.isna()
    if other.any():
        value.loc[other] = pd.to_numeric(text[other], errors="coerce")
    charttime = pd.to_datetime(frame["charttime"], format="%Y-%m-%d %H:%M:%S", errors="coerce")
    bad = charttime.isna()
    if bad.any():
        row = frame[bad].iloc[0]
        raise RawDataError(
            f"cannot parse charttime {row['charttime']!r}",
            path=path,
            record=f"stay_id={row['stay_id']}",
            field="charttime",
        )
    return pd.DataFrame(
        {
            "stay_id": frame["stay_id"].to_numpy(),
            "charttime": charttime,
            "itemid": frame["itemid"].to_numpy(),
            "value": value.to_numpy(),
        }
    )


def to_variables(events: pd.DataFrame) -> pd.DataFrame:
    """Map itemids to variable indices, convert units and clip to the physiological ranges."""
    var = events["itemid"].map(ITEMID_TO_VARIABLE)
    out = events.loc[var.notna() & events["value"].notna()].copy()
    out["var"] = var[out.index].astype(np.int64)
    value = out["value"].to_numpy(np.float64).copy()
    itemid = out["itemid"].to_numpy()
    fahrenheit = itemid == _FAHRENHEIT
    value[fahrenheit] = (value[fahrenheit] - 32.0) * 5.0 / 9.0
    fraction = (itemid == _FIO2) & (value <= 1.0)
    value[fraction] *= 100.0
    idx = out["var"].to_numpy()
    out["value"] = np.clip(value, _LOW[idx], _HIGH[idx])
    return out


@dataclass(frozen=True)
class HourlyEhr:
    """values [L, V] float32 (clipped, forward filled); observed [L, V] bool; hour h = row h."""

    values: np.ndarray
    observed: np.ndarray


def hourly_ehr(events: pd.DataFrame, stays: pd.DataFrame) -> dict[int, HourlyEhr]:
    """Regularise variable-mapped ``events`` (see to_variables) into hourly grids per stay.

    ``stays`` has stay_id, intime, outtime; a stay gets ceil((outtime - intime) / 1 h) hours.
    Events outside [intime, outtime) are ignored. Within an hour the event with the latest
    charttime wins (file order breaks ties).
    """
    V = vocab.NUM_EHR
    frame = events.merge(stays[["stay_id", "intime"]], on="stay_id", how="inner")
    hours = (frame["charttime"] - frame["intime"]) / pd.Timedelta(hours=1)
    frame = frame.assign(
        hour=np.floor(hours.to_numpy()).astype(np.int64), order=np.arange(len(frame))
    )
    frame = frame.sort_values(["stay_id", "hour", "var", "charttime", "order"], kind="stable")
    frame = frame.drop_duplicates(["stay_id", "hour", "var"], keep="last")
    by_stay = {int(k): g for k, g in frame.groupby("stay_id", sort=True)}
    out: dict[int, HourlyEhr] = {}
    for row in stays.itertuples(index=False):
        n_hours = max(1, math.ceil((row.outtime - row.intime) / pd.Timedelta(hours=1)))
        grid = np.full((n_hours, V), np.nan, dtype=np.float64)
        group = by_stay.get(int(row.stay_id))
        if group is not None:
            inside = (group["hour"] >= 0) & (group["hour"] < n_hours)
            group = group[inside]
            grid[group["hour"].to_numpy(), group["var"].to_numpy()] = group["value"].to_numpy()
        observed = ~np.isnan(grid)
        filled = pd.DataFrame(grid).ffill().to_numpy()
        filled = np.where(np.isnan(filled), NORMAL_VALUES[None, :], filled)
        out[int(row.stay_id)] = HourlyEhr(filled.astype(np.float32), observed)
    return out


def first_observed(ehr: HourlyEhr, name: str) -> float:
    """The first measured value of variable ``name`` in the stay, or its normal value."""
    v = vocab.EHR_VARIABLES.index(name)
    rows = np.flatnonzero(ehr.observed[:, v])
    return float(ehr.values[rows[0], v]) if rows.size else float(NORMAL_VALUES[v])

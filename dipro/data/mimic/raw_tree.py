"""What both raw MIMIC tree writers share: ``RawTree`` (where a written tree lies and the ids its
tests look for), the CSV writer, the MIMIC-IV table writer, the CXR metadata rows, the pixels
(synthetic, or the real radiograph that pydicom-data ships), the ImaGenome names, scene graphs
and gold comparison file. The column lists are the readers' (``readers``).

Two writers use it: ``fixture_tree.write_raw_tree`` (a hand-designed tree that exercises every
cohort rule) and ``cohort_tree.write_cohort_raw_tree`` (the synthetic cohort as a raw tree).
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from dipro import vocab
from dipro.data.mimic.readers import (
    ADMISSIONS_PUBLISHED_COLUMNS,
    GOLD_COLUMNS,
    ICUSTAY_COLUMNS,
    METADATA_PUBLISHED_COLUMNS,
    PATIENTS_PUBLISHED_COLUMNS,
    scene_graph_path,
)

REAL_CXR_FILE = "RG1_UNCR.dcm"
BOXES: dict[str, tuple[float, float, float, float]] = {
    "right lung": (0.10, 0.15, 0.48, 0.80),
    "left lung": (0.52, 0.15, 0.90, 0.80),
    "right lower lung zone": (0.10, 0.55, 0.48, 0.80),
    "left lower lung zone": (0.52, 0.55, 0.90, 0.80),
    "right hilar structures": (0.30, 0.35, 0.45, 0.55),
    "left hilar structures": (0.55, 0.35, 0.70, 0.55),
    "right costophrenic angle": (0.08, 0.72, 0.22, 0.86),
    "left costophrenic angle": (0.78, 0.72, 0.92, 0.86),
    "cardiac silhouette": (0.38, 0.45, 0.75, 0.80),
    "mediastinum": (0.40, 0.10, 0.60, 0.50),
}
FINDING_NAMES = {
    f: ("pulmonary edema/hazy opacity" if f == "pulmonary edema" else f) for f in vocab.FINDINGS
}
COMPARISON_NAMES = ("worsened", "improved", "no change")


@dataclass
class RawTree:
    """Where the fabricated tree lies, and the ids its tests look for."""

    root: Path
    mimic_iv: Path
    mimic_cxr: Path
    scene_graph_dir: Path
    gold_file: Path
    missing_image: str = ""
    missing_scene_graph: str = ""
    real_cxr: str = ""
    gold_pair: tuple[str, str] = ("", "")
    gold_label: tuple[str, str, int] = ("", "", 0)
    silver_label_of_gold_pair: tuple[str, str, int] = ("", "", 0)
    conflict_pair: tuple[str, str] = ("", "")
    conflict_label: tuple[str, str] = ("", "")
    thinned: str = ""
    gap_stay: int = 0
    stays: dict[str, int] = field(default_factory=dict)

    @classmethod
    def under(cls, root: Path) -> RawTree:
        """The published folder layout under ``root`` (``mimiciv``, ``mimic-cxr-jpg``, the Chest
        ImaGenome silver scene graphs and gold comparison file), with no ids yet."""
        imagenome = root / "chest-imagenome"
        return cls(
            root,
            root / "mimiciv",
            root / "mimic-cxr-jpg",
            imagenome / "silver_dataset" / "scene_graph",
            imagenome / "gold_dataset" / "gold_object_comparison_with_coordinates.txt",
        )


def real_cxr_path() -> Path:
    """The real frontal chest radiograph shipped inside the installed ``pydicom-data`` package.

    It is located through the package's files (module ``data_store``), never fetched.
    """
    try:
        base = importlib.resources.files("data_store")
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "the pydicom-data package is not installed (pip install -e '.[dev]')"
        ) from err
    path = Path(str(base)) / "data" / REAL_CXR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the pydicom-data package")
    return path


def real_cxr_pixels() -> np.ndarray:
    """RG1_UNCR.dcm as an 8-bit image [1955, 1841]: MONOCHROME1 inverted, min-max scaled."""
    import pydicom

    ds = pydicom.dcmread(real_cxr_path())
    pixels = ds.pixel_array.astype(np.float64)
    low, high = np.percentile(pixels, [0.5, 99.5])
    scaled = np.clip((pixels - low) / max(high - low, 1.0), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


@dataclass
class CxrImage:
    dicom_id: str
    study_id: int
    hours: float
    view: str = "AP"
    previous: str | None = None
    pixels: np.ndarray | None = None
    write_jpeg: bool = True
    write_scene_graph: bool = True
    drop_region: str | None = None
    labels: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Stay:
    subject_id: int
    hadm_id: int
    stay_id: int
    intime: pd.Timestamp
    los_days: float
    first_unit: str
    last_unit: str
    age: int
    gender: str
    race: str
    marital: str
    language: str
    died: bool = False
    death_after_discharge: bool = False
    images: list[CxrImage] = field(default_factory=list)
    severity: float = 0.0


@contextmanager
def _open_text(path: Path, compress: bool) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:  # mtime 0 in the gzip header: the same tree is the same bytes on every write
        target = path.with_name(path.name + ".gz")
        with (
            target.open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed,
            io.TextIOWrapper(packed, encoding="utf-8", newline="") as handle,
        ):
            yield handle
    else:
        with path.open("w", newline="") as handle:
            yield handle


def write_csv(path: Path, header: list[str], rows: list[list[object]], compress: bool) -> None:
    with _open_text(path, compress) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def stamp(t: pd.Timestamp) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


class Ids:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.study = 50000000

    def dicom(self) -> str:
        return "-".join(f"{int(x):08x}" for x in self.rng.integers(0, 2**32, 5))

    def next_study(self) -> int:
        self.study += int(self.rng.integers(1, 999))
        return self.study


def hhmmss(when: pd.Timestamp) -> int:
    """``when``'s time of day as the number HHMMSS that StudyTime starts with (00:00:45 -> 45)."""
    return when.hour * 10000 + when.minute * 100 + when.second


def cxr_metadata_row(
    stay: Stay, img: CxrImage, shape: tuple[int, ...], when: pd.Timestamp, fraction: str = "0"
) -> list[object]:
    """The image's ``mimic-cxr-2.0.0-metadata`` row (``METADATA_PUBLISHED_COLUMNS``): a portable
    chest film in ``img.view``, erect, of ``shape`` (rows, columns), taken at ``when``; StudyTime
    is HHMMSS with ``fraction`` after the point."""
    rows, cols = shape
    return [
        img.dicom_id,
        stay.subject_id,
        img.study_id,
        "CHEST (PORTABLE AP)",
        img.view,
        rows,
        cols,
        when.strftime("%Y%m%d"),
        f"{hhmmss(when)}.{fraction}",
        "CHEST (PORTABLE AP)",
        "antero-posterior" if img.view == "AP" else "postero-anterior",
        "Erect",
    ]


def write_cxr_metadata(mimic_cxr: Path, rows: list[list[object]], compress: bool) -> None:
    """``mimic-cxr-2.0.0-metadata.csv[.gz]`` under ``mimic_cxr``, rows of ``cxr_metadata_row``."""
    write_csv(
        mimic_cxr / "mimic-cxr-2.0.0-metadata.csv", METADATA_PUBLISHED_COLUMNS, rows, compress
    )


def synthetic_pixels(rng: np.random.Generator, severity: float, rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    image = 60 + 80 * y
    for cx in (0.29, 0.71):
        lung = ((x - cx) / 0.19) ** 2 + ((y - 0.48) / 0.33) ** 2 < 1
        image = np.where(lung, 30 + 120 * severity * y, image)
    heart = ((x - 0.56) / 0.17) ** 2 + ((y - 0.63) / 0.16) ** 2 < 1
    image = np.where(heart, 200, image) + rng.normal(0, 8, (rows, cols))
    return np.clip(image, 0, 255).astype(np.uint8)


def icustay_row(stay: Stay, outtime: pd.Timestamp, digits: int) -> list[object]:
    """The stay's ``icustays`` row (``ICUSTAY_COLUMNS``), ``los`` rounded to ``digits``."""
    return [
        stay.subject_id,
        stay.hadm_id,
        stay.stay_id,
        stay.first_unit,
        stay.last_unit,
        stamp(stay.intime),
        stamp(outtime),
        round(stay.los_days, digits),
    ]


def admission_row(
    stay: Stay,
    admit: pd.Timestamp,
    disch: pd.Timestamp,
    death: pd.Timestamp | None,
    new: bool,
) -> list[object]:
    """The stay's ``admissions`` row (``ADMISSIONS_PUBLISHED_COLUMNS``): an emergency
    admission that ends in death or at home; the provider column when ``new``."""
    return [
        stay.subject_id,
        stay.hadm_id,
        stamp(admit),
        stamp(disch),
        stamp(death) if death is not None else None,
        "EW EMER.",
        "EMERGENCY ROOM",
        "DIED" if stay.died else "HOME",
        "Medicare",
        stay.language,
        stay.marital,
        stay.race,
        None,
        None,
        int(stay.died),
    ] + (["P12345"] if new else [])


def patient_row(stay: Stay, admit: pd.Timestamp) -> list[object]:
    """The stay's patient's ``patients`` row (anchor year: the admission's)."""
    return [stay.subject_id, stay.gender, stay.age, admit.year, "2017 - 2019", None]


def event_row(
    stay: Stay, caregiver: list[int], start: pd.Timestamp, stored: pd.Timestamp, itemid: int
) -> list[object]:
    """The key columns of a ``chartevents`` / ``outputevents`` row (``caregiver``: ``[id]`` for
    the 2.2/3.x tables, ``[]`` before); the value columns follow."""
    return [
        stay.subject_id,
        stay.hadm_id,
        stay.stay_id,
        *caregiver,
        stamp(start),
        stamp(stored),
        itemid,
    ]


def scene_graph_object(
    dicom_id: str, region: str, box: tuple[int, int, int, int], scaled: dict[str, int] | None = None
) -> dict[str, object]:
    """One entry of a scene graph's ``objects``: the region's box ``(x1, y1, x2, y2)`` in the
    original image's pixels, after the 224-pixel ``scaled`` coordinates when given."""
    x1, y1, x2, y2 = box
    return {
        "object_id": f"{dicom_id}_{region}",
        **(scaled or {}),
        "bbox_name": region,
        "synsets": [],
        "name": region.title(),
        "original_x1": x1,
        "original_y1": y1,
        "original_x2": x2,
        "original_y2": y2,
        "original_width": x2 - x1,
        "original_height": y2 - y1,
    }


def write_scene_graph(
    scene_graph_dir: Path,
    stay: Stay,
    img: CxrImage,
    order: int,
    when: pd.Timestamp,
    objects: list[dict[str, object]],
    *,
    phrase: str = "{finding} {comparison}.",
    patient: dict[str, object] | None = None,
) -> None:
    """Write the image's ``{dicom_id}_SceneGraph.json``: its ``objects`` (``scene_graph_object``)
    and, per region label, a comparison with ``img.previous`` whose phrase is ``phrase`` filled
    with ``finding``, ``comparison`` and ``region``; ``patient`` adds fields after ``gender``."""
    relationships = [
        {
            "relationship_id": f"{img.dicom_id}_{img.previous}_{n}",
            "predicate": "[]",
            "synsets": [],
            "relationship_names": [f"comparison|yes|{comparison}"],
            "relationship_contexts": [1.0],
            "phrase": phrase.format(finding=finding, comparison=comparison, region=region),
            "attributes": [f"anatomicalfinding|yes|{FINDING_NAMES[finding]}"],
            "bbox_name": region,
            "subject_id": f"{img.dicom_id}_{region}",
            "object_id": f"{img.previous}_{region}",
        }
        for n, (region, finding, comparison) in enumerate(img.labels)
    ]
    graph = {
        "image_id": img.dicom_id,
        "viewpoint": img.view,
        "patient_id": stay.subject_id,
        "study_id": img.study_id,
        "gender": stay.gender,
        **(patient or {}),
        "StudyOrder": order,
        "StudyDateTime": str(when),
        "objects": objects,
        "attributes": [],
        "relationships": relationships,
    }
    scene_graph_path(scene_graph_dir, img.dicom_id).write_text(json.dumps(graph))


def write_gold_comparisons(
    path: Path,
    subject_id: int,
    pair: tuple[str, str],
    labels: list[tuple[str, str, str]],
    sentence: str = "{finding}.",
) -> None:
    """Write the tab-separated gold comparison file (``GOLD_COLUMNS``): a row per (region,
    finding, comparison) label of the ``pair`` (current, previous image) of ``subject_id``, its
    sentence ``sentence`` filled with ``finding`` and ``comparison``, placeholder boxes."""
    current, previous = pair
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(GOLD_COLUMNS)
    writer.writerows(
        [
            subject_id,
            f"{current}_{previous}_g{n}",
            f"{current}_{region}",
            f"{previous}_{region}",
            region,
            comparison,
            f"anatomicalfinding|yes|{finding}",
            sentence.format(finding=finding, comparison=comparison),
            *["[0, 0, 1, 1]"] * 4,
            finding,
            current,
            previous,
        ]
        for n, (region, finding, comparison) in enumerate(labels)
    )
    path.write_text(buffer.getvalue())


def write_mimic_iv_tables(
    mi: Path,
    hosp: str,
    race_col: str,
    new: bool,
    compress: bool,
    icu_rows: list[list[object]],
    adm_rows: list[list[object]],
    pat_rows: list[list[object]],
    chart_rows: list[list[object]],
    out_rows: list[list[object]],
) -> None:
    """The MIMIC-IV tables the preprocessing reads (admissions' race column named ``race_col``),
    with the 2.2/3.x columns when ``new``."""
    extra = ["caregiver_id"] if new else []
    event_keys = ["subject_id", "hadm_id", "stay_id", *extra, "charttime", "storetime", "itemid"]
    write_csv(
        mi / "icu" / "icustays.csv",
        ICUSTAY_COLUMNS,
        icu_rows,
        compress,
    )
    write_csv(
        mi / hosp / "admissions.csv",
        [
            *(race_col if c == "race" else c for c in ADMISSIONS_PUBLISHED_COLUMNS),
            *(["admit_provider_id"] if new else []),
        ],
        adm_rows,
        compress,
    )
    write_csv(
        mi / hosp / "patients.csv",
        PATIENTS_PUBLISHED_COLUMNS,
        pat_rows,
        compress,
    )
    write_csv(
        mi / "icu" / "chartevents.csv",
        [*event_keys, "value", "valuenum", "valueuom", "warning"],
        chart_rows,
        compress,
    )
    write_csv(
        mi / "icu" / "outputevents.csv", [*event_keys, "value", "valueuom"], out_rows, compress
    )

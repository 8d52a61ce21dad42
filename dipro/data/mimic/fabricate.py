"""Write a small cohort as a raw MIMIC-IV / MIMIC-CXR-JPG / Chest ImaGenome tree.

The tree follows MIMIC_FORMATS.md to the column, so the real preprocessing path
(``ray_jobs.preprocess``) runs on it without credentials. Its patients exercise every cohort
rule; ``EXPECTED_COUNTS`` gives the count at each filter stage derived by hand from this design:

- R0..R5 (and more with n_regular > 6): one stay, AP CXRs at 3, 26, 50, 70 h; kept.
  R0 also has a PA image (AP only) and a conflicting comparison (region label dropped); R1 an
  earlier AP image in its 26 h study (latest image per subject, study, view); R2 a CXR 10 h
  before intime (CXR inside [intime, outtime]); R3 lacks its 50 h JPEG and its 70 h scene graph
  (reported by id and skipped); R4's first CXR is at 00:00:45, StudyTime ``45.0``; R5's first
  CXR is the real radiograph of pydicom-data (RG1_UNCR.dcm), and the gold file relabels its
  26 h vs 3 h pair (gold overrides silver).
- E1 changes care unit; E2 has two ICU stays in one admission; E3 is 16; E4 stays 1.5 days;
  E5 stays 40 days (outside the IQR fences); E6 has CXRs at 5, 20, 130 h (96 h gap); E7 at 4,
  9, 30, 60 h (the 9 h one is < 8 h after the previous kept); E8 has one CXR.

EHR: hourly vitals, 4-hourly temperature (Fahrenheit) and GCS (MetaVision text, some without
valuenum), 8-hourly labs, height and weight once, FiO2 as a fraction, urine output every 2 h in
outputevents, plus rows of itemids the pipeline must ignore. ``version`` picks the column set:
"2.0", "2.2" (adds caregiver_id, admit_provider_id) or "1.0" (``core/`` and ``ethnicity``).
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
from typing import IO, Any

import numpy as np
import pandas as pd
from PIL import Image

from dipro import vocab
from dipro.data.mimic.readers import GOLD_COLUMNS, image_path
from dipro.data.synthetic import cxr_identifiers

REAL_CXR_FILE = "RG1_UNCR.dcm"
_BOXES: dict[str, tuple[float, float, float, float]] = {
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
_FINDING_NAMES = {
    f: ("pulmonary edema/hazy opacity" if f == "pulmonary edema" else f) for f in vocab.FINDINGS
}
_COMPARISON_NAMES = ("worsened", "improved", "no change")

# Counts at every stage for n_regular = 6 (see the module table).
EXPECTED_COUNTS: dict[str, int] = {
    "icustays": 15,
    "same_careunit": 14,
    "single_stay_admission": 12,
    "adult": 11,
    "los_over_48h": 10,
    "los_within_iqr_fences": 9,
    "cxr_images": 45,
    "cxr_ap": 44,
    "cxr_latest_per_study_view": 43,
    "cxr_in_stay": 32,
    "cxr_with_files": 30,
    "cxr_after_8h_thinning": 29,
    "stays_with_cxr": 9,
    "stays_no_96h_gap": 8,
    "stays_2_to_14_cxr": 7,
    "samples_disease_progression": 17,
    "samples_mortality": 7,
    "samples_length_of_stay": 7,
}

# mimic-cxr-2.0.0-metadata.csv, in the published column order (MIMIC_FORMATS.md).
CXR_METADATA_COLUMNS = [
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
class _Image:
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
class _Stay:
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
    images: list[_Image] = field(default_factory=list)
    severity: float = 0.0


@contextmanager
def _open_text(path: Path, compress: bool) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wt", newline="") as handle:
            yield handle
    else:
        with path.open("w", newline="") as handle:
            yield handle


def _write_csv(path: Path, header: list[str], rows: list[list[object]], compress: bool) -> None:
    with _open_text(path, compress) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def _stamp(t: pd.Timestamp) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


class _Ids:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.study = 50000000

    def dicom(self) -> str:
        return "-".join(f"{int(x):08x}" for x in self.rng.integers(0, 2**32, 5))

    def next_study(self) -> int:
        self.study += int(self.rng.integers(1, 999))
        return self.study


def _synthetic_pixels(
    rng: np.random.Generator, severity: float, rows: int, cols: int
) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    image = 60 + 80 * y
    for cx in (0.29, 0.71):
        lung = ((x - cx) / 0.19) ** 2 + ((y - 0.48) / 0.33) ** 2 < 1
        image = np.where(lung, 30 + 120 * severity * y, image)
    heart = ((x - 0.56) / 0.17) ** 2 + ((y - 0.63) / 0.16) ** 2 < 1
    image = np.where(heart, 200, image) + rng.normal(0, 8, (rows, cols))
    return np.clip(image, 0, 255).astype(np.uint8)


def _design(n_regular: int, rng: np.random.Generator) -> list[_Stay]:
    ids = _Ids(rng)
    units = (
        "Medical Intensive Care Unit (MICU)",
        "Surgical Intensive Care Unit (SICU)",
        "Cardiac Vascular Intensive Care Unit (CVICU)",
    )
    races = (
        "WHITE",
        "BLACK/AFRICAN AMERICAN",
        "ASIAN - CHINESE",
        "HISPANIC/LATINO - DOMINICAN",
        "OTHER",
        "UNKNOWN",
    )
    stays: list[_Stay] = []
    base = pd.Timestamp("2150-03-01 08:00:00")

    def stay(i: int, hours: list[float], los: float, **kw: object) -> _Stay:
        subject = 10000000 + 37 * (i + 1)
        s = _Stay(
            subject_id=subject,
            hadm_id=20000000 + 11 * (i + 1),
            stay_id=30000000 + 7 * (i + 1),
            intime=base + pd.Timedelta(days=17 * i, minutes=13 * i),
            los_days=los,
            first_unit=units[i % 3],
            last_unit=units[i % 3],
            age=int(rng.integers(25, 90)),
            gender="FM"[i % 2],
            race=races[i % len(races)],
            marital=("MARRIED", "SINGLE", "WIDOWED", "DIVORCED", None)[i % 5],
            language="ENGLISH" if i % 4 else "?",
            severity=float(rng.uniform(0.2, 0.8)),
        )
        for key, value in kw.items():
            setattr(s, key, value)
        previous = None
        for h in hours:
            img = _Image(ids.dicom(), ids.next_study(), h, previous=previous)
            s.images.append(img)
            previous = img.dicom_id
        return s

    los_regular = [3.0, 3.5, 4.0, 4.5, 5.0, 6.5]
    for i in range(n_regular):
        stays.append(
            stay(
                i,
                [3, 26, 50, 70],
                los_regular[i % len(los_regular)],
                died=i in (1, 4),
                death_after_discharge=i == 2,
            )
        )
    n = n_regular
    stays.append(stay(n, [5, 30], 4.0, last_unit=units[(n + 1) % 3]))  # E1
    e2 = stay(n + 1, [5, 30], 3.0)  # E2: a second stay in the same admission
    stays.append(e2)
    second = stay(n + 2, [], 3.0)
    second.subject_id, second.hadm_id = e2.subject_id, e2.hadm_id
    second.intime = e2.intime + pd.Timedelta(days=4)
    stays.append(second)
    stays.append(stay(n + 3, [5, 30], 4.0, age=16))  # E3
    stays.append(stay(n + 4, [5, 30], 1.5))  # E4
    stays.append(stay(n + 5, [5, 30], 40.0))  # E5
    stays.append(stay(n + 6, [5, 20, 130], 6.0))  # E6
    stays.append(stay(n + 7, [4, 9, 30, 60], 4.0))  # E7
    stays.append(stay(n + 8, [10], 3.2))  # E8
    return stays


def _labels(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    out: dict[tuple[str, str], str] = {}
    for _ in range(int(rng.integers(2, 5))):
        key = (
            vocab.REGIONS[int(rng.integers(0, vocab.NUM_REGIONS))],
            vocab.FINDINGS[int(rng.integers(0, vocab.NUM_FINDINGS))],
        )
        out[key] = _COMPARISON_NAMES[int(rng.integers(0, 3))]
    return sorted((*key, value) for key, value in out.items())


def write_raw_tree(
    root: Path | str,
    *,
    n_regular: int = 6,
    seed: int = 0,
    version: str = "2.2",
    compress: bool = True,
    image_size: tuple[int, int] = (288, 320),
    real_cxr: bool = True,
) -> RawTree:
    """Write the fabricated cohort under ``root`` and return where everything is.

    ``n_regular`` >= 6 (the first six regular patients carry the special cases); only with 6
    does EXPECTED_COUNTS hold. ``image_size`` is (rows, columns) of the synthetic JPEGs.
    """
    if n_regular < 6:
        raise ValueError(f"n_regular must be >= 6, got {n_regular}")
    if version not in ("1.0", "2.0", "2.2"):
        raise ValueError(f"unknown MIMIC-IV version {version!r}; expected 1.0, 2.0 or 2.2")
    root = Path(root)
    rng = np.random.default_rng(seed)
    tree = RawTree(
        root,
        root / "mimiciv",
        root / "mimic-cxr-jpg",
        root / "chest-imagenome" / "silver_dataset" / "scene_graph",
        root / "chest-imagenome" / "gold_dataset" / "gold_object_comparison_with_coordinates.txt",
    )
    stays = _design(n_regular, rng)
    ids = _Ids(np.random.default_rng(seed + 1))
    ids.study = 59000000
    extra_images: list[tuple[_Stay, _Image]] = []
    r0, r1, r2, r3, r4, r5 = stays[:6]
    extra_images.append((r0, _Image(ids.dicom(), ids.next_study(), 40, view="PA")))
    dup = r1.images[1]
    extra_images.append((r1, _Image(ids.dicom(), dup.study_id, dup.hours - 0.2)))
    early = _Image(ids.dicom(), ids.next_study(), -10)
    r2.images[0].previous = early.dicom_id
    extra_images.append((r2, early))
    r3.images[2].write_jpeg = False
    r3.images[3].write_scene_graph = False
    tree.missing_image, tree.missing_scene_graph = r3.images[2].dicom_id, r3.images[3].dicom_id
    r4.intime = pd.Timestamp("2150-06-10 23:00:00")
    r4.images[0].hours = 1.0 + 45 / 3600
    r5.images[0].pixels = real_cxr_pixels() if real_cxr else None
    tree.real_cxr = r5.images[0].dicom_id if real_cxr else ""
    r5.images[1].drop_region = "left costophrenic angle"
    tree.thinned = stays[n_regular + 7].images[1].dicom_id
    tree.gap_stay = stays[n_regular + 6].stay_id

    for s in stays:
        for img in s.images:
            if img.previous is not None:
                img.labels = _labels(rng)
    tree.conflict_pair = (r0.images[1].dicom_id, r0.images[0].dicom_id)
    tree.conflict_label = ("right lung", "pleural effusion")
    r0.images[1].labels = [lab for lab in r0.images[1].labels if lab[:2] != tree.conflict_label]
    r0.images[1].labels += [
        (*tree.conflict_label, "worsened"),
        (*tree.conflict_label, "improved"),
        ("cardiac silhouette", "enlarged cardiac silhouette", "no change"),
    ]
    gold_img = r5.images[1]
    tree.gold_pair = (gold_img.dicom_id, r5.images[0].dicom_id)
    gold_img.labels = [
        ("left lung", "pleural effusion", "worsened"),
        ("mediastinum", "lung opacity", "worsened"),
    ]
    tree.silver_label_of_gold_pair = ("left lung", "pleural effusion", vocab.WORSENED)
    tree.gold_label = ("left lung", "pleural effusion", vocab.IMPROVED)
    tree.stays = {f"R{i}": s.stay_id for i, s in enumerate(stays[:n_regular])}

    all_images = [(s, img) for s in stays for img in s.images] + extra_images
    _write_cxr(tree, stays, all_images, rng, image_size, compress)
    _write_imagenome(tree, all_images, r5)
    _write_mimic_iv(tree, stays, rng, version, compress)
    return tree


def _write_cxr(
    tree: RawTree,
    stays: list[_Stay],
    images: list[tuple[_Stay, _Image]],
    rng: np.random.Generator,
    image_size: tuple[int, int],
    compress: bool,
) -> None:
    meta_rows, chexpert = [], {}
    for s, img in sorted(images, key=lambda p: (p[0].subject_id, p[1].study_id, p[1].hours)):
        when = s.intime + pd.Timedelta(hours=img.hours)
        pixels = (
            img.pixels
            if img.pixels is not None
            else _synthetic_pixels(rng, s.severity * (1 + img.hours / 100), *image_size)
        )
        rows, cols = pixels.shape
        hhmmss = when.hour * 10000 + when.minute * 100 + when.second
        study_time = f"{hhmmss}.{int(rng.integers(0, 1000)):03d}" if hhmmss > 100 else f"{hhmmss}.0"
        meta_rows.append(
            [
                img.dicom_id,
                s.subject_id,
                img.study_id,
                "CHEST (PORTABLE AP)",
                img.view,
                rows,
                cols,
                when.strftime("%Y%m%d"),
                study_time,
                "CHEST (PORTABLE AP)",
                "antero-posterior" if img.view == "AP" else "postero-anterior",
                "Erect",
            ]
        )
        chexpert[(s.subject_id, img.study_id)] = [
            float(rng.choice([1.0, 0.0, -1.0, np.nan])) for _ in range(14)
        ]
        if img.write_jpeg:
            path = image_path(tree.mimic_cxr, s.subject_id, img.study_id, img.dicom_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        img.pixels = pixels
    _write_csv(
        tree.mimic_cxr / "mimic-cxr-2.0.0-metadata.csv",
        CXR_METADATA_COLUMNS,
        meta_rows,
        compress,
    )
    labels = [
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Enlarged Cardiomediastinum",
        "Fracture",
        "Lung Lesion",
        "Lung Opacity",
        "No Finding",
        "Pleural Effusion",
        "Pleural Other",
        "Pneumonia",
        "Pneumothorax",
        "Support Devices",
    ]
    _write_csv(
        tree.mimic_cxr / "mimic-cxr-2.0.0-chexpert.csv",
        ["subject_id", "study_id", *labels],
        [[*k, *(None if np.isnan(v) else v for v in vals)] for k, vals in sorted(chexpert.items())],
        compress,
    )


def _write_imagenome(tree: RawTree, images: list[tuple[_Stay, _Image]], r5: _Stay) -> None:
    tree.scene_graph_dir.mkdir(parents=True, exist_ok=True)
    for order, (s, img) in enumerate(images):
        if not img.write_scene_graph:
            continue
        assert img.pixels is not None
        rows, cols = img.pixels.shape
        objects = []
        for region, (fx1, fy1, fx2, fy2) in [*_BOXES.items(), ("trachea", (0.45, 0.0, 0.55, 0.3))]:
            if region == img.drop_region:
                continue
            x1, y1, x2, y2 = (
                round(fx1 * cols),
                round(fy1 * rows),
                round(fx2 * cols),
                round(fy2 * rows),
            )
            objects.append(
                {
                    "object_id": f"{img.dicom_id}_{region}",
                    "x1": round(fx1 * 224),
                    "y1": round(fy1 * 224),
                    "x2": round(fx2 * 224),
                    "y2": round(fy2 * 224),
                    "width": round((fx2 - fx1) * 224),
                    "height": round((fy2 - fy1) * 224),
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
            )
        relationships = []
        for n, (region, finding, comparison) in enumerate(img.labels):
            relationships.append(
                {
                    "relationship_id": f"{img.dicom_id}_{img.previous}_{n}",
                    "predicate": "[]",
                    "synsets": [],
                    "relationship_names": [f"comparison|yes|{comparison}"],
                    "relationship_contexts": [1.0],
                    "phrase": f"{finding} {comparison} in the {region}.",
                    "attributes": [f"anatomicalfinding|yes|{_FINDING_NAMES[finding]}"],
                    "bbox_name": region,
                    "subject_id": f"{img.dicom_id}_{region}",
                    "object_id": f"{img.previous}_{region}",
                }
            )
        graph = {
            "image_id": img.dicom_id,
            "viewpoint": img.view,
            "patient_id": s.subject_id,
            "study_id": img.study_id,
            "gender": s.gender,
            "age_decile": f"{s.age // 10 * 10}-{s.age // 10 * 10 + 10} yrs",
            "reason_for_exam": "___ with dyspnea",
            "StudyOrder": order,
            "StudyDateTime": str(s.intime + pd.Timedelta(hours=img.hours)),
            "objects": objects,
            "attributes": [],
            "relationships": relationships,
        }
        (tree.scene_graph_dir / f"{img.dicom_id}_SceneGraph.json").write_text(json.dumps(graph))
    current, previous = tree.gold_pair
    region, finding, _ = tree.gold_label
    tree.gold_file.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        [
            r5.subject_id,
            f"{current}_{previous}_g0",
            f"{current}_{region}",
            f"{previous}_{region}",
            region,
            "improved",
            f"anatomicalfinding|yes|{finding}",
            f"{finding} has improved.",
            "[0, 0, 1, 1]",
            "[0, 0, 1, 1]",
            "[0, 0, 1, 1]",
            "[0, 0, 1, 1]",
            finding,
            current,
            previous,
        ]
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(GOLD_COLUMNS)
    writer.writerows(rows)
    tree.gold_file.write_text(buffer.getvalue())


def _write_mimic_iv(
    tree: RawTree, stays: list[_Stay], rng: np.random.Generator, version: str, compress: bool
) -> None:
    new = version == "2.2"
    hosp = "core" if version == "1.0" else "hosp"
    race_col = "ethnicity" if version == "1.0" else "race"
    icu_rows, adm_rows, pat_rows, chart_rows, out_rows = [], {}, {}, [], []
    for s in stays:
        outtime = s.intime + pd.Timedelta(days=s.los_days)
        icu_rows.append(
            [
                s.subject_id,
                s.hadm_id,
                s.stay_id,
                s.first_unit,
                s.last_unit,
                _stamp(s.intime),
                _stamp(outtime),
                round(s.los_days, 4),
            ]
        )
        admit = s.intime - pd.Timedelta(hours=5)
        disch = outtime + pd.Timedelta(days=2)
        death = (
            (disch - pd.Timedelta(hours=3))
            if s.died
            else (disch + pd.Timedelta(days=3) if s.death_after_discharge else None)
        )
        if s.hadm_id not in adm_rows:
            adm_rows[s.hadm_id] = [
                s.subject_id,
                s.hadm_id,
                _stamp(admit),
                _stamp(disch),
                _stamp(death) if death is not None else None,
                "EW EMER.",
                "EMERGENCY ROOM",
                "DIED" if s.died else "HOME",
                "Medicare",
                s.language,
                s.marital,
                s.race,
                None,
                None,
                int(s.died),
            ] + (["P12345"] if new else [])
        pat_rows[s.subject_id] = [s.subject_id, s.gender, s.age, admit.year, "2017 - 2019", None]
        chart_rows += _chart_events(s, outtime, rng, new)
        t = s.intime + pd.Timedelta(minutes=30)
        while t < outtime:
            out_rows.append(
                [
                    s.subject_id,
                    s.hadm_id,
                    s.stay_id,
                    *([7777] if new else []),
                    _stamp(t),
                    _stamp(t + pd.Timedelta(minutes=5)),
                    226559,
                    round(float(rng.uniform(20, 120)), 1),
                    "ml",
                ]
            )
            t += pd.Timedelta(hours=2)
    _write_mimic_iv_tables(
        tree.mimic_iv,
        hosp,
        race_col,
        new,
        compress,
        icu_rows,
        list(adm_rows.values()),
        list(pat_rows.values()),
        chart_rows,
        out_rows,
    )


_EYE = ((4, "Spontaneously"), (3, "To Speech"), (2, "To Pain"), (1, "No Response"))
_VERBAL = ((5, "Oriented"), (4, "Confused"), (1, "No Response-ETT"))
_MOTOR = ((6, "Obeys Commands"), (5, "Localizes Pain"), (4, "Flex-withdraws"))


def _chart_events(
    s: _Stay, outtime: pd.Timestamp, rng: np.random.Generator, new: bool
) -> list[list[object]]:
    rows: list[list[object]] = []

    def add(t: pd.Timestamp, itemid: int, value: object, valuenum: float | None, uom: str) -> None:
        rows.append(
            [
                s.subject_id,
                s.hadm_id,
                s.stay_id,
                *([4242] if new else []),
                _stamp(t),
                _stamp(t + pd.Timedelta(minutes=3)),
                itemid,
                value,
                valuenum,
                uom,
                0,
            ]
        )

    hour = 0
    t = s.intime + pd.Timedelta(minutes=int(rng.integers(1, 50)))
    add(t, 226730, 170 + s.age % 20, 170 + s.age % 20, "cm")
    add(t, 224639, round(60 + 40 * s.severity, 1), round(60 + 40 * s.severity, 1), "kg")
    while t < outtime:
        sev = s.severity * (1 + hour / 100)
        for itemid, mean, uom in (
            (220045, 80 + 30 * sev, "bpm"),
            (220179, 125 - 20 * sev, "mmHg"),
            (220180, 70 - 10 * sev, "mmHg"),
            (220181, 88 - 12 * sev, "mmHg"),
            (220210, 16 + 8 * sev, "insp/min"),
            (220277, 98 - 6 * sev, "%"),
        ):
            v = round(float(mean + rng.normal(0, 3)), 1)
            add(t, itemid, v, v, uom)
        add(t, 220048, "SR (Sinus Rhythm)", None, None)  # not one of the 38: ignored
        if hour % 4 == 0:
            v = round(float(98.6 + 3 * sev + rng.normal(0, 0.5)), 1)
            add(t, 223761, v, v, "°F")
            eye, verbal, motor = (
                _EYE[min(int(sev * 3), 3)],
                _VERBAL[min(int(sev * 2), 2)],
                _MOTOR[min(int(sev * 3), 2)],
            )
            add(t, 220739, eye[1], eye[0], None)
            add(t, 223900, f"{verbal[0]} {verbal[1]}", None, None)
            add(t, 223901, motor[1], None, None)
            add(t, 223835, round(0.21 + 0.4 * sev, 2), round(0.21 + 0.4 * sev, 2), "%")
        if hour % 8 == 0:
            for itemid, mean in (
                (220615, 1.0 + sev),
                (227442, 4.2),
                (220645, 139.0),
                (220545, 38 - 5 * sev),
                (227457, 230.0),
                (220546, 8 + 6 * sev),
                (223830, 7.4 - 0.1 * sev),
                (225624, 15 + 20 * sev),
            ):
                v = round(float(mean * rng.uniform(0.95, 1.05)), 2)
                add(t, itemid, v, v, None)
        if hour == 5:
            add(t + pd.Timedelta(minutes=10), 220045, 300000, 300000, "bpm")  # artefact: clipped
        t += pd.Timedelta(hours=1)
        hour += 1
    return rows


# --- the synthetic cohort (dipro.data.synthetic) as a raw tree --------------------------------

_CAREUNITS = (  # sorted by name, so the "careunit" hospital rule maps unit i back to site i
    "Cardiac Vascular Intensive Care Unit (CVICU)",
    "Medical Intensive Care Unit (MICU)",
    "Neuro Surgical Intensive Care Unit (Neuro SICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Trauma SICU (TSICU)",
)
_GCS_WORDS = {
    "Glascow coma scale eye opening": dict(_EYE),
    "Glascow coma scale verbal response": {
        5: "Oriented",
        4: "Confused",
        3: "Inappropriate Words",
        2: "Incomprehensible sounds",
        1: "No Response-ETT",
    },
    "Glascow coma scale motor response": {
        6: "Obeys Commands",
        5: "Localizes Pain",
        4: "Flex-withdraws",
        3: "Abnormal Flexion",
        2: "Abnormal extension",
        1: "No response",
    },
}


def write_cohort_raw_tree(
    cohort: Any,
    root: Path | str,
    *,
    version: str = "2.2",
    compress: bool = True,
    real_cxr: bool = True,
) -> RawTree:
    """Write a ``dipro.data.synthetic.Cohort`` as a raw MIMIC tree under ``root``.

    One admission and one ICU stay per patient (care unit = ``_CAREUNITS[hospital]``), each CXR
    an AP JPEG in its own study (the ids of ``dipro.data.synthetic.cxr_identifiers``, so the
    cohort's shards and this tree name the same images) with its scene graph (the cohort's
    boxes; its region labels as comparisons against the previous CXR), the cohort's observed
    hourly EHR as chartevents / outputevents rows in the middle of their hour (temperature in
    Fahrenheit, GCS as MetaVision text), and the first labelled pair of patient 0 copied into
    the gold file. With ``real_cxr`` the first CXR of patient 0 is the real radiograph of
    pydicom-data (boxes scaled to its size).
    """
    if int(cohort.hospital.max()) >= len(_CAREUNITS):
        raise ValueError(f"at most {len(_CAREUNITS)} hospitals can be written as care units")
    if version not in ("2.0", "2.2"):
        raise ValueError(f"unknown MIMIC-IV version {version!r}; expected 2.0 or 2.2")
    root = Path(root)
    tree = RawTree(
        root,
        root / "mimiciv",
        root / "mimic-cxr-jpg",
        root / "chest-imagenome" / "silver_dataset" / "scene_graph",
        root / "chest-imagenome" / "gold_dataset" / "gold_object_comparison_with_coordinates.txt",
    )
    dicom_ids, study_ids = cxr_identifiers(cohort)
    base = pd.Timestamp("2160-01-01 06:00:00")
    stays: list[_Stay] = []
    labelled_pairs: dict[int, int] = {
        int(cohort.pair_first[j]) + 1: j for j in range(len(cohort.pair_first))
    }
    real = real_cxr_pixels() if real_cxr else None
    boxes_of: dict[str, np.ndarray] = {}
    for i in range(cohort.num_patients):
        s = _Stay(
            subject_id=int(cohort.subject_id[i]),
            hadm_id=20_000_000 + i,
            stay_id=int(cohort.stay_id[i]),
            intime=base + pd.Timedelta(days=13 * i, minutes=7 * i),
            los_days=float(cohort.los_days[i]),
            first_unit=_CAREUNITS[int(cohort.hospital[i])],
            last_unit=_CAREUNITS[int(cohort.hospital[i])],
            age=int(round(float(cohort.age[i]))),
            gender=str(cohort.gender[i]),
            race=str(cohort.race[i]),
            marital=str(cohort.marital_status[i]),
            language=str(cohort.language[i]),
            died=bool(cohort.mortality[i]),
        )
        previous = None
        for m in range(*cohort.cxr_slice(i).indices(len(cohort.cxr_times))):
            img = _Image(
                str(dicom_ids[m]),
                int(study_ids[m]),
                float(cohort.cxr_times[m]),
                previous=previous,
                pixels=cohort.images[m],
            )
            boxes = cohort.boxes[m].astype(np.float64).copy()
            if real is not None and i == 0 and previous is None:
                rows, cols = real.shape
                side = cohort.images.shape[-1]
                boxes *= np.array([cols, rows, cols, rows]) / side
                img.pixels = real
            boxes[~cohort.region_present[m]] = np.nan
            boxes_of[img.dicom_id] = boxes
            j = labelled_pairs.get(m)
            if j is not None and previous is not None:
                codes = cohort.pair_region_labels[j]
                img.labels = [
                    (vocab.REGIONS[r], vocab.FINDINGS[k], _COMPARISON_NAMES[int(codes[r, k])])
                    for r, k in zip(*np.nonzero(codes != vocab.NOT_MENTIONED), strict=True)
                ]
            s.images.append(img)
            previous = img.dicom_id
        stays.append(s)
    if real is not None:
        tree.real_cxr = stays[0].images[0].dicom_id
    images = [(s, img) for s in stays for img in s.images]
    _write_cohort_cxr(tree, images, boxes_of, compress)
    gold_stay = next(s for s in stays if any(img.labels for img in s.images))
    gold_img = next(img for img in gold_stay.images if img.labels)
    tree.gold_pair = (gold_img.dicom_id, str(gold_img.previous))
    _write_gold(tree, gold_stay.subject_id, gold_img)
    _write_cohort_mimic_iv(tree, cohort, stays, version, compress)
    tree.stays = {f"patient{i}": s.stay_id for i, s in enumerate(stays)}
    return tree


def _write_cohort_cxr(
    tree: RawTree,
    images: list[tuple[_Stay, _Image]],
    boxes_of: dict[str, np.ndarray],
    compress: bool,
) -> None:
    meta_rows = []
    tree.scene_graph_dir.mkdir(parents=True, exist_ok=True)
    for order, (s, img) in enumerate(images):
        assert img.pixels is not None
        when = s.intime + pd.Timedelta(seconds=round(img.hours * 3600))
        rows, cols = img.pixels.shape
        hhmmss = when.hour * 10000 + when.minute * 100 + when.second
        meta_rows.append(
            [
                img.dicom_id,
                s.subject_id,
                img.study_id,
                "CHEST (PORTABLE AP)",
                "AP",
                rows,
                cols,
                when.strftime("%Y%m%d"),
                f"{hhmmss}.0",
                "CHEST (PORTABLE AP)",
                "antero-posterior",
                "Erect",
            ]
        )
        path = image_path(tree.mimic_cxr, s.subject_id, img.study_id, img.dicom_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.pixels).save(path, format="JPEG", quality=95)
        objects = []
        for r, region in enumerate(vocab.REGIONS):
            box = boxes_of[img.dicom_id][r]
            if np.isnan(box).any():
                continue
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            objects.append(
                {
                    "object_id": f"{img.dicom_id}_{region}",
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
            )
        relationships = [
            {
                "relationship_id": f"{img.dicom_id}_{img.previous}_{n}",
                "predicate": "[]",
                "synsets": [],
                "relationship_names": [f"comparison|yes|{comparison}"],
                "relationship_contexts": [1.0],
                "phrase": f"{finding} {comparison}.",
                "attributes": [f"anatomicalfinding|yes|{_FINDING_NAMES[finding]}"],
                "bbox_name": region,
                "subject_id": f"{img.dicom_id}_{region}",
                "object_id": f"{img.previous}_{region}",
            }
            for n, (region, finding, comparison) in enumerate(img.labels)
        ]
        graph = {
            "image_id": img.dicom_id,
            "viewpoint": "AP",
            "patient_id": s.subject_id,
            "study_id": img.study_id,
            "gender": s.gender,
            "StudyOrder": order,
            "StudyDateTime": str(when),
            "objects": objects,
            "attributes": [],
            "relationships": relationships,
        }
        (tree.scene_graph_dir / f"{img.dicom_id}_SceneGraph.json").write_text(json.dumps(graph))
    _write_csv(
        tree.mimic_cxr / "mimic-cxr-2.0.0-metadata.csv",
        CXR_METADATA_COLUMNS,
        meta_rows,
        compress,
    )


def _write_gold(tree: RawTree, subject_id: int, img: _Image) -> None:
    tree.gold_file.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(GOLD_COLUMNS)
    for n, (region, finding, comparison) in enumerate(img.labels):
        writer.writerow(
            [
                subject_id,
                f"{img.dicom_id}_{img.previous}_g{n}",
                f"{img.dicom_id}_{region}",
                f"{img.previous}_{region}",
                region,
                comparison,
                f"anatomicalfinding|yes|{finding}",
                f"{finding}.",
                "[0, 0, 1, 1]",
                "[0, 0, 1, 1]",
                "[0, 0, 1, 1]",
                "[0, 0, 1, 1]",
                finding,
                img.dicom_id,
                img.previous,
            ]
        )
    tree.gold_file.write_text(buffer.getvalue())


def _write_cohort_mimic_iv(
    tree: RawTree, cohort: Any, stays: list[_Stay], version: str, compress: bool
) -> None:
    from dipro.data.mimic.ehr import EHR_SPECS, URINE_ITEMID

    new = version == "2.2"
    care = [4242] if new else []
    icu_rows, adm_rows, pat_rows, chart_rows, out_rows = [], [], [], [], []
    temp = vocab.EHR_VARIABLES.index("Temperature")
    for i, s in enumerate(stays):
        outtime = s.intime + pd.Timedelta(days=s.los_days)
        icu_rows.append(
            [
                s.subject_id,
                s.hadm_id,
                s.stay_id,
                s.first_unit,
                s.last_unit,
                _stamp(s.intime),
                _stamp(outtime),
                round(s.los_days, 6),
            ]
        )
        admit, disch = s.intime - pd.Timedelta(hours=3), outtime + pd.Timedelta(days=1)
        death = _stamp(outtime - pd.Timedelta(hours=1)) if s.died else None
        adm_rows.append(
            [
                s.subject_id,
                s.hadm_id,
                _stamp(admit),
                _stamp(disch),
                death,
                "EW EMER.",
                "EMERGENCY ROOM",
                "DIED" if s.died else "HOME",
                "Medicare",
                s.language,
                s.marital,
                s.race,
                None,
                None,
                int(s.died),
            ]
            + (["P12345"] if new else [])
        )
        pat_rows.append([s.subject_id, s.gender, s.age, admit.year, "2017 - 2019", None])
        hours = int(cohort.num_hours[i])
        observed = cohort.ehr_observed[i, :hours]
        for h, v in zip(*np.nonzero(observed), strict=True):
            t = s.intime + pd.Timedelta(hours=int(h), minutes=30)
            value = float(cohort.ehr_values[i, h, v])
            name = vocab.EHR_VARIABLES[v]
            itemid = EHR_SPECS[v].itemids[0]
            if itemid == URINE_ITEMID:
                out_rows.append(
                    [
                        s.subject_id,
                        s.hadm_id,
                        s.stay_id,
                        *care,
                        _stamp(t),
                        _stamp(t),
                        itemid,
                        round(value, 4),
                        "ml",
                    ]
                )
                continue
            text: object = round(value, 4)
            number: object = round(value, 4)
            if v == temp:
                text = number = round(value * 9.0 / 5.0 + 32.0, 4)
            elif name in _GCS_WORDS:
                words = _GCS_WORDS[name][int(round(value))]
                text, number = (
                    (words, int(round(value))) if h % 2 else (f"{int(round(value))} {words}", None)
                )
            chart_rows.append(
                [
                    s.subject_id,
                    s.hadm_id,
                    s.stay_id,
                    *care,
                    _stamp(t),
                    _stamp(t),
                    itemid,
                    text,
                    number,
                    None,
                    0,
                ]
            )
    _write_mimic_iv_tables(
        tree.mimic_iv,
        "hosp",
        "race",
        new,
        compress,
        icu_rows,
        adm_rows,
        pat_rows,
        chart_rows,
        out_rows,
    )


def _write_mimic_iv_tables(
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
    """The MIMIC-IV tables the preprocessing reads, with the 2.2/3.x columns when ``new``."""
    extra = ["caregiver_id"] if new else []
    event_keys = ["subject_id", "hadm_id", "stay_id", *extra, "charttime", "storetime", "itemid"]
    _write_csv(
        mi / "icu" / "icustays.csv",
        [
            "subject_id",
            "hadm_id",
            "stay_id",
            "first_careunit",
            "last_careunit",
            "intime",
            "outtime",
            "los",
        ],
        icu_rows,
        compress,
    )
    _write_csv(
        mi / hosp / "admissions.csv",
        [
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
            race_col,
            "edregtime",
            "edouttime",
            "hospital_expire_flag",
            *(["admit_provider_id"] if new else []),
        ],
        adm_rows,
        compress,
    )
    _write_csv(
        mi / hosp / "patients.csv",
        ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
        pat_rows,
        compress,
    )
    _write_csv(
        mi / "icu" / "chartevents.csv",
        [*event_keys, "value", "valuenum", "valueuom", "warning"],
        chart_rows,
        compress,
    )
    _write_csv(
        mi / "icu" / "outputevents.csv", [*event_keys, "value", "valueuom"], out_rows, compress
    )

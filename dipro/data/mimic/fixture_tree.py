"""A hand-designed raw MIMIC-IV / MIMIC-CXR-JPG / Chest ImaGenome tree: ``write_raw_tree``.

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

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dipro import vocab
from dipro.data.mimic.ehr import GCS_WORDS
from dipro.data.mimic.raw_tree import (
    BOXES,
    COMPARISON_NAMES,
    CxrImage,
    Ids,
    RawTree,
    Stay,
    admission_row,
    cxr_metadata_row,
    event_row,
    hhmmss,
    icustay_row,
    patient_row,
    real_cxr_pixels,
    scene_graph_object,
    synthetic_pixels,
    write_csv,
    write_cxr_metadata,
    write_gold_comparisons,
    write_mimic_iv_tables,
    write_scene_graph,
)
from dipro.data.mimic.readers import image_path

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


def _design(n_regular: int, rng: np.random.Generator) -> list[Stay]:
    ids = Ids(rng)
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
    stays: list[Stay] = []
    base = pd.Timestamp("2150-03-01 08:00:00")

    def stay(i: int, hours: list[float], los: float, **kw: object) -> Stay:
        subject = 10000000 + 37 * (i + 1)
        s = Stay(
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
            img = CxrImage(ids.dicom(), ids.next_study(), h, previous=previous)
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
        out[key] = COMPARISON_NAMES[int(rng.integers(0, 3))]
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
    tree = RawTree.under(root)
    stays = _design(n_regular, rng)
    ids = Ids(np.random.default_rng(seed + 1))
    ids.study = 59000000
    extra_images: list[tuple[Stay, CxrImage]] = []
    r0, r1, r2, r3, r4, r5 = stays[:6]
    extra_images.append((r0, CxrImage(ids.dicom(), ids.next_study(), 40, view="PA")))
    dup = r1.images[1]
    extra_images.append((r1, CxrImage(ids.dicom(), dup.study_id, dup.hours - 0.2)))
    early = CxrImage(ids.dicom(), ids.next_study(), -10)
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
    stays: list[Stay],
    images: list[tuple[Stay, CxrImage]],
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
            else synthetic_pixels(rng, s.severity * (1 + img.hours / 100), *image_size)
        )
        fraction = f"{int(rng.integers(0, 1000)):03d}" if hhmmss(when) > 100 else "0"
        meta_rows.append(cxr_metadata_row(s, img, pixels.shape, when, fraction))
        chexpert[(s.subject_id, img.study_id)] = [
            float(rng.choice([1.0, 0.0, -1.0, np.nan])) for _ in range(14)
        ]
        if img.write_jpeg:
            path = image_path(tree.mimic_cxr, s.subject_id, img.study_id, img.dicom_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        img.pixels = pixels
    write_cxr_metadata(tree.mimic_cxr, meta_rows, compress)
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
    write_csv(
        tree.mimic_cxr / "mimic-cxr-2.0.0-chexpert.csv",
        ["subject_id", "study_id", *labels],
        [[*k, *(None if np.isnan(v) else v for v in vals)] for k, vals in sorted(chexpert.items())],
        compress,
    )


def _write_imagenome(tree: RawTree, images: list[tuple[Stay, CxrImage]], r5: Stay) -> None:
    tree.scene_graph_dir.mkdir(parents=True, exist_ok=True)
    for order, (s, img) in enumerate(images):
        if not img.write_scene_graph:
            continue
        assert img.pixels is not None
        rows, cols = img.pixels.shape
        objects = []
        for region, (fx1, fy1, fx2, fy2) in [*BOXES.items(), ("trachea", (0.45, 0.0, 0.55, 0.3))]:
            if region == img.drop_region:
                continue
            x1, y1, x2, y2 = (
                round(fx1 * cols),
                round(fy1 * rows),
                round(fx2 * cols),
                round(fy2 * rows),
            )
            scaled = {
                "x1": round(fx1 * 224),
                "y1": round(fy1 * 224),
                "x2": round(fx2 * 224),
                "y2": round(fy2 * 224),
                "width": round((fx2 - fx1) * 224),
                "height": round((fy2 - fy1) * 224),
            }
            objects.append(scene_graph_object(img.dicom_id, region, (x1, y1, x2, y2), scaled))
        write_scene_graph(
            tree.scene_graph_dir,
            s,
            img,
            order,
            s.intime + pd.Timedelta(hours=img.hours),
            objects,
            phrase="{finding} {comparison} in the {region}.",
            patient={
                "age_decile": f"{s.age // 10 * 10}-{s.age // 10 * 10 + 10} yrs",
                "reason_for_exam": "___ with dyspnea",
            },
        )
    region, finding, _ = tree.gold_label
    write_gold_comparisons(
        tree.gold_file,
        r5.subject_id,
        tree.gold_pair,
        [(region, finding, "improved")],
        sentence="{finding} has {comparison}.",
    )


def _write_mimic_iv(
    tree: RawTree, stays: list[Stay], rng: np.random.Generator, version: str, compress: bool
) -> None:
    new = version == "2.2"
    hosp = "core" if version == "1.0" else "hosp"
    race_col = "ethnicity" if version == "1.0" else "race"
    icu_rows, adm_rows, pat_rows, chart_rows, out_rows = [], {}, {}, [], []
    for s in stays:
        outtime = s.intime + pd.Timedelta(days=s.los_days)
        icu_rows.append(icustay_row(s, outtime, 4))
        admit = s.intime - pd.Timedelta(hours=5)
        disch = outtime + pd.Timedelta(days=2)
        death = (
            (disch - pd.Timedelta(hours=3))
            if s.died
            else (disch + pd.Timedelta(days=3) if s.death_after_discharge else None)
        )
        if s.hadm_id not in adm_rows:
            adm_rows[s.hadm_id] = admission_row(s, admit, disch, death, new)
        pat_rows[s.subject_id] = patient_row(s, admit)
        chart_rows += _chart_events(s, outtime, rng, new)
        t = s.intime + pd.Timedelta(minutes=30)
        while t < outtime:
            out_rows.append(
                [
                    *event_row(s, [7777] if new else [], t, t + pd.Timedelta(minutes=5), 226559),
                    round(float(rng.uniform(20, 120)), 1),
                    "ml",
                ]
            )
            t += pd.Timedelta(hours=2)
    write_mimic_iv_tables(
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


def _chart_events(
    s: Stay, outtime: pd.Timestamp, rng: np.random.Generator, new: bool
) -> list[list[object]]:
    rows: list[list[object]] = []

    def add(t: pd.Timestamp, itemid: int, value: object, valuenum: float | None, uom: str) -> None:
        stored = t + pd.Timedelta(minutes=3)
        rows.append(
            [*event_row(s, [4242] if new else [], t, stored, itemid), value, valuenum, uom, 0]
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
            eye = (4, 3, 2, 1)[min(int(sev * 3), 3)]
            verbal = (5, 4, 1)[min(int(sev * 2), 2)]
            motor = (6, 5, 4)[min(int(sev * 3), 2)]
            add(t, 220739, GCS_WORDS[220739][eye], eye, None)
            add(t, 223900, f"{verbal} {GCS_WORDS[223900][verbal]}", None, None)
            add(t, 223901, GCS_WORDS[223901][motor], None, None)
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

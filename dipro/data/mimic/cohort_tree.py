"""The synthetic cohort (``dipro.data.synthetic``) as a raw MIMIC tree: ``write_cohort_raw_tree``.

The same patients, images and hourly EHR as the cohort's shards, in the raw formats of
MIMIC_FORMATS.md, so that ``ray_jobs.preprocess`` can be run on them and compared with the
shards the generator writes directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dipro import vocab
from dipro.data.mimic.ehr import EHR_SPECS, GCS_WORDS, URINE_ITEMID
from dipro.data.mimic.raw_tree import (
    COMPARISON_NAMES,
    CxrImage,
    RawTree,
    Stay,
    admission_row,
    cxr_metadata_row,
    event_row,
    icustay_row,
    patient_row,
    real_cxr_pixels,
    scene_graph_object,
    write_cxr_metadata,
    write_gold_comparisons,
    write_mimic_iv_tables,
    write_scene_graph,
)
from dipro.data.mimic.readers import image_path
from dipro.data.synthetic import cxr_identifiers

_CAREUNITS = (  # sorted by name, so the "careunit" hospital rule maps unit i back to site i
    "Cardiac Vascular Intensive Care Unit (CVICU)",
    "Medical Intensive Care Unit (MICU)",
    "Neuro Surgical Intensive Care Unit (Neuro SICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Trauma SICU (TSICU)",
)


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
    tree = RawTree.under(root)
    dicom_ids, study_ids = cxr_identifiers(cohort)
    base = pd.Timestamp("2160-01-01 06:00:00")
    stays: list[Stay] = []
    labelled_pairs: dict[int, int] = {
        int(cohort.pair_first[j]) + 1: j for j in range(len(cohort.pair_first))
    }
    real = real_cxr_pixels() if real_cxr else None
    boxes_of: dict[str, np.ndarray] = {}
    for i in range(cohort.num_patients):
        s = Stay(
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
            img = CxrImage(
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
                    (vocab.REGIONS[r], vocab.FINDINGS[k], COMPARISON_NAMES[int(codes[r, k])])
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
    write_gold_comparisons(tree.gold_file, gold_stay.subject_id, tree.gold_pair, gold_img.labels)
    _write_cohort_mimic_iv(tree, cohort, stays, version, compress)
    tree.stays = {f"patient{i}": s.stay_id for i, s in enumerate(stays)}
    return tree


def _write_cohort_cxr(
    tree: RawTree,
    images: list[tuple[Stay, CxrImage]],
    boxes_of: dict[str, np.ndarray],
    compress: bool,
) -> None:
    meta_rows = []
    tree.scene_graph_dir.mkdir(parents=True, exist_ok=True)
    for order, (s, img) in enumerate(images):
        assert img.pixels is not None
        when = s.intime + pd.Timedelta(seconds=round(img.hours * 3600))
        meta_rows.append(cxr_metadata_row(s, img, img.pixels.shape, when))
        path = image_path(tree.mimic_cxr, s.subject_id, img.study_id, img.dicom_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.pixels).save(path, format="JPEG", quality=95)
        objects = []
        for r, region in enumerate(vocab.REGIONS):
            box = boxes_of[img.dicom_id][r]
            if np.isnan(box).any():
                continue
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            objects.append(scene_graph_object(img.dicom_id, region, (x1, y1, x2, y2)))
        write_scene_graph(tree.scene_graph_dir, s, img, order, when, objects)
    write_cxr_metadata(tree.mimic_cxr, meta_rows, compress)


def _write_cohort_mimic_iv(
    tree: RawTree, cohort: Any, stays: list[Stay], version: str, compress: bool
) -> None:
    new = version == "2.2"
    care = [4242] if new else []
    icu_rows, adm_rows, pat_rows, chart_rows, out_rows = [], [], [], [], []
    temp = vocab.EHR_VARIABLES.index("Temperature")
    for i, s in enumerate(stays):
        outtime = s.intime + pd.Timedelta(days=s.los_days)
        icu_rows.append(icustay_row(s, outtime, 6))
        admit, disch = s.intime - pd.Timedelta(hours=3), outtime + pd.Timedelta(days=1)
        death = outtime - pd.Timedelta(hours=1) if s.died else None
        adm_rows.append(admission_row(s, admit, disch, death, new))
        pat_rows.append(patient_row(s, admit))
        hours = int(cohort.num_hours[i])
        observed = cohort.ehr_observed[i, :hours]
        for h, v in zip(*np.nonzero(observed), strict=True):
            t = s.intime + pd.Timedelta(hours=int(h), minutes=30)
            value = float(cohort.ehr_values[i, h, v])
            itemid = EHR_SPECS[v].itemids[0]
            if itemid == URINE_ITEMID:
                out_rows.append([*event_row(s, care, t, t, itemid), round(value, 4), "ml"])
                continue
            text: object = round(value, 4)
            number: object = round(value, 4)
            if v == temp:
                text = number = round(value * 9.0 / 5.0 + 32.0, 4)
            elif itemid in GCS_WORDS:
                words = GCS_WORDS[itemid][int(round(value))]
                text, number = (
                    (words, int(round(value))) if h % 2 else (f"{int(round(value))} {words}", None)
                )
            chart_rows.append([*event_row(s, care, t, t, itemid), text, number, None, 0])
    write_mimic_iv_tables(
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

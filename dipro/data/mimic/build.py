"""From a raw MIMIC tree to sample records of the three tasks (everything but the pixels).

``prepare_samples`` reads the raw files (never writing to them), applies the cohort rules
(``cohort``), labels CXR pairs (``labels``), regularises the EHR (``ehr``) and returns one
``SampleSpec`` per sample, with the dicom ids whose region crops or features complete it.

Samples:
- disease_progression: each consecutive kept CXR pair of a stay that ImaGenome compares (at
  least one region label); EHR hours between the two CXRs.
- mortality, length_of_stay: each stay with at least 2 kept CXRs taken before 48 h; those CXRs,
  and EHR hours 0-47.
EHR hour h covers [h, h + 1) hours since intime; its time in ``ehr_times`` is h + 1, the moment
its last value is known, so the hours of a pair (t_i, t_j) are those with
floor(t_i) <= h < floor(t_j), all ending inside (t_i, t_j].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dipro import vocab
from dipro.data.mimic import cohort as rules_mod
from dipro.data.mimic import ehr as ehr_mod
from dipro.data.mimic import readers
from dipro.data.mimic.demographics import demographic_vector, in_hospital_death
from dipro.data.mimic.labels import finding_labels, pair_region_labels

log = logging.getLogger(__name__)

ICU_WINDOW_HOURS = 48


DATASET_NAMES = {
    "mimic_iv": "MIMIC-IV",
    "mimic_cxr_jpg": "MIMIC-CXR-JPG",
    "chest_imagenome": "Chest ImaGenome",
}


def mimic_provenance(versions: Mapping[str, Any]) -> dict[str, str]:
    """The ``source`` / ``source_version`` fields of every record built from a raw tree whose
    data set versions are ``versions`` (keys of DATASET_NAMES, e.g. ``{"mimic_iv": "2.2"}``)."""
    unknown = sorted(set(versions) - set(DATASET_NAMES))
    if unknown:
        raise ValueError(
            f"raw.versions: unknown data sets {unknown}; expected {list(DATASET_NAMES)}"
        )
    text = ", ".join(f"{DATASET_NAMES[k]} {versions[k]}" for k in DATASET_NAMES if k in versions)
    return {"source": "mimic", "source_version": text}


@dataclass(frozen=True)
class RawPaths:
    """Roots of the three raw data sets."""

    mimic_iv: Path
    mimic_cxr: Path
    scene_graph_dir: Path
    gold_file: Path | None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> RawPaths:
        """From the config's ``raw`` section."""
        gold = cfg.get("gold_file")
        return cls(
            Path(cfg["mimic_iv"]),
            Path(cfg["mimic_cxr"]),
            Path(cfg["scene_graph_dir"]),
            Path(gold) if gold else None,
        )

    def check(self) -> None:
        for name in ("mimic_iv", "mimic_cxr", "scene_graph_dir"):
            path = getattr(self, name)
            if not path.is_dir():
                raise FileNotFoundError(f"raw.{name}={path} is not a directory")
        if self.gold_file is not None and not self.gold_file.is_file():
            raise FileNotFoundError(f"raw.gold_file={self.gold_file} is not a file")


@dataclass
class SampleSpec:
    """A sample record without its region crops/features; ``dicom_ids`` name its CXRs."""

    record: dict[str, Any]
    dicom_ids: list[str]


@dataclass
class PreparedCohort:
    """Samples per task plus the counts, skipped ids and the region items to compute."""

    samples: dict[str, list[SampleSpec]]
    counts: rules_mod.CohortCounts
    images: pd.DataFrame  # dicom_id, path, rows, columns (every CXR any sample needs)
    boxes: dict[str, dict[str, tuple[float, float, float, float]]]
    extra: dict[str, Any] = field(default_factory=dict)


def prepare_samples(
    paths: RawPaths,
    rules: rules_mod.CohortRules,
    *,
    seed: int,
    num_hospitals: int,
    hospital_rule: str,
    chunk_bytes: int = 16 << 20,
) -> PreparedCohort:
    """Run the cohort rules and build every task's samples (module docstring)."""
    paths.check()
    counts = rules_mod.CohortCounts()
    stays = rules_mod.select_stays(
        readers.read_icustays(paths.mimic_iv),
        readers.read_admissions(paths.mimic_iv),
        readers.read_patients(paths.mimic_iv),
        rules,
        counts,
    )
    cxr = rules_mod.align_cxrs(readers.read_cxr_metadata(paths.mimic_cxr), stays, rules, counts)
    cxr = cxr.assign(
        path=[
            str(readers.image_path(paths.mimic_cxr, s, st, d))
            for s, st, d in zip(cxr["subject_id"], cxr["study_id"], cxr["dicom_id"], strict=True)
        ]
    )
    cxr = rules_mod.drop_missing_files(
        cxr,
        lambda row: Path(row["path"]).is_file(),
        lambda row: readers.scene_graph_path(paths.scene_graph_dir, row["dicom_id"]).is_file(),
        counts,
    )
    cxr = rules_mod.thin_and_filter_stays(cxr, rules, counts)
    stays = stays[stays["stay_id"].isin(cxr["stay_id"].unique())].reset_index(drop=True)

    graphs = {}
    kept_dicoms = sorted(cxr["dicom_id"].unique())
    for n, dicom_id in enumerate(kept_dicoms, 1):
        graphs[dicom_id] = readers.read_scene_graph(
            readers.scene_graph_path(paths.scene_graph_dir, dicom_id)
        )
        if n % 5000 == 0 or n == len(kept_dicoms):
            log.info("scene graphs: %d / %d read", n, len(kept_dicoms))
    silver = [c for g in graphs.values() for c in g.comparisons]
    gold = readers.read_gold_comparisons(paths.gold_file) if paths.gold_file else []
    pair_labels, conflicts = pair_region_labels(silver, gold)
    counts.stages["conflicting_region_labels_dropped"] = conflicts
    gold_subjects = readers.gold_subjects(paths.gold_file) if paths.gold_file else set()

    hourly = _load_ehr(paths, stays, chunk_bytes, counts)
    splits = rules_mod.assign_splits(stays["subject_id"].tolist(), gold_subjects, seed)
    hospitals = rules_mod.assign_hospitals(stays, num_hospitals, hospital_rule, seed)

    samples: dict[str, list[SampleSpec]] = {t: [] for t in vocab.TASKS}
    by_stay = {int(k): g for k, g in cxr.groupby("stay_id", sort=True)}
    for stay in stays.itertuples(index=False):
        group = by_stay[int(stay.stay_id)].sort_values("hours")
        common = _common_fields(stay, hourly[int(stay.stay_id)], splits, hospitals)
        samples["disease_progression"] += _progression_samples(
            stay, group, pair_labels, hourly[int(stay.stay_id)], common
        )
        for task in ("mortality", "length_of_stay"):
            spec = _icu_sample(task, stay, group, pair_labels, hourly[int(stay.stay_id)], common)
            if spec is not None:
                samples[task].append(spec)
    for task in vocab.TASKS:
        counts.add(f"samples_{task}", len(samples[task]))

    needed = sorted({d for specs in samples.values() for s in specs for d in s.dicom_ids})
    images = (
        cxr.drop_duplicates("dicom_id")
        .set_index("dicom_id")
        .loc[needed, ["path", "Rows", "Columns"]]
        .reset_index()
    )
    boxes = {d: graphs[d].boxes for d in needed}
    return PreparedCohort(
        samples,
        counts,
        images,
        boxes,
        extra={"gold_subjects_in_cohort": sorted(set(gold_subjects) & set(stays["subject_id"]))},
    )


def _load_ehr(
    paths: RawPaths, stays: pd.DataFrame, chunk_bytes: int, counts: rules_mod.CohortCounts
) -> dict[int, ehr_mod.HourlyEhr]:
    stay_ids = stays["stay_id"].tolist()
    chart_stats, out_stats = ehr_mod.StreamStats(), ehr_mod.StreamStats()
    chart = ehr_mod.stream_events(
        readers.find_table(paths.mimic_iv, ["icu/chartevents.csv"]),
        stay_ids,
        ehr_mod.CHART_ITEMIDS,
        block_size=chunk_bytes,
        stats=chart_stats,
    )
    output = ehr_mod.stream_events(
        readers.find_table(paths.mimic_iv, ["icu/outputevents.csv"]),
        stay_ids,
        (ehr_mod.URINE_ITEMID,),
        block_size=chunk_bytes,
        stats=out_stats,
    )
    counts.add("chartevents_rows_read", chart_stats.rows_read)
    counts.add("chartevents_rows_kept", chart_stats.rows_kept)
    counts.add("outputevents_rows_kept", out_stats.rows_kept)
    events = ehr_mod.to_variables(pd.concat([chart, output], ignore_index=True))
    return ehr_mod.hourly_ehr(events, stays[["stay_id", "intime", "outtime"]])


def _common_fields(
    stay: Any, hourly: ehr_mod.HourlyEhr, splits: dict[int, str], hospitals: dict[int, int]
) -> dict[str, Any]:
    demo = demographic_vector(
        float(stay.age),
        ehr_mod.first_observed(hourly, "Height"),
        ehr_mod.first_observed(hourly, "Weight"),
        stay.gender,
        stay.race,
        stay.language,
        stay.marital_status,
    )
    return {
        "subject_id": int(stay.subject_id),
        "stay_id": int(stay.stay_id),
        "hospital": hospitals[int(stay.subject_id)],
        "split": splits[int(stay.subject_id)],
        "demographics": demo,
    }


def _ehr_window(hourly: ehr_mod.HourlyEhr, start: int, stop: int) -> dict[str, np.ndarray]:
    stop = min(stop, hourly.values.shape[0])
    start = min(max(start, 0), stop)
    return {
        "ehr_times": np.arange(start + 1, stop + 1, dtype=np.float32),
        "ehr_values": hourly.values[start:stop],
        "ehr_observed": hourly.observed[start:stop],
    }


def _pair_labels(dicoms: list[str], pair_labels: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
    out = np.full(
        (len(dicoms) - 1, vocab.NUM_REGIONS, vocab.NUM_FINDINGS), vocab.NOT_MENTIONED, np.int8
    )
    for i in range(len(dicoms) - 1):
        labels = pair_labels.get((dicoms[i + 1], dicoms[i]))
        if labels is not None:
            out[i] = labels
    return out


def _progression_samples(
    stay: Any,
    group: pd.DataFrame,
    pair_labels: dict[tuple[str, str], np.ndarray],
    hourly: ehr_mod.HourlyEhr,
    common: dict[str, Any],
) -> list[SampleSpec]:
    dicoms, hours = group["dicom_id"].tolist(), group["hours"].tolist()
    studies = group["study_id"].to_numpy(np.int64)
    out = []
    for i in range(len(dicoms) - 1):
        labels = pair_labels.get((dicoms[i + 1], dicoms[i]))
        if labels is None:
            continue
        record = {
            **common,
            "sample_id": f"disease_progression-{int(stay.stay_id)}-{i:02d}",
            "task": "disease_progression",
            "cxr_times": np.array([hours[i], hours[i + 1]], np.float32),
            **_ehr_window(hourly, math.floor(hours[i]), math.floor(hours[i + 1])),
            "region_labels": labels[None],
            "progression": finding_labels(labels),
            "mortality": None,
            "los_days": None,
            "dicom_ids": np.array(dicoms[i : i + 2]),
            "study_ids": studies[i : i + 2],
        }
        out.append(SampleSpec(record, [dicoms[i], dicoms[i + 1]]))
    return out


def _icu_sample(
    task: str,
    stay: Any,
    group: pd.DataFrame,
    pair_labels: dict[tuple[str, str], np.ndarray],
    hourly: ehr_mod.HourlyEhr,
    common: dict[str, Any],
) -> SampleSpec | None:
    early = group[group["hours"] < ICU_WINDOW_HOURS]
    if len(early) < 2:
        return None
    dicoms = early["dicom_id"].tolist()
    record = {
        **common,
        "sample_id": f"{task}-{int(stay.stay_id)}",
        "task": task,
        "cxr_times": early["hours"].to_numpy(np.float32),
        **_ehr_window(hourly, 0, ICU_WINDOW_HOURS),
        "region_labels": _pair_labels(dicoms, pair_labels),
        "progression": None,
        "mortality": in_hospital_death(stay.admittime, stay.dischtime, stay.deathtime),
        "los_days": float(stay.los),
        "dicom_ids": np.array(dicoms),
        "study_ids": early["study_id"].to_numpy(np.int64),
    }
    return SampleSpec(record, dicoms)

"""The paper's cohort rules: ICU stays, CXR-to-stay alignment, stay filters, splits, hospitals.

Order of the filters (each stage's count goes to ``CohortCounts``):

ICU stays
  1. ``icustays``                    every row of icustays
  2. ``same_careunit``               first_careunit == last_careunit
  3. ``single_stay_admission``       the admission has exactly one ICU stay (in all of icustays)
  4. ``adult``                       age at admission >= 18 (anchor_age + admission year -
                                     anchor_year)
  5. ``los_over_48h``                los > 2 days
  6. ``los_within_iqr_fences``       Q1 - 1.5 IQR <= los <= Q3 + 1.5 IQR, quartiles of stage 5
CXRs
  7. ``cxr_images``                  every metadata row
  8. ``cxr_ap``                      ViewPosition == "AP"
  9. ``cxr_latest_per_study_view``   the latest image per (subject, study, view)
 10. ``cxr_in_stay``                 StudyDate+StudyTime in [intime, outtime] of a stage-6 stay
 11. ``cxr_with_files``              its JPEG and its scene graph exist (missing ids are listed)
 12. ``cxr_after_8h_thinning``       drop a CXR taken < 8 h after the previous kept one
Stays
 13. ``stays_with_cxr``              stays with at least one kept CXR
 14. ``stays_no_96h_gap``            no gap of 96 h or more between consecutive kept CXRs
 15. ``stays_2_to_14_cxr``           2..14 kept CXRs
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

HOUR = pd.Timedelta(hours=1)


@dataclass
class CohortCounts:
    """Counts at every filter stage, in order, plus the ids of skipped inputs."""

    stages: dict[str, int] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    missing_scene_graphs: list[str] = field(default_factory=list)

    def add(self, stage: str, count: int) -> None:
        self.stages[stage] = int(count)
        log.info("cohort %-28s %d", stage, count)


@dataclass(frozen=True)
class CohortRules:
    """The numbers of the cohort rules (the paper's values by default)."""

    min_age: int = 18
    min_los_hours: float = 48.0
    iqr_factor: float = 1.5
    view: str = "AP"
    min_gap_hours: float = 8.0
    max_gap_hours: float = 96.0
    min_cxr: int = 2
    max_cxr: int = 14


def select_stays(
    icustays: pd.DataFrame,
    admissions: pd.DataFrame,
    patients: pd.DataFrame,
    rules: CohortRules,
    counts: CohortCounts,
) -> pd.DataFrame:
    """ICU stays of stages 1-6, joined with their admission and patient rows."""
    stays = icustays
    counts.add("icustays", len(stays))
    stays = stays[stays["first_careunit"] == stays["last_careunit"]]
    counts.add("same_careunit", len(stays))
    per_admission = icustays.groupby("hadm_id")["stay_id"].nunique()
    single = per_admission[per_admission == 1].index
    stays = stays[stays["hadm_id"].isin(single)]
    counts.add("single_stay_admission", len(stays))
    stays = stays.merge(admissions.drop(columns=["subject_id"]), on="hadm_id", how="inner")
    stays = stays.merge(patients, on="subject_id", how="inner")
    stays = stays.assign(
        age=stays["anchor_age"] + stays["admittime"].dt.year - stays["anchor_year"]
    )
    stays = stays[stays["age"] >= rules.min_age]
    counts.add("adult", len(stays))
    stays = stays[stays["los"] * 24.0 > rules.min_los_hours]
    counts.add("los_over_48h", len(stays))
    if len(stays):
        q1, q3 = np.percentile(stays["los"].to_numpy(), [25, 75])
        low, high = q1 - rules.iqr_factor * (q3 - q1), q3 + rules.iqr_factor * (q3 - q1)
        stays = stays[(stays["los"] >= low) & (stays["los"] <= high)]
    counts.add("los_within_iqr_fences", len(stays))
    return stays.sort_values("stay_id").reset_index(drop=True)


def align_cxrs(
    metadata: pd.DataFrame,
    stays: pd.DataFrame,
    rules: CohortRules,
    counts: CohortCounts,
) -> pd.DataFrame:
    """CXRs of stages 7-10: one row per (stay, image) with ``hours`` since intime."""
    counts.add("cxr_images", len(metadata))
    cxr = metadata[metadata["ViewPosition"].str.strip() == rules.view]
    counts.add("cxr_ap", len(cxr))
    cxr = cxr.sort_values(
        ["subject_id", "study_id", "ViewPosition", "study_datetime", "dicom_id"], kind="stable"
    )
    cxr = cxr.drop_duplicates(["subject_id", "study_id", "ViewPosition"], keep="last")
    counts.add("cxr_latest_per_study_view", len(cxr))
    joined = cxr.merge(stays[["subject_id", "stay_id", "intime", "outtime"]], on="subject_id")
    inside = (joined["study_datetime"] >= joined["intime"]) & (
        joined["study_datetime"] <= joined["outtime"]
    )
    joined = joined[inside]
    joined = joined.assign(hours=(joined["study_datetime"] - joined["intime"]) / HOUR)
    counts.add("cxr_in_stay", len(joined))
    return joined.sort_values(["stay_id", "hours", "dicom_id"]).reset_index(drop=True)


def drop_missing_files(
    cxr: pd.DataFrame,
    has_image: Callable[[pd.Series], bool],
    has_scene_graph: Callable[[pd.Series], bool],
    counts: CohortCounts,
) -> pd.DataFrame:
    """Stage 11: skip CXRs whose JPEG or scene graph is absent, recording their dicom ids."""
    checks = (
        ("image", has_image, counts.missing_images),
        ("scene graph", has_scene_graph, counts.missing_scene_graphs),
    )
    keep = []
    for _, row in cxr.iterrows():
        ok = True
        for what, present, missing in checks:
            if not present(row):
                log.warning(
                    "missing %s for dicom_id=%s (stay_id=%s): skipped",
                    what,
                    row["dicom_id"],
                    row["stay_id"],
                )
                missing.append(str(row["dicom_id"]))
                ok = False
        keep.append(ok)
    counts.missing_images = sorted(set(counts.missing_images))
    counts.missing_scene_graphs = sorted(set(counts.missing_scene_graphs))
    out = cxr[np.array(keep, dtype=bool)] if len(cxr) else cxr
    counts.add("cxr_with_files", len(out))
    return out


def thin_and_filter_stays(
    cxr: pd.DataFrame,
    rules: CohortRules,
    counts: CohortCounts,
) -> pd.DataFrame:
    """Stages 12-15: 8-hour thinning per stay, then the 96-hour gap and the 2..14 count rules."""
    kept_rows = []
    for _, group in cxr.groupby("stay_id", sort=True):
        last = None
        for idx, hours in zip(group.index, group["hours"], strict=True):
            if last is None or hours - last >= rules.min_gap_hours:
                kept_rows.append(idx)
                last = hours
    thinned = cxr.loc[kept_rows]
    counts.add("cxr_after_8h_thinning", len(thinned))
    counts.add("stays_with_cxr", thinned["stay_id"].nunique())
    gaps = thinned.groupby("stay_id")["hours"].apply(
        lambda h: float(np.max(np.diff(h.to_numpy()), initial=0.0))
    )
    ok_gap = gaps[gaps < rules.max_gap_hours].index
    thinned = thinned[thinned["stay_id"].isin(ok_gap)]
    counts.add("stays_no_96h_gap", thinned["stay_id"].nunique())
    sizes = thinned.groupby("stay_id")["dicom_id"].size()
    ok_size = sizes[(sizes >= rules.min_cxr) & (sizes <= rules.max_cxr)].index
    thinned = thinned[thinned["stay_id"].isin(ok_size)]
    counts.add("stays_2_to_14_cxr", thinned["stay_id"].nunique())
    return thinned.reset_index(drop=True)


def assign_splits(
    subjects: list[int],
    gold_subjects: set[int],
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> dict[int, str]:
    """Split patients 70/10/20: gold-comparison patients go to test, the rest fill the quotas.

    Quotas are of all patients: test gets round(0.2 N) minus the gold patients (at least 0),
    val round(0.1 N), train the rest. The non-gold patients are ordered by a seeded permutation.
    """
    subjects = sorted(set(subjects))
    n = len(subjects)
    gold = [s for s in subjects if s in gold_subjects]
    rest = [s for s in subjects if s not in gold_subjects]
    order = np.random.default_rng(seed).permutation(len(rest))
    rest = [rest[i] for i in order]
    n_test = max(0, round(fractions[2] * n) - len(gold))
    n_val = min(round(fractions[1] * n), len(rest) - n_test) if rest else 0
    split = dict.fromkeys(gold, "test")
    for i, s in enumerate(rest):
        split[s] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def assign_hospitals(
    stays: pd.DataFrame,
    num_hospitals: int,
    rule: str,
    seed: int,
) -> dict[int, int]:
    """Federated site per patient, never splitting a patient.

    - ``hash``: sha256 of ``"{seed}:{subject_id}"`` modulo ``num_hospitals``.
    - ``careunit``: the care units (first_careunit) sorted by name are dealt to the sites
      round-robin; a patient goes to the site of the care unit of their earliest stay.
    """
    if num_hospitals < 1:
        raise ValueError(f"num_hospitals must be >= 1, got {num_hospitals}")
    out: dict[int, int] = {}
    if rule == "hash":
        for subject in sorted(stays["subject_id"].unique()):
            digest = hashlib.sha256(f"{seed}:{int(subject)}".encode()).digest()
            out[int(subject)] = int.from_bytes(digest[:8], "big") % num_hospitals
        return out
    if rule == "careunit":
        units = sorted(stays["first_careunit"].astype(str).unique())
        site = {u: i % num_hospitals for i, u in enumerate(units)}
        first = stays.sort_values(["subject_id", "intime", "stay_id"]).drop_duplicates("subject_id")
        for row in first.itertuples(index=False):
            out[int(row.subject_id)] = site[str(row.first_careunit)]
        return out
    raise ValueError(f"unknown hospital rule {rule!r}; expected 'hash' or 'careunit'")

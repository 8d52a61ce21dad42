"""Cohort rules, labels, splits and hospitals on the fabricated raw tree (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dipro import vocab
from dipro.data.mimic.build import PreparedCohort, RawPaths, prepare_samples
from dipro.data.mimic.cohort import CohortRules, assign_hospitals, assign_splits
from dipro.data.mimic.fixture_tree import EXPECTED_COUNTS
from dipro.data.mimic.labels import finding_labels


@pytest.fixture(scope="module")
def prepared(raw_tree) -> PreparedCohort:
    paths = RawPaths(
        raw_tree.mimic_iv, raw_tree.mimic_cxr, raw_tree.scene_graph_dir, raw_tree.gold_file
    )
    return prepare_samples(paths, CohortRules(), seed=23, num_hospitals=2, hospital_rule="hash")


def _specs(prepared: PreparedCohort, task: str):
    return prepared.samples[task]


def test_counts_at_every_stage(prepared) -> None:
    stages = prepared.counts.stages
    assert {k: stages[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert stages["chartevents_rows_kept"] < stages["chartevents_rows_read"]


def test_missing_image_and_scene_graph_are_reported_by_id_and_skipped(prepared, raw_tree) -> None:
    assert prepared.counts.missing_images == [raw_tree.missing_image]
    assert prepared.counts.missing_scene_graphs == [raw_tree.missing_scene_graph]
    used = {d for specs in prepared.samples.values() for s in specs for d in s.dicom_ids}
    assert raw_tree.missing_image not in used
    assert raw_tree.missing_scene_graph not in used


def test_stay_with_a_96h_gap_is_dropped(prepared, raw_tree) -> None:
    stays = {s.record["stay_id"] for specs in prepared.samples.values() for s in specs}
    assert raw_tree.gap_stay not in stays


def test_cxr_within_8h_of_previous_kept_is_dropped(prepared, raw_tree) -> None:
    used = {d for specs in prepared.samples.values() for s in specs for d in s.dicom_ids}
    assert raw_tree.thinned not in used
    for specs in prepared.samples.values():
        for s in specs:
            assert np.all(np.diff(s.record["cxr_times"]) >= 8.0)


def test_gold_label_overrides_silver(prepared, raw_tree) -> None:
    (spec,) = [
        s
        for s in _specs(prepared, "disease_progression")
        if tuple(s.dicom_ids[::-1]) == raw_tree.gold_pair
    ]
    region, finding, code = raw_tree.gold_label
    r, k = vocab.REGIONS.index(region), vocab.FINDINGS.index(finding)
    assert raw_tree.silver_label_of_gold_pair[2] != code  # silver said otherwise
    assert spec.record["region_labels"][0, r, k] == code
    assert spec.record["progression"][k] == code
    # the pair's other silver labels are gone: gold replaces the whole pair
    assert np.count_nonzero(spec.record["region_labels"] != vocab.NOT_MENTIONED) == 1


def test_conflicting_region_comparison_is_dropped(prepared, raw_tree) -> None:
    (spec,) = [
        s
        for s in _specs(prepared, "disease_progression")
        if tuple(s.dicom_ids[::-1]) == raw_tree.conflict_pair
    ]
    region, finding = raw_tree.conflict_label
    labels = spec.record["region_labels"][0]
    assert labels[vocab.REGIONS.index(region), vocab.FINDINGS.index(finding)] == vocab.NOT_MENTIONED
    cs, ecs = (
        vocab.REGIONS.index("cardiac silhouette"),
        vocab.FINDINGS.index("enlarged cardiac silhouette"),
    )
    assert labels[cs, ecs] == vocab.NO_CHANGE
    assert prepared.counts.stages["conflicting_region_labels_dropped"] >= 1


def test_icu_samples_use_cxrs_and_ehr_of_the_first_48h(prepared) -> None:
    for s in _specs(prepared, "mortality"):
        rec = s.record
        assert rec["cxr_times"].size >= 2 and np.all(rec["cxr_times"] < 48)
        assert rec["ehr_times"].tolist() == list(range(1, 49))
        assert rec["region_labels"].shape == (
            rec["cxr_times"].size - 1,
            vocab.NUM_REGIONS,
            vocab.NUM_FINDINGS,
        )
    deaths = sorted(s.record["mortality"] for s in _specs(prepared, "mortality"))
    assert deaths == [0, 0, 0, 0, 0, 1, 1]  # R1, R4 die in hospital; R2 dies after discharge


def test_progression_ehr_lies_between_the_two_cxrs(prepared) -> None:
    for s in _specs(prepared, "disease_progression"):
        t0, t1 = s.record["cxr_times"]
        times = s.record["ehr_times"]
        assert times.size > 0 and times[0] > t0 - 1e-6 and times[-1] <= t1 + 1e-6


def test_splits_by_patient_with_gold_patients_in_test(prepared) -> None:
    split_of: dict[int, set[str]] = {}
    hospital_of: dict[int, set[int]] = {}
    for specs in prepared.samples.values():
        for s in specs:
            split_of.setdefault(s.record["subject_id"], set()).add(s.record["split"])
            hospital_of.setdefault(s.record["subject_id"], set()).add(s.record["hospital"])
    assert all(len(v) == 1 for v in split_of.values())
    assert all(len(v) == 1 for v in hospital_of.values())
    for subject in prepared.extra["gold_subjects_in_cohort"]:
        assert split_of[subject] == {"test"}


def test_assign_splits_quota_and_determinism() -> None:
    subjects = list(range(100, 200))
    a = assign_splits(subjects, {100, 101}, seed=5)
    assert a == assign_splits(subjects, {100, 101}, seed=5)
    counts = pd.Series(a).value_counts().to_dict()
    assert counts == {"train": 70, "val": 10, "test": 20}
    assert a[100] == a[101] == "test"


def test_careunit_hospitals_keep_a_patient_on_one_site() -> None:
    stays = pd.DataFrame(
        {
            "subject_id": [1, 1, 2, 3],
            "stay_id": [10, 11, 12, 13],
            "intime": pd.to_datetime(["2150-01-01", "2150-02-01", "2150-01-01", "2150-01-01"]),
            "first_careunit": ["MICU", "SICU", "SICU", "CVICU"],
        }
    )
    sites = assign_hospitals(stays, 2, "careunit", seed=0)
    assert sites == {1: 1, 2: 0, 3: 0}  # sorted units CVICU, MICU, SICU -> 0, 1, 0
    with pytest.raises(ValueError, match="hospital rule"):
        assign_hospitals(stays, 2, "random", seed=0)


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([3, 3], vocab.NOT_MENTIONED),
        ([0, 2], vocab.WORSENED),
        ([1, 3], vocab.IMPROVED),
        ([2, 2], vocab.NO_CHANGE),
        ([0, 1], vocab.NOT_MENTIONED),
    ],
)
def test_finding_label_rule(codes: list[int], expected: int) -> None:
    region = np.full((vocab.NUM_REGIONS, vocab.NUM_FINDINGS), vocab.NOT_MENTIONED, np.int8)
    region[: len(codes), 0] = codes
    assert finding_labels(region)[0] == expected

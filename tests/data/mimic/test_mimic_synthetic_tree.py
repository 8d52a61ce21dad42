"""The synthetic cohort written as a raw MIMIC tree and read back by the real preprocessing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dipro import vocab
from dipro.data.mimic.build import PreparedCohort, RawPaths, prepare_samples
from dipro.data.mimic.cohort import CohortRules
from dipro.data.mimic.cohort_tree import write_cohort_raw_tree
from dipro.data.mimic.raw_tree import RawTree
from dipro.data.mimic.readers import image_path, read_cxr_metadata
from dipro.data.synthetic import Cohort, SyntheticConfig, simulate_cohort


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, RawTree, PreparedCohort]:
    cohort = simulate_cohort(SyntheticConfig(num_patients=12, image_size=64, seed=3))
    tree = write_cohort_raw_tree(cohort, tmp_path_factory.mktemp("synthetic_raw"))
    paths = RawPaths(tree.mimic_iv, tree.mimic_cxr, tree.scene_graph_dir, tree.gold_file)
    prepared = prepare_samples(
        paths,
        CohortRules(),
        seed=0,
        num_hospitals=cohort.config.num_hospitals,
        hospital_rule="careunit",
    )
    return cohort, tree, prepared


def test_most_stays_survive_the_cohort_rules(written) -> None:
    cohort, _, prepared = written
    assert prepared.counts.stages["icustays"] == cohort.num_patients
    assert len(prepared.samples["mortality"]) >= 0.75 * cohort.num_patients


def test_icu_samples_read_back_the_cohort(written) -> None:
    cohort, _, prepared = written
    index = {int(s): i for i, s in enumerate(cohort.stay_id)}
    n_num = len(vocab.NUMERIC_DEMOGRAPHICS)
    for spec in prepared.samples["mortality"]:
        rec, i = spec.record, index[spec.record["stay_id"]]
        times = cohort.cxr_times[cohort.cxr_slice(i)]
        np.testing.assert_allclose(rec["cxr_times"], times[times < 48], atol=1e-3)
        observed = cohort.ehr_observed[i, :48]
        np.testing.assert_array_equal(rec["ehr_observed"], observed)
        np.testing.assert_allclose(
            rec["ehr_values"][observed], cohort.ehr_values[i, :48][observed], rtol=1e-3, atol=1e-3
        )
        assert rec["mortality"] == cohort.mortality[i]
        assert rec["los_days"] == pytest.approx(float(cohort.los_days[i]), abs=1e-4)
        assert rec["hospital"] == cohort.hospital[i]  # care unit i -> site i
        np.testing.assert_array_equal(rec["demographics"][n_num:], cohort.demographics[i, n_num:])


def test_progression_labels_read_back_the_cohort(written) -> None:
    cohort, _, prepared = written
    index = {int(s): i for i, s in enumerate(cohort.stay_id)}
    assert prepared.samples["disease_progression"]
    for spec in prepared.samples["disease_progression"]:
        rec = spec.record
        cxrs = cohort.cxr_slice(index[rec["stay_id"]])
        first = cxrs.start + int(np.argmin(np.abs(cohort.cxr_times[cxrs] - rec["cxr_times"][0])))
        (pair,) = np.nonzero(cohort.pair_first == first)[0]
        np.testing.assert_array_equal(rec["region_labels"][0], cohort.pair_region_labels[pair])
        mine = rec["progression"]
        stated = mine != vocab.NOT_MENTIONED  # the cohort resolves mixed regions differently
        np.testing.assert_array_equal(mine[stated], cohort.pair_progression[pair][stated])


def test_the_real_radiograph_is_one_of_the_images(written) -> None:
    _, tree, _ = written
    meta = read_cxr_metadata(tree.mimic_cxr).set_index("dicom_id").loc[tree.real_cxr]
    path: Path = image_path(tree.mimic_cxr, meta["subject_id"], meta["study_id"], tree.real_cxr)
    with Image.open(path) as img:
        assert img.size == (1841, 1955)


def test_samples_name_the_cohorts_images_in_the_tree(written) -> None:
    from dipro.data.synthetic import cxr_identifiers

    cohort, tree, prepared = written
    dicom_ids, study_ids = cxr_identifiers(cohort)
    study_of = dict(zip(dicom_ids, study_ids, strict=True))
    for task, specs in prepared.samples.items():
        assert specs, task
        for spec in specs:
            rec = spec.record
            assert list(rec["dicom_ids"]) == spec.dicom_ids
            assert len(rec["dicom_ids"]) == len(rec["cxr_times"]) == len(rec["study_ids"])
            for dicom, study in zip(rec["dicom_ids"], rec["study_ids"], strict=True):
                assert study_of[dicom] == study
                assert image_path(tree.mimic_cxr, rec["subject_id"], study, dicom).is_file()


def test_the_same_cohort_writes_the_same_bytes(written, tmp_path) -> None:
    """A raw tree is reproducible to the byte (its gzip headers carry no write time), so a
    tree written again can be compared by checksum."""
    cohort, tree, _ = written
    time.sleep(1.1)  # a gzip header's time has a resolution of one second
    again = write_cohort_raw_tree(cohort, tmp_path)

    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    first_root, second_root = tree.root, again.root
    assert files(first_root) == files(second_root)
    assert any(str(f).endswith(".csv.gz") for f in files(first_root))
    assert all(
        (first_root / f).read_bytes() == (second_root / f).read_bytes() for f in files(first_root)
    )

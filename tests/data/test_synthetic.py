"""The synthetic cohort: determinism, splits, structure, label balance and where the signal is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dipro import vocab
from dipro.data.layout import format_counts, list_shards, read_manifest
from dipro.data.shard_reader import read_table
from dipro.data.synthetic import (
    AFFINITY,
    Cohort,
    SyntheticConfig,
    cohort_records,
    ensure_synthetic_data,
    simulate_cohort,
    write_synthetic_dataset,
)


def _read_task(root: Path, task: str) -> dict[str, list]:
    paths = [p for split in vocab.SPLITS for p in list_shards(root, task, split)]
    return read_table(paths).to_pydict()


def test_config_rejects_bad_values_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="min_cxrs"):
        SyntheticConfig(min_cxrs=1)
    with pytest.raises(ValueError, match="split_fractions"):
        SyntheticConfig(split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="num_patient"):
        SyntheticConfig.from_dict({"num_patient": 3})
    cfg = SyntheticConfig.from_dict({"seed": 3, "split_fractions": [0.6, 0.2, 0.2]})
    assert SyntheticConfig.from_dict(cfg.to_dict()) == cfg


def test_same_seed_gives_identical_shards_and_another_seed_does_not(tmp_path: Path) -> None:
    cfg = SyntheticConfig(seed=11, num_patients=12, image_size=48, crop_size=8)
    first = write_synthetic_dataset(cfg, tmp_path / "a")
    again = write_synthetic_dataset(cfg, tmp_path / "b")
    other = write_synthetic_dataset(
        SyntheticConfig(seed=12, num_patients=12, image_size=48, crop_size=8), tmp_path / "c"
    )
    for task in vocab.TASKS:
        assert first[task].files == again[task].files
        assert first[task].files
        assert set(first[task].files.values()).isdisjoint(other[task].files.values())


def test_no_subject_in_two_splits(tiny_dataset: Path) -> None:
    for task in vocab.TASKS:
        columns = _read_task(tiny_dataset, task)
        splits_of: dict[int, set[str]] = {}
        for subject, split in zip(columns["subject_id"], columns["split"], strict=True):
            splits_of.setdefault(subject, set()).add(split)
        assert all(len(s) == 1 for s in splits_of.values())
        assert {s for v in splits_of.values() for s in v} == set(vocab.SPLITS)


def test_split_fractions_hold_per_hospital() -> None:
    cohort = simulate_cohort(SyntheticConfig(seed=1, num_patients=200, image_size=32, crop_size=4))
    for h in range(cohort.config.num_hospitals):
        splits = cohort.split[cohort.hospital == h]
        assert abs(np.mean(splits == "train") - 0.7) < 0.03
        assert abs(np.mean(splits == "test") - 0.2) < 0.03


def test_stays_follow_the_cohort_rules(tiny_cohort: Cohort) -> None:
    c, cfg = tiny_cohort, tiny_cohort.config
    assert np.all((c.los_days >= 2.0) & (c.los_days < 11.0))
    for i in range(c.num_patients):
        times = c.cxr_times[c.cxr_slice(i)]
        assert cfg.min_cxrs <= times.size <= cfg.max_cxrs
        assert np.all(np.diff(times) >= cfg.min_gap_hours - 0.01)
        assert (times < cfg.icu_window_hours).sum() >= 2
        assert times[-1] < c.los_days[i] * 24.0
    assert c.images.shape[1:] == (cfg.image_size, cfg.image_size)
    assert c.crops.shape[1:] == (vocab.NUM_REGIONS, cfg.crop_size, cfg.crop_size)
    assert np.all(c.crops[~c.region_present] == 0)
    assert np.all((c.boxes[..., 2] > c.boxes[..., 0]) & (c.boxes[..., 3] > c.boxes[..., 1]))
    # Labels only where the finding can appear in the region.
    assert np.all(c.pair_region_labels[:, ~AFFINITY] == vocab.NOT_MENTIONED)


def test_task_samples_have_the_task_shapes(tiny_cohort: Cohort) -> None:
    window = tiny_cohort.config.icu_window_hours
    pairs = list(cohort_records(tiny_cohort, "disease_progression"))
    assert len(pairs) == tiny_cohort.pair_first.size
    for rec in pairs:
        t0, t1 = rec["cxr_times"]
        assert rec["crops"].shape[0] == 2 and rec["region_labels"].shape[0] == 1
        assert rec["ehr_times"].size >= 8
        assert rec["ehr_times"][0] >= t0 and rec["ehr_times"][-1] <= t1
        assert rec["ehr_values"].shape == (rec["ehr_times"].size, vocab.NUM_EHR)
    stays = list(cohort_records(tiny_cohort, "mortality"))
    assert len(stays) == tiny_cohort.num_patients
    for rec in stays:
        T = rec["cxr_times"].size
        assert T >= 2 and np.all(rec["cxr_times"] < window)
        assert rec["region_labels"].shape == (T - 1, vocab.NUM_REGIONS, vocab.NUM_FINDINGS)
        assert rec["ehr_values"].shape == (window, vocab.NUM_EHR)
        assert rec["demographics"].shape == (vocab.NUM_DEMOGRAPHICS,)


def test_ehr_missingness_is_realistic(tiny_cohort: Cohort) -> None:
    observed = tiny_cohort.ehr_observed[:, :48]
    rate = observed.mean(axis=(0, 1))
    heart_rate = vocab.EHR_VARIABLES.index("Heart Rate")
    sodium = vocab.EHR_VARIABLES.index("Sodium")
    assert rate[heart_rate] > 0.85  # vitals nearly every hour
    assert 0.03 < rate[sodium] < 0.35  # labs every few hours
    never = ~tiny_cohort.ehr_observed.any(axis=1)  # [N, V]
    assert never.any()  # some variables are never measured for some stays
    # Forward fill: an unobserved hour repeats the previous hour's value.
    v, o = tiny_cohort.ehr_values[:, :48, sodium], observed[:, :, sodium]
    assert np.all((v[:, 1:] == v[:, :-1])[~o[:, 1:]])
    assert np.all(np.isfinite(tiny_cohort.ehr_values))


def test_hospitals_differ() -> None:
    cohort = simulate_cohort(SyntheticConfig(seed=2, num_patients=150, image_size=48, crop_size=8))
    brightness = [cohort.images[cohort.hospital[cohort.cxr_subject] == h].mean() for h in range(3)]
    severity = [cohort.severity[cohort.hospital == h, :48].mean() for h in range(3)]
    assert np.ptp(brightness) > 5.0
    assert np.ptp(severity) > 0.4


def test_progression_labels_are_balanced(tmp_path: Path) -> None:
    write_synthetic_dataset(
        SyntheticConfig(seed=3, num_patients=200, image_size=32, crop_size=4),
        tmp_path,
        tasks=("disease_progression", "length_of_stay"),
    )
    counts = read_manifest(tmp_path, "disease_progression").label_counts().progression
    share = counts / counts.sum(1, keepdims=True)
    assert np.all(share > 0.1), share  # every class of every finding is present
    los = read_manifest(tmp_path, "length_of_stay").label_counts().los
    assert np.all(los / los.sum() > 0.1), los


@pytest.fixture(scope="module")
def signal_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signal")
    write_synthetic_dataset(
        SyntheticConfig(seed=0, num_patients=240, image_size=64, crop_size=16),
        root,
        tasks=("disease_progression", "mortality"),
    )
    return root


def _cv_auroc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """AUROC of a logistic regression on standardised ``features``, 5-fold cross-validated by
    patient."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    scores = cross_val_predict(
        model, features, labels, groups=groups, cv=GroupKFold(5), method="predict_proba"
    )[:, 1]
    return roc_auc_score(labels, scores)


def test_progression_is_in_the_change_between_crops_and_the_interval_ehr_not_in_one_crop(
    signal_dataset: Path,
) -> None:
    """The paper's premises as measurements on the shards the model reads, per finding and
    region (the region-level labels), worsened against improved: the region's crop of the later
    CXR alone is near chance (a static per-patient level dominates one image), the change between
    the two CXRs is well above it, and the EHR of the interval adds to the pair (it follows the
    severity that drives part of the change)."""
    cols = _read_task(signal_dataset, "disease_progression")
    S, R, V = cols["crop_size"][0], vocab.NUM_REGIONS, vocab.NUM_EHR
    crops = np.stack([np.frombuffer(b, np.uint8).reshape(2, R, S * S) for b in cols["crops"]])
    crops = crops.astype(np.float32) / 255.0  # [n, 2, R, S*S]
    ehr = [np.asarray(v, np.float32).reshape(-1, V) for v in cols["ehr_values"]]
    interval = np.stack([h[-6:].mean(0) - h[:6].mean(0) for h in ehr])  # [n, V]
    labels = np.stack([np.asarray(v).reshape(R, -1) for v in cols["region_labels"]])  # [n, R, K]
    subjects = np.array(cols["subject_id"])
    score: dict[str, list[float]] = {"later": [], "pair": [], "pair + EHR": []}
    for k in range(vocab.NUM_FINDINGS):
        sample, region = np.nonzero(np.isin(labels[:, :, k], (vocab.WORSENED, vocab.IMPROVED)))
        y = (labels[sample, region, k] == vocab.WORSENED).astype(int)
        where = np.eye(R)[region]
        later = crops[sample, 1, region]
        change = later - crops[sample, 0, region]
        features = {
            "later": np.concatenate([later, where], axis=1),
            "pair": np.concatenate([change, where], axis=1),
            "pair + EHR": np.concatenate([change, interval[sample], where], axis=1),
        }
        for name, x in features.items():
            score[name].append(_cv_auroc(x, y, subjects[sample]))
    mean = {name: float(np.mean(v)) for name, v in score.items()}
    assert mean["later"] < 0.62, mean
    assert mean["pair"] > 0.70 and mean["pair"] > mean["later"] + 0.12, mean
    assert mean["pair + EHR"] > mean["pair"] + 0.015, mean


def _region_change_auroc(box_jitter: float) -> float:
    """Mean over regions of the AUROC with which the size of a region's crop change (block means
    of the difference, less what all regions share) separates changed from unchanged regions."""
    cohort = simulate_cohort(
        SyntheticConfig(
            seed=0,
            num_patients=120,
            image_size=64,
            crop_size=16,
            box_jitter=box_jitter,
            missing_box_rate=0.0,
        )
    )
    first = cohort.pair_first
    crops = cohort.crops.astype(np.float32) / 255.0
    diff = crops[first + 1] - crops[first]  # [Q, R, S, S]
    Q, R, S = diff.shape[0], diff.shape[1], diff.shape[-1]
    blocks = diff.reshape(Q, R, 4, S // 4, 4, S // 4).mean(axis=(3, 5)).reshape(Q, R, 16)
    size = np.abs(blocks - blocks.mean(axis=1, keepdims=True)).mean(axis=-1)  # [Q, R]
    labels = cohort.pair_region_labels
    mentioned = (labels < vocab.NOT_MENTIONED).any(-1)
    changed = np.isin(labels, (vocab.WORSENED, vocab.IMPROVED)).any(-1)
    return float(
        np.mean(
            [roc_auc_score(changed[mentioned[:, r], r], size[mentioned[:, r], r]) for r in range(R)]
        )
    )


def test_where_a_change_happened_shows_in_that_region_when_the_crops_are_registered() -> None:
    """Region attention has something to find: with the two CXRs' boxes in register, the size of
    a region's crop change tells the regions that changed from those that did not (a finding
    changes in episodes local to one region). The default per-image box jitter (1% of the
    image side) hides it from this probe: the static anatomy and the findings' static levels
    shift under the crop, which is what a model has to see past."""
    assert _region_change_auroc(0.0) > 0.72
    assert _region_change_auroc(SyntheticConfig().box_jitter) < 0.6


def test_one_cxr_shows_how_sick_the_patient_is(signal_dataset: Path) -> None:
    """The ICU samples' last CXR alone predicts mortality above chance (every image carries a
    little of the severity the patient arrived with), though it says nothing about a change."""
    cols = _read_task(signal_dataset, "mortality")
    S, R = cols["crop_size"][0], vocab.NUM_REGIONS
    last = np.stack([np.frombuffer(b, np.uint8).reshape(-1, R * S * S)[-1] for b in cols["crops"]])
    labels = np.array(cols["mortality"]).astype(int)
    auroc = _cv_auroc(last.astype(np.float32) / 255.0, labels, np.array(cols["subject_id"]))
    assert auroc > 0.62, auroc


def test_ehr_predicts_mortality(signal_dataset: Path) -> None:
    cols = _read_task(signal_dataset, "mortality")
    values = np.stack([np.asarray(v).reshape(-1, vocab.NUM_EHR) for v in cols["ehr_values"]])
    features = np.concatenate(
        [values.mean(1), values[:, -12:].mean(1) - values[:, :12].mean(1)], axis=1
    )
    labels = np.array(cols["mortality"])
    train = np.array(cols["split"]) != "test"
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    model.fit(features[train], labels[train])
    auroc = roc_auc_score(labels[~train], model.predict_proba(features[~train])[:, 1])
    assert 0.1 < labels.mean() < 0.5
    assert auroc > 0.75


def test_the_earlier_cxrs_show_outcome_risk_that_the_last_one_and_the_ehr_do_not() -> None:
    """The radiographic course: mortality from the true finding intensities of an ICU sample's
    CXRs and its 48 h of EHR, with every CXR of the window against the last one alone (the
    paper's "Long." against "Last"; scripts/cohort_probes.py prints the full table)."""
    cohort = simulate_cohort(SyntheticConfig(seed=1, num_patients=2000, image_size=32, crop_size=4))
    window = cohort.config.icu_window_hours
    first = cohort.cxr_offsets[:-1]
    last = first + np.add.reduceat(cohort.cxr_times < window, first) - 1
    ehr = cohort.ehr_values[:, :window].mean(axis=1)
    last_cxr = cohort.intensities[last][:, AFFINITY]
    every_cxr = np.concatenate([cohort.intensities[first][:, AFFINITY], last_cxr], axis=1)
    groups = np.arange(cohort.num_patients)
    mortality = cohort.mortality.astype(int)
    with_last = _cv_auroc(np.concatenate([last_cxr, ehr], axis=1), mortality, groups)
    with_all = _cv_auroc(np.concatenate([every_cxr, ehr], axis=1), mortality, groups)
    assert with_all - with_last > 0.03, (with_last, with_all)


def test_demo_data_is_reused_refused_when_stale_and_replaced_on_request(tmp_path: Path) -> None:
    generator = {"seed": 1, "num_patients": 8, "image_size": 32, "crop_size": 4}
    cfg = {"root": str(tmp_path), "generator": generator}
    assert ensure_synthetic_data(cfg).root == tmp_path
    files = read_manifest(tmp_path, "mortality").files
    assert ensure_synthetic_data(cfg).written == ()  # reused, not rewritten
    assert read_manifest(tmp_path, "mortality").files == files
    stale = {"root": str(tmp_path), "generator": {**generator, "seed": 2}}
    with pytest.raises(FileExistsError, match="overwrite"):
        ensure_synthetic_data(stale)
    ensure_synthetic_data({**stale, "overwrite": True})
    assert read_manifest(tmp_path, "mortality").generator["seed"] == 2
    text = format_counts({t: read_manifest(tmp_path, t) for t in vocab.TASKS})
    assert "disease_progression" in text and "length_of_stay" in text


def test_hydra_data_config_matches_the_defaults() -> None:
    """configs/data/synthetic.yaml spells out the SyntheticConfig defaults, not other values."""
    path = Path(__file__).resolve().parents[2] / "configs" / "data" / "synthetic.yaml"
    generator = OmegaConf.to_container(OmegaConf.load(path).generator)
    assert SyntheticConfig.from_dict(generator) == SyntheticConfig()

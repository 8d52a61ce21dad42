"""The study entrypoint makes its own dataset: the synthetic cohort and its frozen-backbone
features when they are absent, reused when they are there, refused or replaced when the cohort
asked for is another, and the study's runs train on the features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONFIGS, TINY_MODEL
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dipro.config import ConfigError
from dipro.data.layout import read_manifest
from dipro.data.shard_writer import write_dataset
from dipro.data.synthetic import SyntheticConfig, cohort_records, simulate_cohort
from ray_jobs.experiments import _variants, prepare_dataset, run_experiment

TASK = "disease_progression"
GENERATOR = [
    "data.generator.num_patients=12",
    "data.generator.image_size=32",
    "data.generator.crop_size=8",
]


def _study(tmp_path: Path, *extra: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "experiments",
            overrides=[
                f"task={TASK}",
                f"data.root={tmp_path / 'cohort'}",
                f"storage_path={tmp_path / 'runs'}",
                *GENERATOR,
                "dataset.features=resnet18",
                *TINY_MODEL,
                "scaling.num_workers=1",
                "train.max_epochs=1",
                "train.max_steps_per_epoch=2",
                "name=study",
                "seeds=[7]",
                *extra,
            ],
        )


def test_the_cohort_and_its_features_are_made_once_and_follow_the_generator(tmp_path):
    cfg = prepare_dataset(_study(tmp_path))
    features = tmp_path / "cohort-features-resnet18"
    assert cfg.data.root == str(features) and cfg.model.region_mode == "features"
    made = read_manifest(features, TASK)
    assert made.region_mode == "features" and made.feature_dim == 512
    source = read_manifest(tmp_path / "cohort", TASK)
    assert made.counts == source.counts
    assert made.generator["features"]["source_sha256"] == source.files_digest()

    again = prepare_dataset(_study(tmp_path))  # reused: the same shards, not written again
    assert read_manifest(again.data.root, TASK).files == made.files

    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_dataset(_study(tmp_path, "data.generator.seed=1"))
    other = prepare_dataset(_study(tmp_path, "data.generator.seed=1", "data.overwrite=true"))
    redone = read_manifest(other.data.root, TASK)
    assert redone.generator["seed"] == 1
    assert (
        redone.generator["features"]["source_sha256"] != made.generator["features"]["source_sha256"]
    )


def test_a_features_study_trains_its_runs_on_the_features(tmp_path, ray_session):
    path = run_experiment(_study(tmp_path, "mode=seeds"))
    study = json.loads(path.with_suffix(".json").read_text())
    assert study["data_root"] == str(tmp_path / "cohort-features-resnet18")
    (run,) = study["runs"]
    config = next(Path(run["run_dir"]).glob("checkpoint_*/config.json"))
    trained = json.loads(config.read_text())
    assert trained["data"]["root"] == str(tmp_path / "cohort-features-resnet18")
    assert trained["model"]["region_mode"] == "features" and trained["model"]["feature_dim"] == 512


def test_a_study_on_other_data_is_not_offered_a_synthetic_overwrite(tmp_path):
    cohort = simulate_cohort(SyntheticConfig(seed=2, num_patients=8, image_size=32, crop_size=4))
    write_dataset(
        cohort_records(cohort, TASK), tmp_path / "cohort", TASK, generator={"name": "mimic"}
    )
    with pytest.raises(ConfigError, match="dataset.synthetic=false"):
        prepare_dataset(_study(tmp_path, "data.overwrite=true"))
    assert read_manifest(tmp_path / "cohort", TASK).generator == {"name": "mimic"}


def test_a_study_trains_only_the_variants_it_names_and_refuses_an_unknown_one(tmp_path):
    chosen = _study(tmp_path, "mode=ablations", "variants=[dipro,no_std,cxr_only]")
    assert _variants(chosen)[2] == ["dipro", "no_std", "cxr_only"]
    with pytest.raises(ConfigError, match=r"variants: \['no_such'\] are not in ablations"):
        _variants(_study(tmp_path, "mode=ablations", "variants=[dipro,no_such]"))
    with pytest.raises(ConfigError, match="must include the full model"):
        _variants(_study(tmp_path, "mode=ablations", "variants=[no_std]"))

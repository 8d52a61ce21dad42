"""End to end: fabricated raw tree -> run_preprocess (Ray Data) -> shards that validate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from local_ray import ensure_ray
from omegaconf import DictConfig

from dipro import vocab
from dipro.data.layout import list_shards, read_manifest
from dipro.data.mimic.fixture_tree import EXPECTED_COUNTS
from dipro.data.mimic.raw_tree import RawTree
from dipro.data.shard_reader import iter_numpy_batches, read_table, verify_checksums

pytestmark = [
    pytest.mark.ray,
    # Ray Data sets its own deprecated DataContext fields when it copies the context to a task
    # (ray/data/context.py): nothing in this project sets them.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")


def tree_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cfg(tree: RawTree, out: Path, *extra: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "preprocess",
            overrides=[
                f"raw.mimic_iv={tree.mimic_iv}",
                f"raw.mimic_cxr={tree.mimic_cxr}",
                f"raw.scene_graph_dir={tree.scene_graph_dir}",
                f"raw.gold_file={tree.gold_file}",
                f"output_root={out}",
                "regions.crop_size=32",
                "regions.num_workers=2",
                "hospitals.num=2",
                "rows_per_file=4",
                *extra,
            ],
        )


@pytest.fixture(scope="module")
def first_run(raw_tree: RawTree, tmp_path_factory: pytest.TempPathFactory):
    from ray_jobs.preprocess import run_preprocess

    ensure_ray()
    before = tree_checksums(raw_tree.root)
    out = tmp_path_factory.mktemp("shards")
    manifests = run_preprocess(_cfg(raw_tree, out))
    return out, manifests, before


def test_shards_validate_with_expected_counts(first_run, raw_tree) -> None:
    out, manifests, _ = first_run
    assert set(manifests) == set(vocab.TASKS)
    for task, manifest in manifests.items():
        total = sum(manifest.num_samples(s) for s in vocab.SPLITS)
        assert total == EXPECTED_COUNTS[f"samples_{task}"]
        verify_checksums(out, task)
        table = read_table(  # validates every record
            [p for s in vocab.SPLITS if manifest.num_samples(s) for p in list_shards(out, task, s)]
        )
        assert table.num_rows == total
        assert set(table.column("crop_size").to_pylist()) == {32}
        counts = manifest.generator["cohort_counts"]
        assert {k: counts[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
        assert manifest.generator["missing_images"] == [raw_tree.missing_image]
        assert manifest.generator["missing_scene_graphs"] == [raw_tree.missing_scene_graph]
        assert manifest.norm_statistics().ehr_std.shape == (vocab.NUM_EHR,)


def test_real_radiograph_crops_are_not_blank(first_run, raw_tree) -> None:
    out, manifest, _ = first_run
    paths = [
        p
        for s in vocab.SPLITS
        if manifest["mortality"].num_samples(s)
        for p in list_shards(out, "mortality", s)
    ]
    table = read_table(paths)
    crops = [np.frombuffer(c, np.uint8) for c in table.column("crops").to_pylist()]
    assert all(c.std() > 5 for c in crops)


def test_inputs_untouched_and_rerun_is_identical(first_run, raw_tree, tmp_path: Path) -> None:
    from ray_jobs.preprocess import run_preprocess

    out, manifests, before = first_run
    assert tree_checksums(raw_tree.root) == before
    again = run_preprocess(_cfg(raw_tree, tmp_path / "again"))
    for task in vocab.TASKS:
        assert again[task].files == manifests[task].files
    assert tree_checksums(raw_tree.root) == before
    cached = run_preprocess(_cfg(raw_tree, out, "overwrite=true", "tasks=[mortality]"))
    assert cached["mortality"].files == manifests["mortality"].files


def test_features_mode_with_a_frozen_backbone(raw_tree, tmp_path: Path) -> None:
    from ray_jobs.preprocess import run_preprocess

    manifests = run_preprocess(
        _cfg(
            raw_tree,
            tmp_path,
            "regions.mode=features",
            "regions.backbone=resnet18",
            "tasks=[mortality]",
        )
    )
    manifest = manifests["mortality"]
    assert (manifest.region_mode, manifest.feature_dim) == ("features", 512)
    table = read_table(list_shards(tmp_path, "mortality", "train"))
    assert table.column("crops").null_count == table.num_rows


def test_existing_shards_are_kept_without_overwrite(first_run, raw_tree) -> None:
    from ray_jobs.preprocess import run_preprocess

    out, manifests, _ = first_run
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_preprocess(_cfg(raw_tree, out))
    assert read_manifest(out, "mortality").files == manifests["mortality"].files


def test_shards_collate_into_a_batch(first_run) -> None:
    from dipro.data.collate import collate
    from dipro.data.schema import model_columns

    out, manifests, _ = first_run
    for task, manifest in manifests.items():
        paths = list_shards(out, task, "train")
        columns = next(iter_numpy_batches(paths, 4, columns=model_columns("crops")))
        batch = collate(columns, manifest.norm_statistics())
        T = batch.cxr_times.shape[1]
        assert batch.crops is not None
        assert batch.crops.shape == (batch.size, T, vocab.NUM_REGIONS, 32, 32)
        assert batch.ehr_values.shape[2] == vocab.NUM_EHR
        assert bool(batch.ehr_values.isfinite().all())
        if task == "disease_progression":
            assert bool((batch.progression != vocab.NOT_MENTIONED).any())
        else:
            assert bool((batch.los_class >= 0).all())

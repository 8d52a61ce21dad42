"""The predict job on Ray Data with a tiny trained checkpoint: one row per test sample whose
metrics equal ray_jobs.evaluate's, reruns refused or replaced, an unlabelled shard folder, and
the synthetic cohort's raw MIMIC tree, preprocessed and trained on, whose predictions name
images that exist there."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CONFIGS, TINY_MODEL, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dipro.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dipro.data.layout import list_shards, read_manifest
from dipro.data.mimic.readers import image_path
from dipro.data.schema import SCHEMA
from dipro.data.shard_reader import read_table
from dipro.evaluation import evaluate_checkpoint
from dipro.metrics import compute_metrics
from dipro.prediction import predictions_from_table
from dipro.run_report import evaluate_to_report
from ray_jobs.predict import PredictionError, run_prediction

pytestmark = pytest.mark.ray

TASK = "disease_progression"


def _predict_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("predict", overrides=["batch_size=4", *overrides])


@pytest.fixture
def tiny_checkpoint(progression_run) -> str:
    """The best checkpoint of the suite's tiny progression run."""
    return progression_run.best_checkpoint


def test_predictions_reproduce_the_evaluation(tiny_checkpoint, tiny_data_root, tmp_path):
    out = tmp_path / "predictions"
    target = run_prediction(
        _predict_cfg(
            f"checkpoint={tiny_checkpoint}",
            f"data.root={tiny_data_root}",
            f"out_dir={out}",
            "actors=2",
        )
    )
    table = pq.read_table(target)
    records = read_table(list_shards(tiny_data_root, TASK, "test"))
    assert table.num_rows == read_manifest(tiny_data_root, TASK).num_samples("test")
    assert table.column("sample_id").to_pylist() == sorted(records.column("sample_id").to_pylist())
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["rows"] == table.num_rows and summary["samples_per_second"] > 0

    report = evaluate_to_report(
        tiny_checkpoint, tiny_data_root, split="test", out_dir=tmp_path / "report"
    )
    evaluated = json.loads((report.parent / "metrics.json").read_text())["metrics"]
    from_rows = compute_metrics(predictions_from_table(table))
    assert {"precision", "recall", "f1", "auprc", "auroc"} <= from_rows.keys()
    assert from_rows.keys() <= evaluated.keys()
    for key, value in from_rows.items():
        assert value == pytest.approx(evaluated[key], abs=1e-6, nan_ok=True), key

    with pytest.raises(PredictionError, match="exists; pass overwrite=true"):
        run_prediction(
            _predict_cfg(
                f"checkpoint={tiny_checkpoint}", f"data.root={tiny_data_root}", f"out_dir={out}"
            )
        )
    replaced = run_prediction(
        _predict_cfg(
            f"checkpoint={tiny_checkpoint}",
            f"data.root={tiny_data_root}",
            f"out_dir={out}",
            "split=val",
            "overwrite=true",
        )
    )
    n_val = read_manifest(tiny_data_root, TASK).num_samples("val")
    assert pq.read_table(replaced).num_rows == n_val


def test_unlabelled_shard_folder(tiny_checkpoint, tiny_data_root, tmp_path):
    records = read_table(list_shards(tiny_data_root, TASK, "val"))
    unlabelled = records.set_column(
        records.schema.get_field_index("progression"),
        SCHEMA.field("progression"),
        pa.nulls(records.num_rows, SCHEMA.field("progression").type),
    )
    folder = tmp_path / "tonight"
    (folder / "ward").mkdir(parents=True)
    pq.write_table(unlabelled, folder / "ward" / "admissions.parquet")
    target = run_prediction(
        _predict_cfg(f"checkpoint={tiny_checkpoint}", f"shards={folder}", f"out_dir={tmp_path}/o")
    )
    table = pq.read_table(target)
    assert table.num_rows == records.num_rows
    assert table.column("progression.pneumonia.label").null_count == table.num_rows
    with pytest.raises(PredictionError, match="no .parquet files"):
        run_prediction(_predict_cfg(f"checkpoint={tiny_checkpoint}", f"shards={tmp_path}/none"))


@pytest.mark.slow
def test_raw_mimic_tree_trains_and_its_predictions_name_its_images(ray_session, tmp_path):
    """The path a credentialed user runs: raw MIMIC files -> ray_jobs.preprocess -> shards ->
    ray_jobs.train -> ray_jobs.predict, on the synthetic cohort written in the MIMIC formats;
    every prediction names the images it was made from, and they exist in the raw tree."""
    from dipro.data.mimic.cohort_tree import write_cohort_raw_tree
    from dipro.data.synthetic import SyntheticConfig, simulate_cohort
    from ray_jobs.preprocess import run_preprocess
    from ray_jobs.training import run_training

    cohort = simulate_cohort(SyntheticConfig(seed=11, num_patients=40, image_size=64))
    tree = write_cohort_raw_tree(cohort, tmp_path / "raw")
    shards = tmp_path / "shards"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        prep = compose(
            "preprocess",
            overrides=[
                f"raw.mimic_iv={tree.mimic_iv}",
                f"raw.mimic_cxr={tree.mimic_cxr}",
                f"raw.scene_graph_dir={tree.scene_graph_dir}",
                f"raw.gold_file={tree.gold_file}",
                f"output_root={shards}",
                "regions.crop_size=16",
                f"tasks=[{TASK}]",
            ],
        )
    manifest = run_preprocess(prep)[TASK]
    assert manifest.num_samples("train") > 0

    trained = run_training(
        compose_train(
            [
                f"task={TASK}",
                f"data.root={shards}",
                f"storage_path={tmp_path / 'runs'}",
                "run_name=from_raw",
                *TINY_MODEL,
                "scaling.num_workers=1",
                "train.max_epochs=1",
            ]
        )
    )
    epochs = (tmp_path / "runs" / "from_raw" / "epoch_metrics.jsonl").read_text().splitlines()
    assert [json.loads(e)["epoch"] for e in epochs] == [1]
    assert trained.test_metrics is None or "f1" in trained.test_metrics

    split = max(("train", "val", "test"), key=manifest.num_samples)
    target = run_prediction(
        _predict_cfg(
            f"checkpoint={trained.best_checkpoint}",
            f"data.root={shards}",
            f"split={split}",
            f"out_dir={tmp_path}/o",
        )
    )
    table = pq.read_table(target)
    assert table.num_rows == manifest.num_samples(split) > 0
    assert set(table.column("source").to_pylist()) == {"mimic"}
    assert "MIMIC-CXR-JPG 2.0.0" in table.column("source_version")[0].as_py()
    for row in table.select(["subject_id", "dicom_ids", "study_ids"]).to_pylist():
        assert len(row["dicom_ids"]) == 2
        for dicom, study in zip(row["dicom_ids"], row["study_ids"], strict=True):
            path = image_path(tree.mimic_cxr, row["subject_id"], study, dicom)
            assert path.is_file() and (tree.mimic_cxr / "files") in path.parents, path


def test_a_site_normalised_federated_model_is_scored_with_the_datasets_own_statistics(
    tiny_checkpoint, tiny_data_root, tmp_path
):
    """A federated checkpoint carries no normalisation statistics (each site used its own):
    evaluation and prediction on a dataset use that dataset's training statistics, which for
    this model's own data reproduces the central checkpoint exactly; a bare folder of shards,
    which has none, is refused."""
    model, meta = load_checkpoint(tiny_checkpoint)
    federated = tmp_path / "federated" / "best.pt"
    save_checkpoint(
        federated, model, model_cfg=meta.model_cfg, task=meta.task,
        extra={"round": 3, "site_normalisation": True},
    )  # fmt: skip
    test = list_shards(tiny_data_root, TASK, "test")
    with pytest.raises(CheckpointError, match="carries no normalisation statistics"):
        evaluate_checkpoint(federated, test)
    stats = read_manifest(tiny_data_root, TASK).norm_statistics()
    assert evaluate_checkpoint(federated, test, norm_stats=stats).metrics == pytest.approx(
        evaluate_checkpoint(tiny_checkpoint, test).metrics, nan_ok=True
    )
    report = evaluate_to_report(federated, tiny_data_root, split="test", out_dir=tmp_path / "r")
    central = evaluate_to_report(tiny_checkpoint, tiny_data_root, split="test",
                                 out_dir=tmp_path / "c")  # fmt: skip
    assert json.loads((report.parent / "metrics.json").read_text())["metrics"] == pytest.approx(
        json.loads((central.parent / "metrics.json").read_text())["metrics"], nan_ok=True
    )
    rows = pq.read_table(
        run_prediction(
            _predict_cfg(f"checkpoint={federated}", f"data.root={tiny_data_root}",
                         f"out_dir={tmp_path / 'p'}")
        )
    )  # fmt: skip
    assert rows.num_rows == len(read_table(test))
    with pytest.raises(PredictionError, match="normalised at each site"):
        run_prediction(
            _predict_cfg(f"checkpoint={federated}", f"shards={tiny_data_root / TASK}",
                         f"out_dir={tmp_path / 'q'}")
        )  # fmt: skip

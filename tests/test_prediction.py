"""Prediction rows of a real model on the tiny cohort: one row per record, the metrics of the
rows equal the metrics of the predictions, missing inputs flagged, and the explanation picture."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import tiny_model_cfg

from dipro import vocab
from dipro.data.collate import collate
from dipro.data.layout import list_shards, read_manifest
from dipro.data.shard_reader import iter_numpy_batches
from dipro.engine import predict
from dipro.explain import explanation_png
from dipro.metrics import compute_metrics
from dipro.model import build_model
from dipro.prediction import (
    missing_input_flags,
    prediction_table,
    predictions_from_table,
    remove_inputs,
)

MODEL_CFG: dict[str, Any] = tiny_model_cfg(feature_dim=16, num_groups=4, ehr_use_observed=True)
IDENTITY = {"checkpoint": "ck.pt", "checkpoint_sha256": "0" * 64, "model_version": "test"}


def _model(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no pretrained_weights"):
        return build_model(MODEL_CFG, task).eval()


def _split(root: Path, task: str, split: str = "test") -> dict[str, np.ndarray]:
    paths = list_shards(root, task, split)
    return next(iter_numpy_batches(paths, batch_size=1000))


@pytest.mark.parametrize("task", vocab.TASKS)
def test_rows_carry_ids_provenance_and_give_back_the_metrics(tiny_dataset: Path, task: str):
    records = _split(tiny_dataset, task)
    stats = read_manifest(tiny_dataset, task).norm_statistics()
    predictions = predict(_model(task), [collate(records, stats)], device="cpu")
    table = prediction_table(predictions, records, IDENTITY)

    assert table.num_rows == len(records["sample_id"]) == len(predictions)
    assert table.column("sample_id").to_pylist() == list(records["sample_id"])
    assert table.column("dicom_ids").to_pylist() == [list(d) for d in records["dicom_ids"]]
    assert set(table.column("source").to_pylist()) == {"synthetic"}
    assert set(table.column("checkpoint_sha256").to_pylist()) == {"0" * 64}
    attention = np.stack(
        [table.column(f"attention.{r.replace(' ', '_')}").to_numpy() for r in vocab.REGIONS], -1
    )
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    if task == "length_of_stay":
        probs = np.stack([table.column(f"los.{c}.probability").to_numpy() for c in range(4)], -1)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-9)
        expected_class = table.column("los.expected_class").to_numpy()
        np.testing.assert_allclose(expected_class, probs @ np.arange(4))
        np.testing.assert_array_equal(table.column("los.label").to_numpy(), predictions.labels)

    back = predictions_from_table(table)
    np.testing.assert_allclose(back.probabilities, predictions.probabilities, atol=1e-12)
    expected, got = compute_metrics(predictions), compute_metrics(back)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key


def test_missing_inputs_are_flagged_and_masked(tiny_dataset: Path) -> None:
    task = "mortality"
    records = _split(tiny_dataset, task)
    n = len(records["sample_id"])
    flags = missing_input_flags(records)
    assert not flags["missing_ehr"].any() and not flags["single_cxr"].any()

    stripped = remove_inputs(records, ["ehr", "cxr"])
    flags = missing_input_flags(stripped)
    assert flags["missing_ehr"].all() and flags["single_cxr"].all()
    batch = collate(stripped, read_manifest(tiny_dataset, task).norm_statistics())
    assert batch.cxr_mask.shape[1] == 2 and not batch.pair_mask.any()
    assert not batch.ehr_mask.any()
    S = int(records["crop_size"][0])
    for b in range(n):
        T = len(records["cxr_times"][b])
        last = np.frombuffer(records["crops"][b], np.uint8).reshape(T, -1, S, S)[-1]
        np.testing.assert_array_equal(batch.crops[b, 0].numpy(), last)
    predictions = predict(_model(task), [batch], device="cpu")
    assert np.isfinite(predictions.logits).all()
    table = prediction_table(predictions, stripped, IDENTITY)
    assert table.column("single_cxr").to_pylist() == [True] * n
    assert table.column("missing_ehr").to_pylist() == [True] * n
    # dicom_ids still name the record's images as stored: removal happens only at scoring.
    assert table.column("mortality.label").to_pylist() == list(records["mortality"])

    pairs = _split(tiny_dataset, "disease_progression")
    kept = remove_inputs(pairs, ["cxr"])
    assert [len(t) for t in kept["cxr_times"]] == [2] * len(pairs["cxr_times"])
    with pytest.raises(ValueError, match="cannot remove inputs"):
        remove_inputs(pairs, ["labels"])


def test_explanation_picture_of_one_sample(tiny_dataset: Path) -> None:
    task = "disease_progression"
    records = _split(tiny_dataset, task)
    one = {name: column[:1] for name, column in records.items()}
    predictions = predict(_model(task), [collate(one)], device="cpu")
    png = explanation_png(predictions, one)
    with Image.open(io.BytesIO(png)) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 1000 and image.size[1] > 500

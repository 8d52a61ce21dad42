"""The one collate: shapes, padding and masks with mixed T and L in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dipro import vocab
from dipro.data.collate import IGNORE_INDEX, collate
from dipro.data.normalize import NormStats
from dipro.data.schema import model_columns, records_to_table
from dipro.data.shard_reader import iter_numpy_batches
from dipro.data.synthetic import Cohort, cohort_records

R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS


def _mixed_records(cohort: Cohort) -> list[dict[str, Any]]:
    """Stays with different numbers of CXRs and progression pairs with different EHR lengths."""
    stays = list(cohort_records(cohort, "mortality"))
    by_t = {rec["cxr_times"].size: rec for rec in stays}
    assert len(by_t) >= 2, "the tiny cohort should have stays with different T"
    pairs = list(cohort_records(cohort, "disease_progression"))
    by_l = {rec["ehr_times"].size: rec for rec in pairs}
    return [*by_t.values(), *list(by_l.values())[:3]]


def _batch_from_shard(records: list[dict[str, Any]], tmp_path: Path) -> dict[str, np.ndarray]:
    path = tmp_path / "part-00000.parquet"
    pq.write_table(records_to_table(records), path)
    return next(iter_numpy_batches([str(path)], len(records), model_columns("crops")))


def test_shapes_and_masks_with_mixed_t_and_l(tiny_cohort: Cohort, tmp_path: Path) -> None:
    records = _mixed_records(tiny_cohort)
    columns = _batch_from_shard(records, tmp_path)
    batch = collate(columns)
    Ts = [r["cxr_times"].size for r in records]
    Ls = [r["ehr_times"].size for r in records]
    B, T, L, S = len(records), max(Ts), max(Ls), records[0]["crop_size"]
    assert batch.size == B
    assert batch.crops.shape == (B, T, R, S, S) and batch.features is None
    assert batch.cxr_mask.shape == (B, T) and batch.pair_mask.shape == (B, T - 1)
    assert batch.region_present.shape == (B, T, R)
    assert batch.ehr_values.shape == (B, L, V) and batch.ehr_observed.shape == (B, L, V)
    assert batch.demographics.shape == (B, G)
    assert batch.region_labels.shape == (B, T - 1, R, K) and batch.progression.shape == (B, K)
    for b, rec in enumerate(records):
        t, n = Ts[b], Ls[b]
        assert batch.cxr_mask[b].tolist() == [True] * t + [False] * (T - t)
        assert batch.pair_mask[b].tolist() == [True] * (t - 1) + [False] * (T - t)
        assert batch.ehr_mask[b].tolist() == [True] * n + [False] * (L - n)
        np.testing.assert_array_equal(batch.crops[b, :t].numpy(), rec["crops"])
        assert not batch.crops[b, t:].any() and not batch.region_present[b, t:].any()
        np.testing.assert_array_equal(batch.region_present[b, :t].numpy(), rec["region_present"])
        np.testing.assert_allclose(batch.ehr_values[b, :n].numpy(), rec["ehr_values"])
        assert not batch.ehr_values[b, n:].any() and not batch.ehr_observed[b, n:].any()
        np.testing.assert_array_equal(batch.region_labels[b, : t - 1].numpy(), rec["region_labels"])
        assert (batch.region_labels[b, t - 1 :] == vocab.NOT_MENTIONED).all()
        if rec["task"] == "disease_progression":
            np.testing.assert_array_equal(batch.progression[b].numpy(), rec["progression"])
            assert batch.mortality[b] == IGNORE_INDEX and batch.los_class[b] == IGNORE_INDEX
        else:
            assert (batch.progression[b] == vocab.NOT_MENTIONED).all()
            assert batch.mortality[b] == rec["mortality"]
            assert batch.los_class[b] == vocab.los_class(rec["los_days"])


def test_normalisation_applies_to_valid_steps_only(tiny_cohort: Cohort, tmp_path: Path) -> None:
    records = _mixed_records(tiny_cohort)
    columns = _batch_from_shard(records, tmp_path)
    rng = np.random.default_rng(0)
    stats = NormStats(
        rng.normal(size=V).astype(np.float32),
        rng.uniform(1, 2, V).astype(np.float32),
        np.array([60, 170, 80], np.float32),
        np.array([10, 10, 20], np.float32),
    )
    batch = collate(columns, stats)
    for b, rec in enumerate(records):
        n = rec["ehr_times"].size
        expected = (rec["ehr_values"] - stats.ehr_mean) / stats.ehr_std
        np.testing.assert_allclose(batch.ehr_values[b, :n].numpy(), expected, rtol=1e-5)
        assert not batch.ehr_values[b, n:].any()
        demo = batch.demographics[b].numpy()
        np.testing.assert_allclose(
            demo[:3], (rec["demographics"][:3] - stats.demo_mean) / stats.demo_std, rtol=1e-5
        )
        np.testing.assert_array_equal(demo[3:], rec["demographics"][3:])


def test_features_mode(tiny_cohort: Cohort, tmp_path: Path) -> None:
    records = _mixed_records(tiny_cohort)
    F = 6
    for rec in records:
        rec["features"] = (
            np.random.default_rng(1).normal(size=(rec["cxr_times"].size, R, F)).astype(np.float32)
        )
        rec["feature_dim"], rec["crops"], rec["crop_size"] = F, None, None
    path = tmp_path / "part-00000.parquet"
    pq.write_table(records_to_table(records), path)
    columns = next(iter_numpy_batches([str(path)], len(records), model_columns("features")))
    batch = collate(columns)
    T = max(r["cxr_times"].size for r in records)
    assert batch.crops is None and batch.features.shape == (len(records), T, R, F)
    for b, rec in enumerate(records):
        t = rec["cxr_times"].size
        np.testing.assert_array_equal(batch.features[b, :t].numpy(), rec["features"])
        assert not batch.features[b, t:].any()

"""The total loss against reference formulas written here; class weights from training labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dipro import vocab
from dipro.batch import Batch
from dipro.data.collate import IGNORE_INDEX, collate
from dipro.data.schema import records_to_table
from dipro.losses import (
    ClassWeights,
    DiProLoss,
    LabelCounts,
    LossWeights,
    build_loss,
    count_labels,
)
from dipro.model.output import DiProOutput

R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"
FEATURE_DIM = 6


def make_record(task: str, i: int, rng: np.random.Generator) -> dict:
    """One valid sample record in features mode with random labels."""
    T = 2 if task == "disease_progression" else int(rng.integers(2, 5))
    L = int(rng.integers(1, 6))
    icu = task != "disease_progression"
    return {
        "sample_id": f"s{i}",
        "subject_id": 100 + i,
        "stay_id": 1000 + i,
        "hospital": i % 2,
        "split": "train",
        "task": task,
        "cxr_times": np.cumsum(rng.uniform(1, 10, T)).astype(np.float32),
        "feature_dim": FEATURE_DIM,
        "features": rng.normal(size=(T, R, FEATURE_DIM)).astype(np.float32),
        "region_present": rng.uniform(size=(T, R)) < 0.9,
        "ehr_times": np.arange(L, dtype=np.float32),
        "ehr_values": rng.normal(size=(L, V)).astype(np.float32),
        "ehr_observed": rng.uniform(size=(L, V)) < 0.5,
        "demographics": rng.normal(size=G).astype(np.float32),
        "region_labels": rng.integers(0, 4, size=(T - 1, R, K)).astype(np.int8),
        "progression": None if icu else rng.integers(0, 4, size=K).astype(np.int8),
        "mortality": int(rng.uniform() < 0.25) if icu else None,
        "los_days": float(rng.uniform(2, 11)) if icu else None,
    }


def collate_records(records: list[dict]) -> Batch:
    """The real path: records -> Arrow table -> numpy columns -> collate."""
    table = records_to_table(records)
    return collate({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names})


def make_batch(task: str, n: int, seed: int) -> tuple[Batch, list[dict]]:
    rng = np.random.default_rng(seed)
    records = [make_record(task, i, rng) for i in range(n)]
    return collate_records(records), records


def make_output(
    batch: Batch, task: str, d: int = 8, seed: int = 0, full: bool = True
) -> DiProOutput:
    g = torch.Generator().manual_seed(seed)
    B, P = batch.size, batch.pair_mask.shape[1]
    shape = {"disease_progression": (B, K, 3), "mortality": (B,), "length_of_stay": (B, 4)}[task]

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, requires_grad=True)

    mask = batch.pair_mask[:, :, None] & batch.region_present[:, :-1] & batch.region_present[:, 1:]
    att = torch.rand(B, R, generator=g)
    return DiProOutput(
        logits=rand(*shape),
        static=rand(B, P, R, d) if full else None,
        dynamic=rand(B, P, R, d) if full else None,
        static_rev=rand(B, P, R, d) if full else None,
        region_logits=rand(B, P, R, K, 3) if full else None,
        region_logits_rev=rand(B, P, R, K, 3) if full else None,
        pair_region_mask=mask,
        region_attention=att / att.sum(1, keepdim=True),
    )


# Independent reference formulas -------------------------------------------------------------


def ref_weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> float:
    """sum_k [ sum_{rows labelled} w_k[y] * -log softmax(x)[y] / sum_{rows labelled} w_k[y] ]
    over rows [N, K, 3] / [N, K]; code 3 skipped."""
    total = 0.0
    logp = torch.log_softmax(logits.detach().double(), -1)
    for k in range(logits.shape[1]):
        num = den = 0.0
        for n in range(logits.shape[0]):
            y = int(labels[n, k])
            if y == 3:
                continue
            w = float(weight[k, y])
            num += -w * float(logp[n, k, y])
            den += w
        total += num / den if den > 0 else 0.0
    return total


def ref_class_weights(codes: np.ndarray) -> np.ndarray:
    """weight_c = N / (3 n_c) per finding; codes [..., K]."""
    codes = codes.reshape(-1, K)
    out = np.ones((K, 3))
    for k in range(K):
        col = codes[:, k][codes[:, k] != 3]
        for c in range(3):
            n_c = (col == c).sum()
            out[k, c] = len(col) / (3 * n_c) if n_c else 0.0
    return out


def ref_orth(s: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> float:
    s, d = s.detach(), d.detach()
    cos = (s * d).sum(-1) / (s.norm(dim=-1) * d.norm(dim=-1))
    return float((cos**2)[m].mean())


# Tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", vocab.TASKS)
def test_loss_weights_from_each_task_preset(task):
    cfg = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())["loss"]
    w = LossWeights.from_dict(cfg)
    assert (w.ce, w.orth, w.temp, w.static, w.dyn) == tuple(
        cfg[k] for k in ("ce", "orth", "temp", "static", "dyn")
    )


def test_loss_weights_refuse_missing_and_unknown_keys():
    with pytest.raises(ValueError, match=r"missing keys \['dyn'\], unknown keys \['dyno'\]"):
        LossWeights.from_dict({"ce": 1, "orth": 1, "temp": 1, "static": 1, "dyno": 1})


def test_class_weights_from_training_labels():
    batch, records = make_batch("disease_progression", 40, seed=1)
    counts = count_labels([batch])
    weights = ClassWeights.from_counts(counts)
    np.testing.assert_allclose(weights.progression, ref_class_weights(batch.progression.numpy()))
    np.testing.assert_allclose(weights.region, ref_class_weights(batch.region_labels.numpy()))
    table_counts = LabelCounts.from_table(records_to_table(records))
    assert table_counts.to_dict() == counts.to_dict()

    icu, icu_records = make_batch("mortality", 60, seed=2)
    counts = count_labels([icu])
    y = icu.mortality.numpy()
    n_pos, n_neg = (y == 1).sum(), (y == 0).sum()
    assert 0 < n_pos < n_neg
    assert ClassWeights.from_counts(counts).mortality_pos_weight == pytest.approx(n_neg / n_pos)
    assert ClassWeights.from_counts(counts).mortality_pos_weight > 1.0
    assert LabelCounts.from_table(records_to_table(icu_records)).to_dict() == counts.to_dict()
    # Counts add up across shards.
    shards = count_labels([collate_records(icu_records[:25]), collate_records(icu_records[25:])])
    assert (shards + LabelCounts.zeros()).to_dict() == counts.to_dict()
    assert ClassWeights.from_dict(weights.to_dict()) == weights


def test_progression_task_loss_is_class_weighted_ce_over_labelled_rows():
    batch, _ = make_batch("disease_progression", 12, seed=3)
    counts = count_labels([make_batch("disease_progression", 50, seed=4)[0]])
    weights = ClassWeights.from_counts(counts)
    loss_fn = DiProLoss(
        task="disease_progression",
        weights=LossWeights(ce=2.0, orth=0, temp=0, static=0, dyn=0),
        class_weights=weights,
    )
    out = make_output(batch, "disease_progression", full=False)
    total, parts = loss_fn(out, batch)
    ref = ref_weighted_ce(out.logits, batch.progression, torch.tensor(weights.progression))
    assert parts == {"task": pytest.approx(ref, rel=1e-5)}
    assert total.item() == pytest.approx(2.0 * ref, rel=1e-5)

    # Not-mentioned rows do not count: changing their logits changes nothing.
    logits = out.logits.detach().clone()
    logits[batch.progression == 3] = 50.0 * torch.randn_like(logits[batch.progression == 3])
    out2 = make_output(batch, "disease_progression", full=False)
    out2.logits = logits
    assert loss_fn(out2, batch)[0].item() == pytest.approx(total.item(), rel=1e-6)


def test_mortality_loss_uses_negative_over_positive_pos_weight():
    batch, _ = make_batch("mortality", 16, seed=5)
    counts = count_labels([batch])
    cfg = {"ce": 6.0, "orth": 0, "temp": 0, "static": 0, "dyn": 0}
    loss_fn = build_loss("mortality", cfg, ClassWeights.from_counts(counts))
    out = make_output(batch, "mortality", full=False)
    x, y = out.logits.detach().double(), batch.mortality.double()
    pw = (y == 0).sum() / (y == 1).sum()
    ref = -(pw * y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x)))
    total, parts = loss_fn(out, batch)
    assert parts["task"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert total.item() == pytest.approx(6.0 * float(ref.mean()), rel=1e-5)


def test_length_of_stay_loss_is_ce_and_masks_absent_labels():
    batch, _ = make_batch("length_of_stay", 10, seed=6)
    los = batch.los_class.clone()
    los[:3] = IGNORE_INDEX
    batch = Batch(**{**batch.__dict__, "los_class": los})
    loss_fn = DiProLoss(
        task="length_of_stay",
        weights=LossWeights(ce=10.0, orth=0, temp=0, static=0, dyn=0),
        class_weights=ClassWeights.uniform(),
    )
    out = make_output(batch, "length_of_stay", full=False)
    logp = torch.log_softmax(out.logits.detach().double(), -1)
    ref = -logp[torch.arange(3, 10), los[3:]].mean()
    assert loss_fn(out, batch)[1]["task"] == pytest.approx(float(ref), rel=1e-5)


def test_total_combines_auxiliary_terms_with_config_lambdas():
    batch, _ = make_batch("mortality", 6, seed=7)
    weights = LossWeights(ce=6.0, orth=0.1, temp=1.0, static=0.5, dyn=0.1)
    counts = count_labels([batch])
    loss_fn = DiProLoss(
        task="mortality", weights=weights, class_weights=ClassWeights.from_counts(counts)
    )
    out = make_output(batch, "mortality")
    total, parts = loss_fn(out, batch)
    assert set(parts) == {"task", "orth", "temp", "static", "dyn"}
    m = out.pair_region_mask
    assert parts["orth"] == pytest.approx(ref_orth(out.static, out.dynamic, m), rel=1e-5)
    s = out.static.detach()
    both = m[:, :-1] & m[:, 1:]
    assert parts["temp"] == pytest.approx(
        float(((s[:, :-1] - s[:, 1:]) ** 2).mean(-1)[both].mean()), rel=1e-5
    )
    sr = out.static_rev.detach()
    assert parts["static"] == pytest.approx(float(((s - sr) ** 2).mean(-1)[m].mean()), rel=1e-5)
    expected = sum(getattr(weights, "ce" if k == "task" else k) * v for k, v in parts.items())
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert out.static.grad is not None and out.static_rev.grad is None  # S~ is stop-gradient
    assert out.region_logits_rev.grad is not None


def test_ablated_terms_are_absent_and_contribute_nothing():
    batch, _ = make_batch("length_of_stay", 6, seed=8)
    weights = LossWeights(ce=10.0, orth=5.0, temp=5.0, static=5.0, dyn=5.0)
    loss_fn = DiProLoss(
        task="length_of_stay", weights=weights, class_weights=ClassWeights.uniform()
    )
    out = make_output(batch, "length_of_stay", full=False)
    total, parts = loss_fn(out, batch)
    assert set(parts) == {"task"}
    assert total.item() == pytest.approx(10.0 * parts["task"], rel=1e-6)

    no_pae = make_output(batch, "length_of_stay")
    no_pae.static_rev = no_pae.region_logits = no_pae.region_logits_rev = None
    assert set(loss_fn(no_pae, batch)[1]) == {"task", "orth", "temp"}


def test_finite_when_nothing_is_labelled():
    batch, _ = make_batch("disease_progression", 4, seed=9)
    batch = Batch(
        **{
            **batch.__dict__,
            "progression": torch.full_like(batch.progression, 3),
            "region_labels": torch.full_like(batch.region_labels, 3),
        }
    )
    loss_fn = DiProLoss(
        task="disease_progression",
        weights=LossWeights(ce=2, orth=1, temp=0, static=0.5, dyn=2),
        class_weights=ClassWeights.uniform(),
    )
    out = make_output(batch, "disease_progression")
    total, parts = loss_fn(out, batch)
    assert torch.isfinite(total)
    assert parts["task"] == 0.0 and parts["dyn"] == 0.0
    total.backward()
    assert torch.isfinite(out.logits.grad).all()

"""The engine on the real DiPro model (tiny widths, features mode): accumulation, clipping,
scheduling, FedProx, DDP, evaluation."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny_model import tiny_model_cfg
from torch import nn

from dipro import vocab
from dipro.batch import Batch
from dipro.data.collate import collate
from dipro.data.schema import records_to_table
from dipro.engine import (
    build_optimizer,
    build_scheduler,
    evaluate,
    learning_rate,
    predict,
    proximal_term,
    train_epoch,
)
from dipro.losses import ClassWeights, DiProLoss, build_loss, count_labels
from dipro.metrics import Predictions
from dipro.model import build_model
from dipro.settings import ConfigError, LossWeights, OptimSettings, parse

R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
FEATURE_DIM = 8
MODEL_CFG = tiny_model_cfg(
    region_mode="features",
    feature_dim=FEATURE_DIM,
    num_groups=4,
    dropout=0.0,
    ehr_use_observed=True,
)
LOSS_CFG = {"ce": 6.0, "orth": 0.1, "temp": 1.0, "static": 0.5, "dyn": 0.1}
DEVICE = torch.device("cpu")


def records(task: str, n: int, seed: int, uniform: bool = False) -> list[dict]:
    """Valid sample records in features mode. ``uniform``: every sample has 3 CXRs, every region
    boxed and the same region labels, so per-sample loss terms have equal token counts."""
    rng = np.random.default_rng(seed)
    shared_labels = rng.integers(0, 4, size=(2, R, K)).astype(np.int8)
    out = []
    for i in range(n):
        T = 2 if task == "disease_progression" else (3 if uniform else int(rng.integers(2, 5)))
        L = 4 if uniform else int(rng.integers(1, 7))
        icu = task != "disease_progression"
        out.append(
            {
                "sample_id": f"s{seed}-{i}",
                "subject_id": 100 * seed + i,
                "stay_id": 10_000 * seed + i,
                "hospital": i % 2,
                "split": "train",
                "task": task,
                "cxr_times": (np.arange(T) * 10.0 + rng.uniform(0, 5, T)).astype(np.float32),
                "feature_dim": FEATURE_DIM,
                "features": rng.normal(size=(T, R, FEATURE_DIM)).astype(np.float32),
                "region_present": np.ones((T, R), bool)
                if uniform
                else rng.uniform(size=(T, R)) < 0.9,
                "ehr_times": np.sort(rng.choice(40, L, replace=False)).astype(np.float32),
                "ehr_values": rng.normal(size=(L, V)).astype(np.float32),
                "ehr_observed": rng.uniform(size=(L, V)) < 0.6,
                "demographics": rng.normal(size=G).astype(np.float32),
                "region_labels": shared_labels[: T - 1]
                if uniform
                else rng.integers(0, 4, size=(T - 1, R, K)).astype(np.int8),
                "progression": None if icu else rng.integers(0, 4, size=K).astype(np.int8),
                "mortality": int(i % 3 == 0) if icu else None,
                "los_days": float(rng.uniform(2, 11)) if icu else None,
            }
        )
    return out


def to_batch(recs: list[dict]) -> Batch:
    table = records_to_table(recs)
    return collate({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names})


class FrozenBatchNorm(nn.Module):
    """The real model with its BatchNorm layers kept in eval mode (running statistics) while it
    trains, so that a sample's output does not depend on the other samples of its micro-batch:
    with batch statistics, half-batches and the full batch normalise differently and gradient
    accumulation could only match approximately."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = model.task

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, batch: Batch):
        return self.model(batch)


def frozen_model(task: str, seed: int = 0) -> FrozenBatchNorm:
    torch.manual_seed(seed)
    return FrozenBatchNorm(build_model(MODEL_CFG, task))


def sgd_update(model: nn.Module, batches: list[Batch], loss_fn: DiProLoss, **kw) -> list:
    """Parameter change of one train_epoch with plain SGD (lr 1), which shows any gradient scale."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = train_epoch(model, batches, opt, loss_fn, device=DEVICE, **kw)
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)], stats


def assert_same_update(a: list, b: list) -> None:
    scale = max(float(x.abs().max()) for x in a)
    assert scale > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale)


def test_accumulation_equals_one_step_on_the_whole_group_including_a_partial_last_group():
    recs = records("mortality", 9, seed=1, uniform=True)
    loss_fn = build_loss(
        "mortality", LOSS_CFG, ClassWeights.from_counts(count_labels([to_batch(recs)]))
    )
    a, b, c = to_batch(recs[:2]), to_batch(recs[2:6]), to_batch(recs[6:])  # 2 + 4 rows, then 3

    base = frozen_model("mortality")
    micro = copy.deepcopy(base)
    whole = copy.deepcopy(base)
    acc_update, acc_stats = sgd_update(micro, [a, b, c], loss_fn, accumulation_steps=2)
    ref_update, ref_stats = sgd_update(whole, [to_batch(recs[:6]), c], loss_fn)
    assert acc_stats["steps"] == ref_stats["steps"] == 2
    assert acc_stats["samples"] == ref_stats["samples"] == 9
    assert_same_update(acc_update, ref_update)
    assert acc_stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)

    # Without the row weighting the update would differ: the test can tell.
    unequal, _ = sgd_update(copy.deepcopy(base), [a, b, c], loss_fn, accumulation_steps=1)
    with pytest.raises(AssertionError):
        assert_same_update(unequal, ref_update)


def test_clipping_bounds_the_final_gradient_norm():
    recs = records("length_of_stay", 6, seed=2)
    loss_fn = build_loss(
        "length_of_stay", LOSS_CFG, ClassWeights.from_counts(count_labels([to_batch(recs)]))
    )
    batches = [to_batch(recs[:3]), to_batch(recs[3:])]
    free, _ = sgd_update(frozen_model("length_of_stay"), batches, loss_fn, accumulation_steps=2)
    assert torch.cat([u.flatten() for u in free]).norm() > 0.05
    clipped, _ = sgd_update(
        frozen_model("length_of_stay"), batches, loss_fn, accumulation_steps=2, max_grad_norm=0.05
    )
    assert float(torch.cat([u.flatten() for u in clipped]).norm()) == pytest.approx(0.05, rel=1e-4)


def test_scheduler_and_callback_step_once_per_optimizer_step_and_max_steps_stops():
    recs = records("disease_progression", 10, seed=3)
    batches = [to_batch(recs[i : i + 2]) for i in range(0, 10, 2)]  # 5 micro-batches
    loss_fn = build_loss(
        "disease_progression", LOSS_CFG, ClassWeights.from_counts(count_labels(batches))
    )
    model = frozen_model("disease_progression")
    cfg = OptimSettings(lr=1e-3, batch_size=2, weight_decay=0.0, min_lr=1e-7)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=3)
    seen = []
    stats = train_epoch(
        model,
        batches,
        opt,
        loss_fn,
        device=DEVICE,
        scheduler=sched,
        accumulation_steps=2,
        on_step=lambda step, m: seen.append((step, m["lr"])),
    )
    assert stats["steps"] == 3 and stats["samples"] == 10  # groups of 2, 2 and 1 micro-batches
    assert [s for s, _ in seen] == [1, 2, 3]
    assert sched.last_epoch == 3
    assert seen[-1][1] == pytest.approx(1e-7)
    assert {"loss", "loss/task", "loss/orth", "loss/temp", "loss/static", "loss/dyn"} <= set(stats)

    stopped = train_epoch(
        model, batches, opt, loss_fn, device=DEVICE, accumulation_steps=2, max_steps=1
    )
    assert stopped["steps"] == 1 and stopped["samples"] == 4


def test_optimizer_uses_the_configured_lr_unless_scaling_is_explicit():
    model = frozen_model("mortality")
    plain = OptimSettings(lr=1e-5, batch_size=4)
    optimizer = build_optimizer(model, plain, world_size=4, accumulation_steps=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    reference = {"batch_size": 4, "accumulation_steps": 4, "num_workers": 1}
    linear = {"lr": 1.6e-4, "lr_scaling": "linear", "batch_size": 4, "reference": reference}
    # lr x (4 x 4 x 1) / (4 x 4 x 1): the reference training itself keeps its lr
    optim = parse(OptimSettings, linear, "optim")
    assert learning_rate(optim, world_size=1, accumulation_steps=4) == pytest.approx(1.6e-4)
    # 8 workers, accumulation 1, batch 8: lr x (8 x 1 x 8) / (4 x 4 x 1) = 4 x lr
    wider = parse(OptimSettings, {**linear, "batch_size": 8}, "optim")
    assert learning_rate(wider, world_size=8, accumulation_steps=1) == pytest.approx(6.4e-4)
    with pytest.raises(ConfigError, match="optim.reference"):
        parse(OptimSettings, {"lr": 1e-5, "lr_scaling": "linear", "batch_size": 4}, "optim")
    with pytest.raises(ConfigError, match="optim.lr_scaling='sqrt' is not one of"):
        parse(OptimSettings, {"lr": 1e-5, "lr_scaling": "sqrt", "batch_size": 4}, "optim")
    with pytest.raises(ConfigError, match="optim.reference.num_workers=0 must be at least 1"):
        parse(OptimSettings, {**linear, "reference": {**reference, "num_workers": 0}}, "optim")


def test_fedprox_term_is_zero_at_the_global_weights_and_pulls_toward_them():
    recs = records("mortality", 4, seed=4)
    batch = to_batch(recs)
    loss_fn = build_loss("mortality", LOSS_CFG, ClassWeights.from_counts(count_labels([batch])))
    model = frozen_model("mortality")
    global_params = [p.detach().clone() for p in model.parameters()]
    assert proximal_term(list(model.parameters()), global_params, mu=0.5).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    w0 = [p.detach().clone() for p in model.parameters()]

    plain, _ = sgd_update(copy.deepcopy(model), [batch], loss_fn)
    mu = 2.0
    prox, stats = sgd_update(
        copy.deepcopy(model), [batch], loss_fn, prox_mu=mu, global_params=global_params
    )
    # The proximal gradient is mu * (w - w_global): SGD adds exactly -lr * mu * (w - w_global).
    for d_prox, d_plain, w, g in zip(prox, plain, w0, global_params, strict=True):
        torch.testing.assert_close(d_prox - d_plain, -mu * (w - g), rtol=1e-4, atol=1e-6)
    expected = (
        0.5 * mu * sum(float((w - g).pow(2).sum()) for w, g in zip(w0, global_params, strict=True))
    )
    assert stats["loss/prox"] == pytest.approx(expected, rel=1e-5)

    with pytest.raises(ValueError, match="global_params"):
        train_epoch(
            model,
            [batch],
            torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn,
            device=DEVICE,
            prox_mu=0.1,
        )


def test_ddp_wrapped_model_trains_like_the_plain_model(tmp_path):
    recs = records("mortality", 6, seed=5, uniform=True)
    loss_fn = build_loss(
        "mortality", LOSS_CFG, ClassWeights.from_counts(count_labels([to_batch(recs)]))
    )
    batches = [to_batch(recs[:3]), to_batch(recs[3:])]
    base = frozen_model("mortality")
    plain, _ = sgd_update(copy.deepcopy(base), batches, loss_fn, accumulation_steps=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        wrapped, _ = sgd_update(ddp, batches, loss_fn, accumulation_steps=2)
    finally:
        dist.destroy_process_group()
    assert_same_update(wrapped, plain)


def test_training_lowers_the_loss_of_a_tiny_batch():
    batch = to_batch(records("disease_progression", 8, seed=6))
    loss_fn = build_loss(
        "disease_progression", LOSS_CFG, ClassWeights.from_counts(count_labels([batch]))
    )
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, "disease_progression")
    opt = build_optimizer(model, OptimSettings(lr=3e-3, batch_size=2, weight_decay=0.0))
    first = train_epoch(model, [batch], opt, loss_fn, device=DEVICE)["loss"]
    for _ in range(24):
        last = train_epoch(model, [batch], opt, loss_fn, device=DEVICE)["loss"]
    assert last < 0.5 * first


@pytest.mark.parametrize("task", vocab.TASKS)
def test_evaluate_returns_metrics_losses_and_predictions(task):
    recs = records(task, 10, seed=7)
    batches = [to_batch(recs[:6]), to_batch(recs[6:])]
    torch.manual_seed(0)
    model = build_model({**MODEL_CFG, "dropout": 0.1}, task)
    loss_fn = DiProLoss(
        task=task, weights=LossWeights.from_dict(LOSS_CFG), class_weights=ClassWeights.uniform()
    )
    model.train()
    metrics, preds = evaluate(model, batches, loss_fn, device=DEVICE)
    assert not model.training
    assert len(preds) == 10
    np.testing.assert_array_equal(preds.stay_id, [r["stay_id"] for r in recs])
    expected = {"disease_progression": "f1", "mortality": "auprc", "length_of_stay": "kappa"}[task]
    assert expected in metrics and "loss" in metrics and "loss/task" in metrics
    assert np.isfinite(metrics["loss"])
    again = predict(model, batches, device=DEVICE)
    np.testing.assert_allclose(again.logits, preds.logits, rtol=1e-6)  # eval mode: deterministic
    empty_metrics, empty = evaluate(model, [], device=DEVICE)
    assert len(empty) == 0 and empty.task == task
    counts = [k for k in empty_metrics if k.startswith("n_findings") or k.endswith("/n")]
    assert all(np.isnan(v) for k, v in empty_metrics.items() if k not in counts)


def test_amp_on_cpu_warns_and_runs_in_fp32(caplog):
    batch = to_batch(records("mortality", 3, seed=8))
    loss_fn = build_loss("mortality", LOSS_CFG, ClassWeights.from_counts(count_labels([batch])))
    model = frozen_model("mortality")
    with caplog.at_level(logging.WARNING, logger="dipro.engine"):
        metrics, preds = evaluate(model, [batch], loss_fn, device=DEVICE, amp_dtype="bf16")
    assert "CUDA only" in caplog.text
    assert preds.logits.dtype == np.float32
    assert isinstance(preds, Predictions)
    with pytest.raises(ValueError, match="amp dtype"):
        evaluate(model, [batch], device=DEVICE, amp_dtype="int8")

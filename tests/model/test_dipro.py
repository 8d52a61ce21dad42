"""The assembled model: output shapes, padding invariance, gradients of every parameter, the
ablation variants, the builder's config checks, and overfitting a tiny batch."""

from __future__ import annotations

import warnings
from dataclasses import fields

import pytest
import torch
from model_samples import batch_of, make_record, small_cfg

from dipro import vocab
from dipro.batch import Batch
from dipro.losses import ClassWeights, DiProLoss
from dipro.model import DiPro, DiProOutput, build_model
from dipro.settings import LossWeights

TASKS = vocab.TASKS
ALL_ONES = LossWeights(ce=1.0, orth=1.0, temp=1.0, static=1.0, dyn=1.0)


def _build(task: str, mode: str = "features", **ablation: bool) -> DiPro:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights", category=UserWarning)
        return build_model(small_cfg(mode, **ablation), task)


def _cxrs(task: str, n: int) -> int:
    return 2 if task == "disease_progression" else n


def _rows(out: DiProOutput, index: int, num_pairs: int) -> dict[str, torch.Tensor]:
    """The outputs of sample ``index`` restricted to its own ``num_pairs`` pairs."""
    rows = {}
    for f in fields(out):
        value = getattr(out, f.name)
        if value is None:
            continue
        value = value[index]
        if f.name not in ("logits", "region_attention"):
            value = value[:num_pairs]
        rows[f.name] = value
    return rows


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("task", TASKS)
def test_output_shapes(task: str) -> None:
    model = _build(task)
    batch = batch_of([make_record(1, task, _cxrs(task, 3)), make_record(2, task, _cxrs(task, 2))])
    out = model(batch)
    B, P, R, K = 2, batch.pair_mask.shape[1], vocab.NUM_REGIONS, vocab.NUM_FINDINGS
    expected = {"disease_progression": (B, K, 3), "mortality": (B,), "length_of_stay": (B, 4)}
    assert out.logits.shape == expected[task]
    for name in ("static", "dynamic", "static_rev"):
        assert getattr(out, name).shape == (B, P, R, 16)
    assert out.region_logits.shape == out.region_logits_rev.shape == (B, P, R, K, 3)
    assert out.pair_region_mask.shape == (B, P, R)
    assert out.region_attention.shape == (B, R)
    torch.testing.assert_close(out.region_attention.sum(-1), torch.ones(B))
    assert (out.region_attention >= 0).all()
    expected_mask = (
        batch.pair_mask[..., None] & batch.region_present[:, :-1] & batch.region_present[:, 1:]
    )
    assert torch.equal(out.pair_region_mask, expected_mask)


@pytest.mark.parametrize(
    ("case", "mode"),
    [
        ("padded_cxrs", "features"),
        ("padded_cxrs", "crops"),
        ("padded_ehr", "features"),
        ("batch_rows", "features"),
    ],
)
def test_padding_does_not_change_the_real_samples(case: str, mode: str) -> None:
    task = "mortality"
    sample = make_record(1, task, num_cxr=2, num_ehr=4, mode=mode)
    others = {
        "padded_cxrs": [make_record(2, task, num_cxr=4, num_ehr=4, mode=mode)],
        "padded_ehr": [make_record(3, task, num_cxr=2, num_ehr=11, mode=mode)],
        "batch_rows": [make_record(4, task, 2, 4, mode), make_record(5, task, 2, 4, mode)],
    }[case]
    model = _build(task, mode).eval()
    with torch.no_grad():
        alone = model(batch_of([sample]))
        mixed_batch = batch_of([*others, sample])
        mixed = model(mixed_batch)
    if case == "padded_cxrs":
        assert mixed_batch.pair_mask.shape[1] == 3
    if case == "padded_ehr":
        assert mixed_batch.ehr_mask.shape[1] == 11
    _assert_same(_rows(alone, 0, 1), _rows(mixed, len(others), 1))


def _assert_every_parameter_has_a_gradient(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        if name == "regions.missing":  # only region 0 of the first CXR is missing in the records
            assert p.grad[0].abs().sum() > 0, name
        else:
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def _train_step(model: DiPro, batch: Batch, task: str) -> torch.Tensor:
    model.train()
    loss, _ = DiProLoss(task=task, weights=ALL_ONES, class_weights=ClassWeights.uniform())(
        model(batch), batch
    )
    loss.backward()
    return loss


@pytest.mark.parametrize("mode", ["features", "crops"])
@pytest.mark.parametrize("task", TASKS)
def test_every_parameter_gets_a_gradient(task: str, mode: str) -> None:
    model = _build(task, mode)
    batch = batch_of([make_record(i, task, _cxrs(task, 2 + i), mode=mode) for i in range(3)])
    assert torch.isfinite(_train_step(model, batch, task))
    _assert_every_parameter_has_a_gradient(model)


@pytest.mark.parametrize(
    "switch", ["std", "pae", "local_fusion", "global_fusion", "ehr", "longitudinal"]
)
def test_each_ablation_is_a_trainable_variant(switch: str) -> None:
    task = "mortality"
    model = _build(task, **{switch: False})
    batch = batch_of([make_record(i, task, 2 + i) for i in range(3)])
    _train_step(model, batch, task)
    out = model.eval()(batch)
    assert out.logits.shape == (3,) and torch.isfinite(out.logits).all()
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    if switch == "std":
        assert out.static is None and out.dynamic is None and out.static_rev is None
        assert out.region_logits is not None
    if switch == "pae":
        assert "region_heads" not in names
        assert (
            out.region_logits is None and out.region_logits_rev is None and out.static_rev is None
        )
        assert out.static is not None
    if switch == "local_fusion":
        assert "local_fusion" not in names and "local_ehr" not in names
    if switch == "global_fusion":
        assert "global_fusion" not in names
    if switch == "ehr":
        assert not names & {"ehr", "local_ehr", "local_fusion", "global_fusion"}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient without {switch}"


def test_sample_without_ehr_hours_is_finite() -> None:
    task = "disease_progression"
    model = _build(task)
    batch = batch_of([make_record(1, task, 2, ehr_times=[]), make_record(2, task, 2, ehr_times=[])])
    assert not batch.ehr_mask.any()
    out = model(batch)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.region_attention).all()
    _train_step(model, batch, task)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cxr_only_model_ignores_the_ehr() -> None:
    model = _build("mortality", ehr=False).eval()
    record = make_record(1, "mortality", 3, num_ehr=5)
    other = dict(record, ehr_values=record["ehr_values"] + 3.0)
    torch.testing.assert_close(model(batch_of([record])).logits, model(batch_of([other])).logits)
    assert not torch.allclose(
        _build("mortality").eval()(batch_of([record])).logits,
        _build("mortality").eval()(batch_of([other])).logits,
    )


def test_last_cxr_only_model_sees_only_the_last_cxr() -> None:
    model = _build("mortality", longitudinal=False).eval()
    record = make_record(1, "mortality", num_cxr=4, num_ehr=40)
    earlier_changed = dict(record, features=record["features"].copy())
    earlier_changed["features"][:3] += 1.0  # every CXR but the last
    short = make_record(2, "mortality", num_cxr=2, num_ehr=40)
    with torch.no_grad():
        full = model(batch_of([short, record]))
        other = model(batch_of([short, earlier_changed]))
        longitudinal = _build("mortality").eval()
        seen_by_full_model = longitudinal(batch_of([short, record])).logits
        changed_for_full_model = longitudinal(batch_of([short, earlier_changed])).logits
    torch.testing.assert_close(full.logits, other.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.region_attention, other.region_attention)
    assert not torch.allclose(seen_by_full_model[1], changed_for_full_model[1])
    # the one token sits at the sample's last pair; the other pairs are empty
    assert full.pair_region_mask[1, :2].sum() == 0 and full.pair_region_mask[1, 2].any()
    assert full.region_logits[1, :2].abs().sum() == 0
    assert full.region_logits[0, 1:].abs().sum() == 0  # sample 0 has one pair


def test_builder_rejects_bad_configs() -> None:
    cfg = small_cfg()
    del cfg["num_heads"]
    with pytest.raises(ValueError, match="missing keys \\['num_heads'\\]"):
        build_model(cfg, "mortality")
    cfg = small_cfg()
    cfg["ablation"]["localfusion"] = False
    with pytest.raises(ValueError, match=r"unknown keys \['localfusion'\]"):
        build_model(cfg, "mortality")
    cfg = small_cfg()
    cfg["num_heads"] = 3
    with pytest.raises(ValueError, match="a multiple of model.num_heads=3"):
        build_model(cfg, "mortality")
    cfg = small_cfg()
    cfg["fusion_layers"] = 0
    with pytest.raises(ValueError, match="model.fusion_layers=0 must be at least 1"):
        build_model(cfg, "mortality")
    with pytest.raises(ValueError, match="unknown task"):
        build_model(small_cfg(), "sepsis")


def test_head_counts_come_from_the_config() -> None:
    cfg = small_cfg()
    cfg["num_heads"] = 4
    model = build_model(cfg, "mortality")
    attentions = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attentions and all(m.num_heads == 4 for m in attentions)


@pytest.mark.parametrize("task", TASKS)
def test_trains_under_bf16_autocast(task: str) -> None:
    model = _build(task)
    batch = batch_of([make_record(i, task, _cxrs(task, 2 + i)) for i in range(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    loss_fn = DiProLoss(task=task, weights=ALL_ONES, class_weights=ClassWeights.uniform())
    loss, _ = loss_fn(out, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _overfit(task: str, mode: str, steps: int, num_samples: int) -> tuple[float, float]:
    """Train on one tiny batch; the task loss of the first and of the last step."""
    cfg = small_cfg(mode)
    cfg.update(d_model=32, dropout=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights", category=UserWarning)
        model = build_model(cfg, task).train()
    records = [
        make_record(i, task, _cxrs(task, 2 + i % 2), mode=mode, crop_size=16)
        for i in range(num_samples)
    ]
    batch = batch_of(records)
    lambdas = LossWeights(ce=1.0, orth=0.1, temp=0.1, static=0.1, dyn=0.1)
    loss_fn = DiProLoss(task=task, weights=lambdas, class_weights=ClassWeights.uniform())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, parts = loss_fn(model(batch), batch)
        loss.backward()
        optimizer.step()
        history.append(parts["task"])
    return history[0], history[-1]


@pytest.mark.parametrize("task", TASKS)
def test_overfits_a_tiny_batch(task: str) -> None:
    first, last = _overfit(task, "features", steps=60, num_samples=4)
    assert last < first / 20, (first, last)


def test_overfits_a_tiny_batch_end_to_end_on_crops() -> None:
    first, last = _overfit("mortality", "crops", steps=30, num_samples=2)
    assert last < first / 5, (first, last)

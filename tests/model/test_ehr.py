"""EHR encoders: the sinusoidal positions, the interval attention mask of spec section 4, an
interval without EHR steps, and EHR padding."""

from __future__ import annotations

import math

import pytest
import torch

from dipro.model.ehr import (
    EHREncoder,
    LocalEHRAttention,
    interval_attention_mask,
    sinusoidal_embedding,
)


def test_sinusoidal_embedding_matches_formula() -> None:
    times = torch.tensor([[0.0, 1.5, 47.0]])
    pe = sinusoidal_embedding(times, 8)
    for j, t in enumerate(times[0].tolist()):
        for k in range(4):
            angle = t / 10000 ** (2 * k / 8)
            assert pe[0, j, 2 * k].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[0, j, 2 * k + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_interval_attention_mask_matches_reference() -> None:
    cxr_times = torch.tensor([[0.0, 4.0, 10.0], [2.0, 3.0, 0.0]])
    pair_mask = torch.tensor([[True, True], [True, False]])
    ehr_times = torch.tensor([[0.0, 1.0, 4.0, 7.0, 12.0], [0.0, 1.0, 2.0, 0.0, 0.0]])
    ehr_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    got = interval_attention_mask(cxr_times, pair_mask, ehr_times, ehr_mask)
    assert got.shape == (2, 2, 5)
    for b in range(2):
        for i in range(2):
            t0, t1 = cxr_times[b, i].item(), cxr_times[b, i + 1].item()
            for j in range(5):
                t = ehr_times[b, j].item()
                inside = pair_mask[b, i] and ehr_mask[b, j] and t0 <= t <= t1
                expected = -abs(t - (t0 + t1) / 2) if inside else -math.inf
                assert got[b, i, j].item() == expected, (b, i, j)
    # interval [2, 3] of sample 1 holds hour 2 only; its padded pair holds nothing
    assert torch.isfinite(got[1, 0, 2]) and not torch.isfinite(got[1, 0, :2]).any()


def test_interval_without_ehr_step_gives_zero_context_and_finite_gradients() -> None:
    torch.manual_seed(0)
    attn = LocalEHRAttention(d_model=8, num_heads=2)
    steps = torch.randn(1, 4, 8, requires_grad=True)
    ehr_times = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ehr_mask = torch.ones(1, 4, dtype=torch.bool)
    cxr_times = torch.tensor([[0.0, 2.5, 20.0]])  # the second interval, (2.5, 20], has hour 3 only
    cxr_times_empty = torch.tensor([[0.0, 3.5, 20.0]])  # the second interval has no EHR step
    pair_mask = torch.ones(1, 2, dtype=torch.bool)
    out, inside = attn(steps, ehr_times, ehr_mask, cxr_times_empty, pair_mask)
    assert out.shape == (1, 2, 4, 8)
    assert torch.isfinite(out).all()
    assert inside[0, 1].sum() == 0 and out[0, 1].abs().sum() == 0  # zero context
    assert out[0, 0].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(steps.grad).all()
    out2, inside2 = attn(steps, ehr_times, ehr_mask, cxr_times, pair_mask)
    assert inside2[0, 1].tolist() == [False, False, False, True] and out2[0, 1].abs().sum() > 0


def test_local_attention_only_sees_steps_inside_the_interval() -> None:
    torch.manual_seed(0)
    attn = LocalEHRAttention(d_model=8, num_heads=2).eval()
    steps = torch.randn(1, 6, 8)
    ehr_times = torch.arange(6.0).view(1, 6)
    cxr_times = torch.tensor([[1.0, 3.0]])
    ones = torch.ones(1, 6, dtype=torch.bool)
    out, _ = attn(steps, ehr_times, ones, cxr_times, ones[:, :1])
    changed = steps.clone()
    changed[0, [0, 4, 5]] = torch.randn(3, 8)  # steps outside [1, 3]
    out2, _ = attn(changed, ehr_times, ones, cxr_times, ones[:, :1])
    torch.testing.assert_close(out, out2)


def test_ehr_encoder_ignores_padded_steps() -> None:
    torch.manual_seed(0)
    enc = EHREncoder(
        num_variables=5, d_model=8, num_heads=2, num_layers=2, dropout=0.1, use_observed=True
    )
    enc.eval()
    values, observed = torch.randn(1, 3, 5), torch.rand(1, 3, 5) < 0.5
    times, mask = torch.tensor([[0.0, 1.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool)
    out, valid = enc(values, observed, times, mask)
    assert out.shape == (1, 4, 8) and valid.all()
    pad_values = torch.cat([values, 100 * torch.randn(1, 4, 5)], dim=1)
    pad_observed = torch.cat([observed, torch.ones(1, 4, 5, dtype=torch.bool)], dim=1)
    pad_times = torch.cat([times, torch.zeros(1, 4)], dim=1)
    pad_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    out2, valid2 = enc(pad_values, pad_observed, pad_times, pad_mask)
    assert valid2.tolist() == [[True] * 4 + [False] * 4]
    torch.testing.assert_close(out2[:, :4], out, atol=1e-5, rtol=1e-5)


def test_ehr_encoder_observed_flags_are_an_input() -> None:
    torch.manual_seed(0)
    enc = EHREncoder(
        num_variables=5, d_model=8, num_heads=2, num_layers=1, dropout=0.0, use_observed=True
    ).eval()
    values, times, mask = (
        torch.randn(1, 3, 5),
        torch.arange(3.0).view(1, 3),
        torch.ones(1, 3).bool(),
    )
    a, _ = enc(values, torch.zeros(1, 3, 5, dtype=torch.bool), times, mask)
    b, _ = enc(values, torch.ones(1, 3, 5, dtype=torch.bool), times, mask)
    assert not torch.allclose(a, b)
    assert (
        EHREncoder(
            num_variables=5, d_model=8, num_heads=2, num_layers=1, dropout=0.0, use_observed=False
        )
        .embed[0]
        .in_features
        == 5
    )

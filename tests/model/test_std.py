"""STD: the orthogonality and temporal-consistency losses against loop references, and
BatchNorm statistics that only valid tokens reach."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dipro.model.std import (
    Disentangler,
    orthogonality_loss,
    pair_tokens,
    temporal_consistency_loss,
)


def _random(B: int = 3, P: int = 4, R: int = 5, D: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    static = torch.randn(B, P, R, D, generator=g, dtype=torch.float64)
    dynamic = torch.randn(B, P, R, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, P, R, generator=g) < 0.6
    return static, dynamic, mask


def test_orthogonality_loss_matches_loop_reference() -> None:
    static, dynamic, mask = _random()
    s, d, m = static.numpy(), dynamic.numpy(), mask.numpy()
    terms = [
        (np.dot(s[b, i, r], d[b, i, r]) / (np.linalg.norm(s[b, i, r]) * np.linalg.norm(d[b, i, r])))
        ** 2
        for b, i, r in zip(*np.nonzero(m), strict=True)
    ]
    assert orthogonality_loss(static, dynamic, mask).item() == pytest.approx(np.mean(terms))


def test_orthogonality_loss_is_zero_for_orthogonal_and_one_for_parallel() -> None:
    e0 = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    e0[..., 0] = 2.0
    e1 = torch.zeros_like(e0)
    e1[..., 1] = 3.0
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    assert orthogonality_loss(e0, e1, mask).item() == pytest.approx(0.0)
    assert orthogonality_loss(e0, -5 * e0, mask).item() == pytest.approx(1.0)


def test_temporal_consistency_loss_matches_loop_reference() -> None:
    static, _, mask = _random(seed=1)
    s, m = static.numpy(), mask.numpy()
    B, P, R, D = s.shape
    terms = [
        np.sum((s[b, i, r] - s[b, i + 1, r]) ** 2) / D  # squared distance averaged over D
        for b in range(B)
        for i in range(P - 1)
        for r in range(R)
        if m[b, i, r] and m[b, i + 1, r]
    ]
    assert terms, "the random mask must leave consecutive valid pairs"
    assert temporal_consistency_loss(static, mask).item() == pytest.approx(np.mean(terms))


def test_temporal_consistency_loss_is_zero_without_consecutive_pairs() -> None:
    static, _, _ = _random(P=1)
    assert temporal_consistency_loss(static, torch.ones(3, 1, 5, dtype=torch.bool)).item() == 0.0
    static, _, _ = _random(P=3)
    alternate = torch.zeros(3, 3, 5, dtype=torch.bool)
    alternate[:, 0] = alternate[:, 2] = True  # never two consecutive valid pairs
    assert temporal_consistency_loss(static, alternate).item() == 0.0


def test_pair_tokens_concatenate_consecutive_cxrs() -> None:
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)  # [B, T, R, D]
    z = pair_tokens(feats)
    assert z.shape == (2, 2, 2, 4)
    torch.testing.assert_close(z[1, 1, 0], torch.cat([feats[1, 1, 0], feats[1, 2, 0]]))


def test_disentangler_batchnorm_ignores_invalid_tokens_in_training() -> None:
    torch.manual_seed(0)
    std = Disentangler(d_model=4, dropout=0.0).train()
    z = torch.randn(2, 3, 5, 8)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    valid[1, 2] = False  # a padded pair
    s1, d1 = std(z, valid)
    z2 = z.clone()
    z2[1, 2] = 1e3 * torch.randn(5, 8)  # garbage in the padded pair only
    s2, d2 = std(z2, valid)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(d1, d2)
    assert s1[1, 2].abs().sum() == 0 and d1[1, 2].abs().sum() == 0
    assert not math.isclose(s1[valid].std().item(), 0.0)


def test_projection_is_linear_gelu_linear_batchnorm_dropout() -> None:
    torch.manual_seed(1)
    std = Disentangler(d_model=4, dropout=0.0).train()
    z = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    std = std.double()
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    static, _ = std(z, valid)
    w1, w2 = std.static[0], std.static[2]
    rows = z.reshape(-1, 8)
    hidden = rows @ w1.weight.T + w1.bias  # [N, 16]
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    pre = gelu @ w2.weight.T + w2.bias  # [N, 4]
    # BatchNorm(D) over the token rows with batch statistics (biased variance), weight 1, bias 0
    ref = (pre - pre.mean(0)) / torch.sqrt(pre.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(static.reshape(-1, 4), ref)
    # normalised outputs: each feature has mean 0 and variance 1 over the valid tokens
    torch.testing.assert_close(static.reshape(-1, 4).mean(0), torch.zeros(4, dtype=torch.float64))

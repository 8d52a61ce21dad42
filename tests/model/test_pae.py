"""PAE: the half-swap reversal, reversed labels, the static-consistency and dynamic losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dipro import vocab
from dipro.model.pae import (
    RegionHeads,
    dynamic_loss,
    region_cross_entropy,
    reverse_labels,
    reverse_pair,
    static_consistency_loss,
)


def test_reversed_pair_is_second_half_then_first_half() -> None:
    first, second = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    z = torch.cat([first, second], dim=-1)
    torch.testing.assert_close(reverse_pair(z), torch.cat([second, first], dim=-1), rtol=0, atol=0)


def test_reversed_twice_is_identity() -> None:
    z = torch.randn(2, 3, 10, 16)
    assert torch.equal(reverse_pair(reverse_pair(z)), z)
    assert not torch.equal(reverse_pair(z), z)


def test_reverse_pair_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="even width"):
        reverse_pair(torch.zeros(2, 5))


def test_reversed_labels_swap_worsened_and_improved_only() -> None:
    codes = torch.tensor([vocab.WORSENED, vocab.IMPROVED, vocab.NO_CHANGE, vocab.NOT_MENTIONED])
    expected = torch.tensor([vocab.IMPROVED, vocab.WORSENED, vocab.NO_CHANGE, vocab.NOT_MENTIONED])
    assert torch.equal(reverse_labels(codes), expected)
    labels = torch.randint(0, 4, (2, 3, 10, 7))
    assert torch.equal(reverse_labels(reverse_labels(labels)), labels)
    assert torch.equal(
        reverse_labels(labels),
        torch.tensor([vocab.reverse_code(int(c)) for c in labels.flatten()]).view_as(labels),
    )


def test_static_consistency_is_mean_squared_error_with_stopped_target() -> None:
    static = torch.randn(2, 3, 4, 5, requires_grad=True)
    static_rev = torch.randn(2, 3, 4, 5, requires_grad=True)
    mask = torch.rand(2, 3, 4) < 0.7
    loss = static_consistency_loss(static, static_rev, mask)
    s, sr, m = static.detach().numpy(), static_rev.detach().numpy(), mask.numpy()
    ref = np.mean([np.mean((s[idx] - sr[idx]) ** 2) for idx in zip(*np.nonzero(m), strict=True)])
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert static_rev.grad is None  # stopgrad(S~)
    assert static.grad is not None and static.grad.abs().sum() > 0


def _weighted_ce_reference(logits, labels, mask, weight) -> float:
    """sum over k of sum_rows w_y * CE / sum_rows w_y over rows with mask and a label < 3."""
    lg, lb, m = logits.numpy(), labels.numpy(), mask.numpy()
    total = 0.0
    for k in range(lb.shape[-1]):
        num = den = 0.0
        for idx in zip(*np.nonzero(m), strict=True):
            y = lb[idx][k]
            if y == vocab.NOT_MENTIONED:
                continue
            row = lg[idx][k]
            ce = np.log(np.exp(row).sum()) - row[y]
            w = 1.0 if weight is None else weight[k, y]
            num += w * ce
            den += w
        total += num / den if den > 0 else 0.0
    return total


@pytest.mark.parametrize("weighted", [False, True])
def test_region_cross_entropy_matches_reference(weighted: bool) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 7, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 3, 4, 7), generator=g)
    labels[..., 6] = vocab.NOT_MENTIONED  # a finding with no labelled row adds 0
    mask = torch.rand(2, 3, 4, generator=g) < 0.7
    weight = torch.rand(7, 3, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    got = region_cross_entropy(logits, labels, mask, weight).item()
    ref = _weighted_ce_reference(logits, labels, mask, None if weight is None else weight.numpy())
    assert got == pytest.approx(ref, rel=1e-9)


def test_dynamic_loss_is_one_ce_over_original_and_reversed_rows() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 2, 4, 7, 3, generator=g, dtype=torch.float64)
    logits_rev = torch.randn(2, 2, 4, 7, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 2, 4, 7), generator=g)
    mask = torch.rand(2, 2, 4, generator=g) < 0.8
    weight = torch.rand(7, 3, generator=g, dtype=torch.float64) + 0.5
    lg, lg_rev, w, m = logits.numpy(), logits_rev.numpy(), weight.numpy(), mask.numpy()
    y, y_rev = labels.numpy(), reverse_labels(labels).numpy()
    # L_dyn = sum_k [sum_n w[k, y_n] ce_n] / [sum_n w[k, y_n]], n over the labelled rows of the
    # original pass (labels y) and of the reversed pass (labels rev(y)) together
    ref = 0.0
    for k in range(7):
        num = den = 0.0
        for rows, targets in ((lg, y), (lg_rev, y_rev)):
            for idx in zip(*np.nonzero(m), strict=True):
                c = targets[idx][k]
                if c == vocab.NOT_MENTIONED:
                    continue
                row = rows[idx][k]
                num += w[k, c] * (np.log(np.exp(row).sum()) - row[c])
                den += w[k, c]
        ref += num / den if den > 0 else 0.0
    assert dynamic_loss(logits, logits_rev, labels, mask, weight).item() == pytest.approx(ref)
    # half of the former sum of two CEs when both passes carry the same weight mass
    same = dynamic_loss(logits, logits, labels, mask, None).item()
    assert same == pytest.approx(
        0.5
        * (
            region_cross_entropy(logits, labels, mask).item()
            + region_cross_entropy(logits, reverse_labels(labels), mask).item()
        )
    )


def test_region_heads_one_head_per_finding() -> None:
    heads = RegionHeads(d_model=8, num_findings=7)
    dynamic = torch.randn(2, 3, 10, 8)
    out = heads(dynamic)
    assert out.shape == (2, 3, 10, 7, 3)
    with torch.no_grad():
        heads.heads[2][2].bias.add_(1.0)  # the last Linear of the head of finding 2
    changed = (heads(dynamic) - out).abs().amax(dim=(0, 1, 2, 4))  # [K]
    assert changed[2] > 0.5
    assert torch.all(changed[torch.arange(7) != 2] == 0)

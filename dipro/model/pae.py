"""Progression-aware enhancement, PAE (docs/model.md, "Progression-aware enhancement (PAE)").

The reversed pair swaps the two halves of z = [F[t_i, r] || F[t_{i+1}, r]]:

    z~ = [F[t_{i+1}, r] || F[t_i, r]],   S~ = f_s(z~),   Dy~ = f_d(z~)
    y^ = f_k(Dy),  y~ = f_k(Dy~)          K region heads f_k: Linear D->D, ReLU, Linear D->3
    L_dyn    = sum_k CE_w([y^_k ; y~_k], [y_k ; rev(y_k)])      one CE over both row sets
    L_static = mean ||S - stopgrad(S~)||^2 (mean over valid tokens and feature elements)

rev swaps worsened and improved and keeps no change; not mentioned (3) stays masked. CE_w is
the class-weighted cross-entropy of finding k over the labelled (pair, region) rows of the
original and the reversed pass together, sum(w[y_n] ce_n) / sum(w[y_n]), each row weighted by
the class it is labelled with (a reversed row labelled worsened has worsened's weight), as the
authors' model computes it.

| tensor                 | shape              | notes                                      |
|------------------------|--------------------|--------------------------------------------|
| z, z~                  | [..., 2D]          |                                            |
| Dy                     | [B, P, R, D]       |                                            |
| region logits y^, y~   | [B, P, R, K, 3]    |                                            |
| region labels y        | [B, P, R, K]       | codes 0..3, 3 = not mentioned              |
| mask                   | [B, P, R]          | True = valid (pair exists, region boxed)   |

Mask convention: True = valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dipro import vocab
from dipro.model.std import masked_mean


def reverse_pair(z: torch.Tensor) -> torch.Tensor:
    """z~ = [second half || first half] of the last axis; reverse_pair(reverse_pair(z)) == z."""
    if z.shape[-1] % 2:
        raise ValueError(f"a pair token has an even width, got {z.shape[-1]}")
    first, second = z.chunk(2, dim=-1)  # two [..., D]
    return torch.cat([second, first], dim=-1)


def reverse_labels(labels: torch.Tensor) -> torch.Tensor:
    """Progression codes of the reversed pair: worsened <-> improved; no change and 3 unchanged."""
    out = labels.clone()
    out[labels == vocab.WORSENED] = vocab.IMPROVED
    out[labels == vocab.IMPROVED] = vocab.WORSENED
    return out


class RegionHeads(nn.Module):
    """K heads f_k: dynamic tokens [..., D] -> region progression logits [..., K, 3]."""

    def __init__(self, *, d_model: int, num_findings: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d_model, d_model),
                nn.ReLU(),
                nn.Linear(d_model, vocab.NUM_PROGRESSION_CLASSES),
            )
            for _ in range(num_findings)
        )

    def forward(self, dynamic: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(dynamic) for head in self.heads], dim=-2)  # [..., K, 3]


def static_consistency_loss(
    static: torch.Tensor, static_rev: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """L_static: mean over valid tokens and elements of (S - stopgrad(S~))^2; S, S~ [B, P, R, D]."""
    sq = (static - static_rev.detach()).pow(2).mean(dim=-1)  # [B, P, R]
    return masked_mean(sq, mask)


def region_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k CE_w(logits[..., k, :], labels[..., k]) over rows with ``mask`` and a label != 3.

    logits [B, P, R, K, 3], labels [B, P, R, K], mask [B, P, R], class_weight [K, 3] or None.
    Each finding's CE is the weighted mean over its labelled rows, sum(w_y * ce) / sum(w_y) as
    in PyTorch's ``cross_entropy(weight=...)``; a finding without labelled rows adds 0.
    """
    labelled = mask.unsqueeze(-1) & (labels != vocab.NOT_MENTIONED)  # [B, P, R, K]
    target = torch.where(labelled, labels, torch.zeros_like(labels))  # [B, P, R, K], in 0..2
    ce = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view_as(
        target
    )  # [B, P, R, K]
    if class_weight is None:
        weight = labelled.to(ce.dtype)
    else:
        finding = torch.arange(target.shape[-1], device=target.device).expand_as(target)
        weight = class_weight.to(ce.dtype)[finding, target] * labelled  # [B, P, R, K]
    dims = tuple(range(ce.dim() - 1))
    per_finding = (weight * ce).sum(dims) / weight.sum(dims).clamp(min=1e-12)  # [K]
    return per_finding.sum()


def dynamic_loss(
    region_logits: torch.Tensor,
    region_logits_rev: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_dyn: per finding, one weighted cross-entropy over the rows of y^ (labels y) and of y~
    (labels rev(y)) together, summed over findings; each row is weighted by its own label's class.
    """
    logits = torch.cat([region_logits, region_logits_rev], dim=0)  # [2B, P, R, K, 3]
    targets = torch.cat([labels, reverse_labels(labels)], dim=0)  # [2B, P, R, K]
    return region_cross_entropy(logits, targets, mask.repeat(2, 1, 1), class_weight)

"""Spatiotemporal disentanglement, STD (docs/model.md, "Spatiotemporal disentanglement (STD)").

For pair i and region r, with z = [F[t_i, r] || F[t_{i+1}, r]] in R^{2D}:

    S[i, r]  = f_s(z)        static (patient anatomy)
    Dy[i, r] = f_d(z)        dynamic (change over the interval)
    f(z)     = Dropout(BN(W_2 GELU(W_1 z + b_1) + b_2))     W_1: 2D -> 4D, W_2: 4D -> D

    L_orth = mean over valid (i, r) of cos(S[i, r], Dy[i, r])^2
    L_temp = mean over valid (i, i+1, r) of mean_d (S[i, r, d] - S[i+1, r, d])^2

L_temp averages the squared distance over the D feature elements too (the authors' scale, for
which their lambda values were chosen); the sum ||.||^2 would be D times larger. It is zero when
no sample has two consecutive valid pairs (P < 2).

| tensor      | shape          | notes                                               |
|-------------|----------------|-----------------------------------------------------|
| F           | [B, T, R, D]   | region features                                     |
| z           | [B, P, R, 2D]  | P = T - 1                                           |
| valid       | [B, P, R]      | True = token of an existing pair                    |
| S, Dy       | [B, P, R, D]   | zero on invalid tokens                              |

f_s and f_d end in a BatchNorm over their D outputs, as in the authors' model: S and Dy are
normalised per feature, the scale on which the published lambdas of L_orth, L_temp and L_static
were tuned.

Mask convention: True = valid. BatchNorm sees the valid tokens only (gathered rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dipro.model.masks import TokenBatchNorm, apply_to_valid


def pair_tokens(features: torch.Tensor) -> torch.Tensor:
    """z = [F[t_i] || F[t_{i+1}]]: region features [B, T, R, D] -> pair tokens [B, T-1, R, 2D]."""
    return torch.cat([features[:, :-1], features[:, 1:]], dim=-1)


def projection(d_model: int, dropout: float) -> nn.Sequential:
    """One STD projection over token rows [N, 2D] -> [N, D]:
    Linear(2D, 4D) -> GELU -> Linear(4D, D) -> BatchNorm(D) -> Dropout."""
    return nn.Sequential(
        nn.Linear(2 * d_model, 4 * d_model),
        nn.GELU(),
        nn.Linear(4 * d_model, d_model),
        TokenBatchNorm(d_model),
        nn.Dropout(dropout),
    )


class Disentangler(nn.Module):
    """(S, Dy) = (f_s(z), f_d(z)) on the valid tokens: z [B, P, R, 2D] -> two [B, P, R, D]."""

    def __init__(self, *, d_model: int, dropout: float) -> None:
        super().__init__()
        self.static = projection(d_model, dropout)  # f_s
        self.dynamic = projection(d_model, dropout)  # f_d

    def forward(self, z: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_to_valid(self.static, z, valid), apply_to_valid(self.dynamic, z, valid)


class SharedProjection(nn.Module):
    """The STD ablation: one projection f(z) serves as both the static and the dynamic tokens."""

    def __init__(self, *, d_model: int, dropout: float) -> None:
        super().__init__()
        self.shared = projection(d_model, dropout)

    def forward(self, z: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = apply_to_valid(self.shared, z, valid)
        return x, x


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the True entries of ``mask`` (same shape); 0 when there are none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def orthogonality_loss(
    static: torch.Tensor, dynamic: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """L_orth: mean of cos(S, Dy)^2 over the True tokens of ``mask`` [B, P, R]; S, Dy [B,P,R,D]."""
    cos = F.cosine_similarity(static, dynamic, dim=-1, eps=1e-8)  # [B, P, R]
    return masked_mean(cos.pow(2), mask)


def temporal_consistency_loss(static: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_temp: mean over tokens valid in pairs i and i+1 of mean_d (S[i] - S[i+1])^2.

    static [B, P, R, D], mask [B, P, R]; 0 when P < 2 or no consecutive pair is valid.
    """
    if static.shape[1] < 2:
        return static.sum() * 0.0
    sq = (static[:, :-1] - static[:, 1:]).pow(2).mean(dim=-1)  # [B, P-1, R]
    return masked_mean(sq, mask[:, :-1] & mask[:, 1:])

"""Mask conversions for attention.

Mask convention of the project: True = valid / present. PyTorch's ``key_padding_mask`` wants the
opposite (True = pad); ``key_padding_mask`` below is the one place where the convention flips.

Rows of attention with no valid key would give NaN through softmax over all -inf; instead such
rows use a large finite negative score (``MASKED_SCORE``) and their output is set to zero by
``zero_rows_without_keys``: they receive a zero context, and gradients stay finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MASKED_SCORE = -1e9  # additive score of a masked key: exp(MASKED_SCORE - max) is 0 in float32/bf16


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """PyTorch ``key_padding_mask`` (True = pad) from a validity mask (True = valid); same shape."""
    if valid.dtype != torch.bool:
        raise TypeError(f"a validity mask must be bool, got {valid.dtype}")
    return ~valid


def additive_mask(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Float additive attention mask: ``scores`` where ``valid``, ``MASKED_SCORE`` elsewhere."""
    return torch.where(valid, scores, torch.full_like(scores, MASKED_SCORE))


def zero_rows_without_keys(out: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
    """Zero the attention outputs ``out`` [..., Lq, D] where ``has_key`` [..., Lq] is False."""
    return out * has_key.unsqueeze(-1).to(out.dtype)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over token rows [N, C]; with fewer than two rows in training it normalises with
    the running statistics (batch statistics of one row are undefined) and leaves them unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


@torch.compiler.disable(recursive=False)
def apply_to_valid(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Apply a row-wise ``fn`` [N, C] -> [N, C'] to the valid rows of ``x`` [..., C] only.

    valid [...] (True = valid) has x's leading shape. Invalid rows of the result are zero and never
    reach ``fn``, so padding cannot change BatchNorm statistics.

    N depends on the data, so under ``torch.compile`` this function's own gather and scatter run
    eagerly (a boolean index has no static shape to trace); ``fn`` is compiled as its own graph.
    """
    rows = x[valid]  # [N, C], N = valid.sum()
    y = fn(rows)  # [N, C']
    out = y.new_zeros(*valid.shape, y.shape[-1])  # [..., C']
    out[valid] = y
    return out

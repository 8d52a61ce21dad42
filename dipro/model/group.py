"""Static fusion with demographics through the group embedding, and the task heads
(docs/model.md, "Static fusion and task heads").

    GE(X)  = softmax(X W) Gm                       W: D x G, Gm: G x D, softmax over the G groups
    demo   = Dropout(ReLU(W_g g + b_g))            one demographic token from g in R^17
    c'     = LN(c + MHA(c, GE([S || demo]), GE([S || demo])))   static tokens of padded pairs masked
    logits = head_m(c'_m)                 head_m: Linear D->D, ReLU, Dropout, Linear D->out

W and Gm start Xavier-uniform, the attention has no dropout, and the heads drop out before their
last layer, as in the authors' model.

| tensor         | shape             | notes                                          |
|----------------|-------------------|------------------------------------------------|
| S              | [B, P*R, D]       | static tokens                                  |
| static_valid   | [B, P*R]          | True = token of an existing pair               |
| demographics   | [B, G_demo]       | G_demo = 17                                    |
| c, c'          | [B, C, D]         | task CLS outputs of the final fusion           |
| logits         | [B, C, out]       | C heads of ``out`` outputs each                |

Mask convention: True = valid.
"""

from __future__ import annotations

import torch
from torch import nn

from dipro.model.masks import key_padding_mask


class GroupEmbedding(nn.Module):
    """GE(X) = softmax(X W) Gm: tokens [..., D] -> [..., D] through G learned group vectors."""

    def __init__(self, *, d_model: int, num_groups: int) -> None:
        super().__init__()
        self.assign = nn.Linear(d_model, num_groups, bias=False)  # W: D x G
        self.groups = nn.Parameter(torch.empty(num_groups, d_model))  # Gm: G x D
        nn.init.xavier_uniform_(self.assign.weight)
        nn.init.xavier_uniform_(self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.assign(x), dim=-1) @ self.groups.to(x.dtype)


class StaticFusion(nn.Module):
    """c [B, C, D] attends to GE([S || demo]); residual + LayerNorm -> c' [B, C, D]."""

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        num_groups: int,
        num_demographics: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.demographics = nn.Sequential(
            nn.Linear(num_demographics, d_model), nn.ReLU(), nn.Dropout(dropout)
        )
        self.group = GroupEmbedding(d_model=d_model, num_groups=num_groups)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        cls: torch.Tensor,
        static: torch.Tensor,
        static_valid: torch.Tensor,
        demographics: torch.Tensor,
    ) -> torch.Tensor:
        demo = self.demographics(demographics.to(static.dtype)).unsqueeze(1)  # [B, 1, D]
        tokens = self.group(torch.cat([static, demo], dim=1))  # [B, P*R + 1, D]
        valid = torch.cat([static_valid, static_valid.new_ones(static.shape[0], 1)], dim=1)
        out, _ = self.attn(
            cls, tokens, tokens, key_padding_mask=key_padding_mask(valid), need_weights=False
        )  # [B, C, D]
        return self.norm(cls + out)


class TaskHeads(nn.Module):
    """One MLP head per task token: c' [B, C, D] -> logits [B, C, out]."""

    def __init__(self, *, d_model: int, num_tokens: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d_model, d_model),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(d_model, out_dim),
            )
            for _ in range(num_tokens)
        )

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(cls[:, m]) for m, head in enumerate(self.heads)], dim=1)

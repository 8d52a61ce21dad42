"""What ``DiPro.forward`` returns: task logits plus the tensors the auxiliary losses need."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DiProOutput:
    """B batch, P pairs, R regions, K findings, D model width, C = 3 progression classes.

    | field             | shape             | meaning                                             |
    |-------------------|-------------------|-----------------------------------------------------|
    | logits            | [B, K, C] / [B] / [B, 4] | progression / mortality / length of stay     |
    | static            | [B, P, R, D]      | S = f_s(z); None without STD                         |
    | dynamic           | [B, P, R, D]      | Dy = f_d(z); None without STD                        |
    | static_rev        | [B, P, R, D]      | S~ = f_s(z~) of the reversed pair; None without PAE  |
    | region_logits     | [B, P, R, K, C]   | y^ = f_k(Dy); None without PAE                       |
    | region_logits_rev | [B, P, R, K, C]   | y~ = f_k(Dy~); None without PAE                      |
    | pair_region_mask  | [B, P, R]         | True where the pair exists and the region has a box  |
    |                   |                   | on both CXRs; the auxiliary losses average over it   |
    | region_attention  | [B, R]            | attention of the task tokens over regions, for       |
    |                   |                   | reports; rows sum to 1                               |
    """

    logits: torch.Tensor
    static: torch.Tensor | None
    dynamic: torch.Tensor | None
    static_rev: torch.Tensor | None
    region_logits: torch.Tensor | None
    region_logits_rev: torch.Tensor | None
    pair_region_mask: torch.Tensor
    region_attention: torch.Tensor

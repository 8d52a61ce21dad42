"""CXR-EHR fusion of MMF (docs/model.md, "Local fusion", "Global fusion", "Final fusion").

    X^0 = Dy[i];  for n = 1 .. N_local:                                                 local
        (q, k_x, v_x) = W_x X^{n-1},  (k_e, v_e) = W_e E_local[i]
        X^n = LN(X^{n-1} + MHA(q, [k_e || k_x], [v_e || v_x]))
    Dy_fuse[i] = X^{N_local}
    H          = LN(E_global + MHA(E_global, Dy_fuse, Dy_fuse))                        global
    [c || . || .] = TransformerEncoder([task CLS || Dy_fuse || H])                      final

Local fusion stacks N_local layers (the authors' "transformer layers" // 2), each with its own
projections of the region tokens (W_x: D -> 3D) and of the interval's EHR tokens (W_e: D -> 2D)
ahead of the attention, as in the authors' region-aware attention. Its keys: the EHR steps inside
interval i (in_interval) and the R dynamic tokens of pair i (always valid, so no row is empty).
The attention modules have no dropout (the authors' MultiheadAttention default); the final
encoder's layers use the model dropout. The task CLS tokens start from N(0, 1). Global fusion
masks the tokens of padded pairs (the mask the authors accepted and never applied). The final
encoder masks padded pairs and EHR steps.

| tensor        | shape              | notes                                           |
|---------------|--------------------|-------------------------------------------------|
| Dy, Dy_fuse   | [B, P, R, D]       |                                                 |
| E_local       | [B, P, L, D]       |                                                 |
| in_interval   | [B, P, L]          | True = step j exists and lies in interval i     |
| E_global, H   | [B, N_e, D]        | N_e = 1 + L (EHR CLS token first)               |
| pair_mask     | [B, P]             | True = the pair exists                          |
| task CLS out  | [B, C, D]          | C task tokens (K for progression, else 1)       |
| region attn   | [B, C, P*R]        | last-layer attention of the task tokens         |

Mask convention: True = valid.
"""

from __future__ import annotations

import torch
from torch import nn

from dipro.model.masks import key_padding_mask


class LocalFusionLayer(nn.Module):
    """One local fusion layer: regions [N, R, D] attend to [EHR steps (L) || regions (R)].

    ``valid`` [N, L + R] marks the keys (True = valid).
    """

    def __init__(self, *, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.region_proj = nn.Linear(d_model, 3 * d_model)  # W_x
        self.ehr_proj = nn.Linear(d_model, 2 * d_model)  # W_e
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, regions: torch.Tensor, ehr: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        query, key_x, value_x = self.region_proj(regions).chunk(3, dim=-1)  # three [N, R, D]
        key_e, value_e = self.ehr_proj(ehr).chunk(2, dim=-1)  # two [N, L, D]
        out, _ = self.attn(
            query,
            torch.cat([key_e, key_x], dim=1),  # [N, L + R, D]
            torch.cat([value_e, value_x], dim=1),
            key_padding_mask=key_padding_mask(valid),
            need_weights=False,
        )  # [N, R, D]
        return self.norm(regions + out)


class LocalFusion(nn.Module):
    """Dy [B, P, R, D], E_local [B, P, L, D], in_interval [B, P, L] -> Dy_fuse [B, P, R, D]
    through ``num_layers`` stacked ``LocalFusionLayer``s."""

    def __init__(self, *, d_model: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LocalFusionLayer(d_model=d_model, num_heads=num_heads) for _ in range(num_layers)
        )

    def forward(
        self, dynamic: torch.Tensor, local_ehr: torch.Tensor, in_interval: torch.Tensor
    ) -> torch.Tensor:
        B, P, R, D = dynamic.shape
        L = local_ehr.shape[2]
        x = dynamic.reshape(B * P, R, D)
        ehr = local_ehr.reshape(B * P, L, D)
        valid = torch.cat([in_interval, in_interval.new_ones(B, P, R)], dim=2)  # [B, P, L+R]
        valid = valid.reshape(B * P, L + R)
        for layer in self.layers:
            x = layer(x, ehr, valid)
        return x.view(B, P, R, D)


class GlobalFusion(nn.Module):
    """E_global [B, N_e, D] attends to Dy_fuse tokens [B, P*R, D] (padded pairs masked) -> H."""

    def __init__(self, *, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, ehr: torch.Tensor, tokens: torch.Tensor, token_valid: torch.Tensor
    ) -> torch.Tensor:
        out, _ = self.attn(
            ehr, tokens, tokens, key_padding_mask=key_padding_mask(token_valid), need_weights=False
        )  # [B, N_e, D]
        return self.norm(ehr + out)


class FinalFusion(nn.Module):
    """TransformerEncoder over [task CLS (C) || dynamic tokens (N_d) || EHR tokens (N_e)].

    Returns the task CLS outputs [B, C, D] and the last layer's head-averaged attention of the
    task tokens over the dynamic tokens [B, C, N_d] (not differentiated; it feeds reports).
    """

    def __init__(
        self, *, d_model: int, num_heads: int, num_layers: int, num_tokens: int, dropout: float
    ) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, num_tokens, d_model))  # N(0, 1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, num_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        dynamic: torch.Tensor,
        dynamic_valid: torch.Tensor,
        ehr: torch.Tensor | None,
        ehr_valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N_d, _ = dynamic.shape
        C = self.cls.shape[1]
        parts = [self.cls.expand(B, -1, -1).to(dynamic.dtype), dynamic]
        valid = [dynamic_valid.new_ones(B, C), dynamic_valid]
        if ehr is not None and ehr_valid is not None:
            parts.append(ehr)
            valid.append(ehr_valid)
        x = torch.cat(parts, dim=1)  # [B, C + N_d (+ N_e), D]
        pad = key_padding_mask(torch.cat(valid, dim=1))
        x_last = x
        for layer in self.layers:
            x_last = x
            x = layer(x, src_key_padding_mask=pad)
        with torch.no_grad():
            _, weights = self.layers[-1].self_attn(
                x_last[:, :C],
                x_last,
                x_last,
                key_padding_mask=pad,
                need_weights=True,
                average_attn_weights=True,
            )  # [B, C, C + N_d (+ N_e)]
        return x[:, :C], weights[:, :, C : C + N_d]

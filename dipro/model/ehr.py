"""EHR encoders of the multiscale fusion, MMF (docs/model.md, "EHR encoders").

Global EHR (one sequence per sample):

    e_j      = Dropout(Dropout(LayerNorm(W_e x_j + b_e)) + PE(t_j))   PE: sinusoidal of hour t_j
    E_global = TransformerEncoder([cls || e_1 .. e_L])                EHR padding masked

x_j is the V values of hour j (the paper, the authors); ``use_observed=True`` feeds
[values_j || observed_j] (2V) instead, since the values are forward filled and only the observed
flags say which were measured that hour. cls ~ N(0, 1), as the authors initialise it.

Local EHR per interval i = [t_i, t_{i+1}] (queries: one per EHR step j, keys/values: the step
tokens of E_global):

    q[i, j]        = MLP(t_j - t_i, t_{i+1} - t_j, sigmoid((t_j - t_i)(t_{i+1} - t_j)))
    AttnMask[i, j] = -|t_j - (t_i + t_{i+1}) / 2|   if t_j in [t_i, t_{i+1}] (and step j exists)
                     -inf                            otherwise
    E_local[i]     = MHA(q[i], E_global, E_global, additive mask AttnMask[i])   (no dropout)

The MLP is Linear(3, D/2) -> GELU -> Linear(D/2, D), the authors' time encoder.

An interval that contains no EHR step has no key: its E_local rows are set to zero (a zero
context, no NaN), and the local fusion masks them out.

| tensor        | shape           | notes                                              |
|---------------|-----------------|----------------------------------------------------|
| ehr_values    | [B, L, V]       | z-scored                                           |
| ehr_observed  | [B, L, V]       | bool                                               |
| ehr_times     | [B, L]          | hours                                              |
| ehr_mask      | [B, L]          | True = the hour exists                             |
| cxr_times     | [B, T]          | hours                                              |
| pair_mask     | [B, P]          | True = the pair exists                             |
| E_global      | [B, 1 + L, D]   | token 0 is the EHR CLS token (always valid)        |
| E_local       | [B, P, L, D]    |                                                    |
| in_interval   | [B, P, L]       | True = step j exists and lies in interval i        |

Mask convention: True = valid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dipro.model.masks import additive_mask, key_padding_mask, zero_rows_without_keys


def sinusoidal_embedding(times: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(t)[2k] = sin(t / 10000^(2k/D)), PE(t)[2k+1] = cos(...): times [...] -> [..., D]."""
    if dim % 2:
        raise ValueError(f"the sinusoidal embedding needs an even width, got {dim}")
    freq = torch.exp(
        torch.arange(0, dim, 2, device=times.device, dtype=torch.float32) * (-math.log(1e4) / dim)
    )  # [D/2]
    angle = times.float().unsqueeze(-1) * freq  # [..., D/2]
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # [..., D], interleaved


def transformer_encoder(
    d_model: int, num_heads: int, num_layers: int, dropout: float
) -> nn.TransformerEncoder:
    """Post-norm TransformerEncoder with feed-forward 4D, batch first, no nested tensors."""
    layer = nn.TransformerEncoderLayer(
        d_model, num_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True
    )
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class EHREncoder(nn.Module):
    """Global EHR encoder: (values, observed, times, mask) -> E_global [B, 1+L, D], its mask."""

    def __init__(
        self,
        *,
        num_variables: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        dropout: float,
        use_observed: bool,
    ) -> None:
        super().__init__()
        self.use_observed = use_observed
        in_dim = 2 * num_variables if use_observed else num_variables
        self.embed = nn.Sequential(
            nn.Linear(in_dim, d_model), nn.LayerNorm(d_model), nn.Dropout(dropout)
        )
        self.position_dropout = nn.Dropout(dropout)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model))
        self.encoder = transformer_encoder(d_model, num_heads, num_layers, dropout)

    def forward(
        self,
        values: torch.Tensor,
        observed: torch.Tensor,
        times: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([values, observed.to(values.dtype)], dim=-1) if self.use_observed else values
        position = sinusoidal_embedding(times, self.cls.shape[-1]).to(x.dtype)  # [B, L, D]
        e = self.position_dropout(self.embed(x) + position)  # [B, L, D]
        B = e.shape[0]
        tokens = torch.cat([self.cls.expand(B, -1, -1).to(e.dtype), e], dim=1)  # [B, 1+L, D]
        valid = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # [B, 1+L]
        out = self.encoder(tokens, src_key_padding_mask=key_padding_mask(valid))
        return out, valid


def interval_attention_mask(
    cxr_times: torch.Tensor,
    pair_mask: torch.Tensor,
    ehr_times: torch.Tensor,
    ehr_mask: torch.Tensor,
) -> torch.Tensor:
    """AttnMask [B, P, L]: -|t_j - (t_i + t_{i+1})/2| for existing steps j of existing intervals i
    with t_i <= t_j <= t_{i+1}; -inf elsewhere."""
    start = cxr_times[:, :-1].unsqueeze(-1)  # [B, P, 1]
    end = cxr_times[:, 1:].unsqueeze(-1)  # [B, P, 1]
    t = ehr_times.unsqueeze(1)  # [B, 1, L]
    inside = (
        (t >= start) & (t <= end) & ehr_mask.unsqueeze(1) & pair_mask.unsqueeze(-1)
    )  # [B, P, L]
    score = -(t - (start + end) / 2).abs()  # [B, P, L]
    return score.masked_fill(~inside, float("-inf"))


class IntervalTimeEmbedding(nn.Module):
    """q[i, j] = MLP(t_j - t_i, t_{i+1} - t_j, sigmoid((t_j - t_i)(t_{i+1} - t_j))): [B,P,L,D]."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(3, d_model // 2), nn.GELU(), nn.Linear(d_model // 2, d_model)
        )

    def forward(self, cxr_times: torch.Tensor, ehr_times: torch.Tensor) -> torch.Tensor:
        since = ehr_times.unsqueeze(1) - cxr_times[:, :-1].unsqueeze(-1)  # [B, P, L]
        until = cxr_times[:, 1:].unsqueeze(-1) - ehr_times.unsqueeze(1)  # [B, P, L]
        feats = torch.stack([since, until, torch.sigmoid(since * until)], dim=-1)  # [B, P, L, 3]
        return self.mlp(feats)


class LocalEHRAttention(nn.Module):
    """E_local [B, P, L, D] and in_interval [B, P, L] from the step tokens of E_global [B, L, D]."""

    def __init__(self, *, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.time = IntervalTimeEmbedding(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)

    def forward(
        self,
        steps: torch.Tensor,
        ehr_times: torch.Tensor,
        ehr_mask: torch.Tensor,
        cxr_times: torch.Tensor,
        pair_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, D = steps.shape
        P = pair_mask.shape[1]
        spec_mask = interval_attention_mask(cxr_times, pair_mask, ehr_times, ehr_mask)  # [B, P, L]
        inside = torch.isfinite(spec_mask)  # [B, P, L]
        scores = additive_mask(spec_mask.nan_to_num(neginf=0.0), inside)  # finite [B, P, L]
        query = self.time(cxr_times, ehr_times).reshape(B * P, L, D).to(steps.dtype)
        kv = steps.unsqueeze(1).expand(B, P, L, D).reshape(B * P, L, D)
        attn_mask = (
            scores.reshape(B * P, 1, 1, L)
            .expand(B * P, self.num_heads, L, L)  # [B*P, H, Lq, Lk]: the same row for each query
            .reshape(B * P * self.num_heads, L, L)
            .to(steps.dtype)
        )
        out, _ = self.attn(query, kv, kv, attn_mask=attn_mask, need_weights=False)  # [B*P, L, D]
        has_key = inside.any(dim=-1).reshape(B * P, 1).expand(B * P, L)  # [B*P, Lq]
        out = zero_rows_without_keys(out, has_key)
        return out.view(B, P, L, D), inside

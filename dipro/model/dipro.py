"""DiPro assembled (docs/model.md): region features -> STD -> PAE -> MMF -> static
fusion -> task heads. ``build_model`` holds the numbers; ``DiPro`` receives built parts.

    F          = RegionEncoder(crops | features)                               [B, T, R, D]
    z          = [F[t_i] || F[t_{i+1}]],  z~ = reverse_pair(z)                  [B, P, R, 2D]
    S, Dy      = f_s(z), f_d(z);  S~, Dy~ = f_s(z~), f_d(z~)                    [B, P, R, D]
    y^, y~     = f_k(Dy), f_k(Dy~)                                              [B, P, R, K, 3]
    E_global   = EHREncoder(EHR)                                                [B, 1+L, D]
    E_local    = LocalEHRAttention(E_global, interval masks)                    [B, P, L, D]
    Dy_fuse    = LocalFusion(Dy, E_local)                                       [B, P, R, D]
    H          = GlobalFusion(E_global, Dy_fuse)                                [B, 1+L, D]
    c          = FinalFusion([task CLS || Dy_fuse || H])                        [B, C, D]
    c'         = StaticFusion(c, GE([S || demographics]))                       [B, C, D]
    logits     = TaskHeads(c')                        [B, K, 3] | [B] | [B, 4]

C task tokens: one per finding for progression (K heads of 3 logits), one for mortality and
length of stay. Mask convention: True = valid.

Ablations (``ModelConfig.ablation``), each a real variant:
- std=False: one shared projection f(z) feeds both the static and the dynamic paths; the output's
  static / dynamic / static_rev are None (no L_orth, L_temp, L_static).
- pae=False: no reversed pass and no region heads; static_rev and region logits are None.
- local_fusion=False: Dy_fuse = Dy (no interval EHR).  global_fusion=False: H = E_global.
- ehr=False: CXR-only; the EHR branch is not built, so the two fusions above are absent too and
  the final encoder runs over [task CLS || Dy].
- longitudinal=False: last-CXR-only; each sample keeps only its last CXR, given as a pair of that
  CXR with itself (z = [F_last || F_last], a zero interval): no change between two images is
  visible, and the EHR reaches the model through the global fusion only. The outputs keep the
  batch's P, the token at the sample's last pair and zeros (pair_region_mask False) elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dipro import vocab
from dipro.batch import Batch
from dipro.model.ehr import EHREncoder, LocalEHRAttention
from dipro.model.fusion import FinalFusion, GlobalFusion, LocalFusion
from dipro.model.group import StaticFusion, TaskHeads
from dipro.model.output import DiProOutput
from dipro.model.pae import RegionHeads, reverse_pair
from dipro.model.regions import BACKBONES, CropBackbone, RegionEncoder, build_backbone
from dipro.model.std import Disentangler, SharedProjection, pair_tokens
from dipro.settings import ModelConfig


def _gather_cxrs(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] gathered along dim 1 at index [B, n] -> [B, n, ...]."""
    view = index.view(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, view.expand(*index.shape, *x.shape[2:]))


def _scatter_pair(
    x: torch.Tensor | None, last: torch.Tensor, num_pairs: int
) -> torch.Tensor | None:
    """x [B, 1, ...] for each sample's last pair -> [B, num_pairs, ...], zeros elsewhere."""
    if x is None:
        return None
    out = x.new_zeros(x.shape[0], num_pairs, *x.shape[2:])
    out[torch.arange(x.shape[0], device=x.device), last] = x[:, 0]
    return out


class DiPro(nn.Module):
    """The DiPro model; ``forward(batch) -> DiProOutput`` (see the module docstring)."""

    def __init__(
        self,
        *,
        task: str,
        regions: RegionEncoder,
        std: Disentangler | SharedProjection,
        region_heads: RegionHeads | None,
        ehr: EHREncoder | None,
        local_ehr: LocalEHRAttention | None,
        local_fusion: LocalFusion | None,
        global_fusion: GlobalFusion | None,
        final_fusion: FinalFusion,
        static_fusion: StaticFusion,
        heads: TaskHeads,
        longitudinal: bool = True,
    ) -> None:
        super().__init__()
        if task not in vocab.TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(vocab.TASKS)}")
        if (local_ehr is None) != (local_fusion is None):
            raise ValueError("local EHR attention and local fusion go together")
        if ehr is None and (local_fusion is not None or global_fusion is not None):
            raise ValueError("local and global fusion need the EHR encoder")
        self.task = task
        self.regions = regions
        self.std = std
        self.region_heads = region_heads
        self.ehr = ehr
        self.local_ehr = local_ehr
        self.local_fusion = local_fusion
        self.global_fusion = global_fusion
        self.final_fusion = final_fusion
        self.static_fusion = static_fusion
        self.heads = heads
        self.longitudinal = longitudinal
        self.disentangled = isinstance(std, Disentangler)

    def forward(self, batch: Batch) -> DiProOutput:
        cxr_times, cxr_mask, pair_mask = batch.cxr_times, batch.cxr_mask, batch.pair_mask
        region_present, crops, features = batch.region_present, batch.crops, batch.features
        B, num_pairs = pair_mask.shape
        last = (cxr_mask.sum(dim=1) - 2).clamp(min=0)  # [B], first CXR of each sample's last pair
        if not self.longitudinal:
            index = torch.stack([last + 1, last + 1], dim=1)  # [B, 2]: the last CXR twice
            cxr_times = _gather_cxrs(cxr_times, index)  # [B, 2]
            cxr_mask = torch.ones_like(cxr_mask[:, :2])  # [B, 2]
            pair_mask = torch.ones_like(pair_mask[:, :1])  # [B, 1]
            region_present = _gather_cxrs(region_present, index)  # [B, 2, R]
            crops = None if crops is None else _gather_cxrs(crops, index)  # [B, 2, R, S, S]
            features = None if features is None else _gather_cxrs(features, index)  # [B, 2, R, F]

        feats = self.regions(region_present, cxr_mask, crops=crops, features=features)  # [B,T,R,D]
        z = pair_tokens(feats)  # [B, P, R, 2D]
        R = z.shape[2]
        token_valid = pair_mask.unsqueeze(-1).expand(-1, -1, R)  # [B, P, R]
        region_mask = token_valid & region_present[:, :-1] & region_present[:, 1:]  # [B, P, R]

        static_rev = region_logits = region_logits_rev = None
        if self.region_heads is not None:
            z_both = torch.cat([z, reverse_pair(z)], dim=0)  # [2B, P, R, 2D]: one BN batch
            static_both, dynamic_both = self.std(z_both, token_valid.repeat(2, 1, 1))
            static, static_rev = static_both.chunk(2, dim=0)  # two [B, P, R, D]
            dynamic, dynamic_rev = dynamic_both.chunk(2, dim=0)
            region_logits = self.region_heads(dynamic)  # [B, P, R, K, 3]
            region_logits_rev = self.region_heads(dynamic_rev)
        else:
            static, dynamic = self.std(z, token_valid)  # two [B, P, R, D]

        ehr_tokens = ehr_valid = None
        fused = dynamic  # [B, P, R, D]
        if self.ehr is not None:
            ehr_tokens, ehr_valid = self.ehr(
                batch.ehr_values, batch.ehr_observed, batch.ehr_times, batch.ehr_mask
            )  # [B, 1+L, D], [B, 1+L]
            if self.local_ehr is not None and self.local_fusion is not None:
                local, in_interval = self.local_ehr(
                    ehr_tokens[:, 1:], batch.ehr_times, batch.ehr_mask, cxr_times, pair_mask
                )  # [B, P, L, D], [B, P, L]
                fused = self.local_fusion(dynamic, local, in_interval)
        dyn_tokens = fused.flatten(1, 2)  # [B, P*R, D]
        dyn_valid = token_valid.flatten(1)  # [B, P*R]
        if self.global_fusion is not None and ehr_tokens is not None:
            ehr_tokens = self.global_fusion(ehr_tokens, dyn_tokens, dyn_valid)  # H [B, 1+L, D]

        cls, attn = self.final_fusion(dyn_tokens, dyn_valid, ehr_tokens, ehr_valid)
        cls = self.static_fusion(cls, static.flatten(1, 2), dyn_valid, batch.demographics)
        logits = self.heads(cls)  # [B, C, out]; progression keeps [B, K, 3]
        if self.task == "mortality":
            logits = logits.view(B)  # [B]
        elif self.task == "length_of_stay":
            logits = logits[:, 0]  # [B, 4]

        per_region = attn.reshape(B, attn.shape[1], -1, R).sum(dim=2).mean(dim=1)  # [B, R]
        region_attention = per_region / per_region.sum(dim=-1, keepdim=True).clamp(min=1e-12)

        if not self.longitudinal:
            static, dynamic, static_rev, region_logits, region_logits_rev, region_mask = (
                _scatter_pair(x, last, num_pairs)
                for x in (
                    static,
                    dynamic,
                    static_rev,
                    region_logits,
                    region_logits_rev,
                    region_mask,
                )
            )
        disentangled = self.disentangled
        return DiProOutput(
            logits=logits,
            static=static if disentangled else None,
            dynamic=dynamic if disentangled else None,
            static_rev=static_rev if disentangled else None,
            region_logits=region_logits,
            region_logits_rev=region_logits_rev,
            pair_region_mask=region_mask,
            region_attention=region_attention,
        )


def build_model(
    model_cfg: Mapping[str, Any] | ModelConfig, task: str, *, seed: int | None = None
) -> DiPro:
    """Build DiPro for ``task`` from the model config (``ModelConfig``, or the mapping of
    configs/model/dipro.yaml after the task's overrides). In crops mode the backbone weights come
    from the local file ``pretrained_weights``; without one a warning says that the backbone
    starts random.

    ``seed``: torch's generator is seeded with it first, so every process that builds the run's
    model (each Ray Train worker, the federated server, each site) holds the same initial
    weights; the site-local layers of federated learning rely on it."""
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    if seed is not None:
        torch.manual_seed(seed)
    ablation = cfg.ablation
    D, heads, dropout = cfg.d_model, cfg.num_heads, cfg.dropout
    R, K = vocab.NUM_REGIONS, vocab.NUM_FINDINGS
    if cfg.region_mode == "crops":
        if cfg.pretrained_weights is None:
            warnings.warn(
                f"model config: no pretrained_weights given; the {cfg.backbone} backbone starts "
                "from random weights (set model.pretrained_weights to a local torchvision state "
                "dict file to start from pretrained ones)",
                UserWarning,
                stacklevel=2,
            )
        backbone = CropBackbone(build_backbone(cfg.backbone, cfg.pretrained_weights))
        regions = RegionEncoder(
            backbone=backbone,
            in_dim=BACKBONES[cfg.backbone],
            d_model=D,
            num_regions=R,
            dropout=dropout,
        )
    else:
        regions = RegionEncoder(
            backbone=None, in_dim=cfg.feature_dim, d_model=D, num_regions=R, dropout=dropout
        )

    projection = Disentangler if ablation.std else SharedProjection
    std = projection(d_model=D, dropout=dropout)
    ehr = local_ehr = local_fusion = global_fusion = None
    if ablation.ehr:
        ehr = EHREncoder(
            num_variables=vocab.NUM_EHR,
            d_model=D,
            num_heads=heads,
            num_layers=cfg.ehr_layers,
            dropout=dropout,
            use_observed=cfg.ehr_use_observed,
        )
        if ablation.local_fusion:
            local_ehr = LocalEHRAttention(d_model=D, num_heads=heads)
            local_fusion = LocalFusion(
                d_model=D, num_heads=heads, num_layers=cfg.local_fusion_layers
            )
        if ablation.global_fusion:
            global_fusion = GlobalFusion(d_model=D, num_heads=heads)

    num_tokens = K if task == "disease_progression" else 1
    out_dim = vocab.task_output_dim(task) // num_tokens
    return DiPro(
        task=task,
        regions=regions,
        std=std,
        region_heads=RegionHeads(d_model=D, num_findings=K) if ablation.pae else None,
        ehr=ehr,
        local_ehr=local_ehr,
        local_fusion=local_fusion,
        global_fusion=global_fusion,
        final_fusion=FinalFusion(
            d_model=D,
            num_heads=heads,
            num_layers=cfg.fusion_layers,
            num_tokens=num_tokens,
            dropout=dropout,
        ),
        static_fusion=StaticFusion(
            d_model=D,
            num_heads=heads,
            num_groups=cfg.num_groups,
            num_demographics=vocab.NUM_DEMOGRAPHICS,
            dropout=dropout,
        ),
        heads=TaskHeads(d_model=D, num_tokens=num_tokens, out_dim=out_dim, dropout=dropout),
        longitudinal=ablation.longitudinal,
    )

"""Region features F[t, r] (docs/model.md, "Region features").

    F[t, r] = Dropout(ReLU(BN(W_a . phi(crop_{t,r}) + b_a)))   if region r has a box on CXR t
    F[t, r] = e_r                                            otherwise (no box, or padded CXR)

phi is a torchvision ResNet (classification layer removed) run on the region crops ("crops"
mode), or the identity on region features stored by a frozen backbone ("features" mode); e_r is
a learned per-region embedding.

| tensor          | shape            | notes                                          |
|-----------------|------------------|------------------------------------------------|
| crops           | [B, T, R, S, S]  | uint8 grayscale, crops mode                    |
| features        | [B, T, R, F_in]  | float, features mode                           |
| region_present  | [B, T, R]        | True = the region has a box                    |
| cxr_mask        | [B, T]           | True = the CXR exists                          |
| output F        | [B, T, R, D]     |                                                |

Mask convention: True = valid. The backbone and the adapter see only the present crops of valid
CXRs (gathered, run, scattered back), so padding neither costs compute nor changes BatchNorm
statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from dipro.model.masks import TokenBatchNorm, apply_to_valid

BACKBONES: dict[str, int] = {"resnet50": 2048, "resnet18": 512}  # name -> feature width
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_backbone(name: str, weights_path: str | None) -> nn.Module:
    """A torchvision ResNet without its classification layer: [N, 3, S, S] -> [N, BACKBONES[name]].

    Weights come only from ``weights_path`` (a torchvision state dict saved with ``torch.save``),
    never from the network; ``None`` leaves them random. A wrong path or a state dict that does
    not fit the architecture raises an error naming the path.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    net = getattr(torchvision.models, name)(weights=None)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_weights: no file at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"pretrained_weights: {path} is not a readable state dict: {err}"
            ) from err
        if not isinstance(state, dict):
            raise ValueError(
                f"pretrained_weights: {path} holds a {type(state).__name__}, not a state dict"
            )
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"pretrained_weights: {path} does not fit a torchvision {name}: {err}"
            ) from err
    net.fc = nn.Identity()
    return net


class CropBackbone(nn.Module):
    """uint8 grayscale crops [N, S, S] -> features [N, F_in] through a ResNet.

    Pixels are scaled to [0, 1], replicated to 3 channels (so ImageNet weights apply unchanged) and
    normalised with the ImageNet mean and standard deviation. This is the one normalisation of
    crops, and it runs on the model's device: crops travel there as uint8 (a quarter of the bytes
    of float32).

    ``to_channels_last`` stores the ResNet's 4-D weights and lays its input out as NHWC
    (``torch.channels_last``); the values are the same, only the memory order changes.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.contiguous_format

    def to_channels_last(self) -> CropBackbone:
        """Weights and input of the ResNet in NHWC order (in place; returns the module)."""
        self.net.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        return self

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.unsqueeze(1).to(self.mean.dtype) / 255.0  # [N, 1, S, S]
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # [N, 3, S, S]
        return self.net(x.contiguous(memory_format=self.memory_format))


class RegionEncoder(nn.Module):
    """Region features F [B, T, R, D] from crops or stored features (see the module docstring).

    ``backbone`` is a ``CropBackbone`` in crops mode and ``None`` in features mode.
    """

    def __init__(
        self,
        *,
        backbone: CropBackbone | None,
        in_dim: int,
        d_model: int,
        num_regions: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = nn.Sequential(
            nn.Linear(in_dim, d_model), TokenBatchNorm(d_model), nn.ReLU(), nn.Dropout(dropout)
        )
        self.missing = nn.Parameter(torch.randn(num_regions, d_model) * 0.02)  # e_r [R, D]

    def forward(
        self,
        region_present: torch.Tensor,
        cxr_mask: torch.Tensor,
        crops: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        valid = region_present & cxr_mask.unsqueeze(-1)  # [B, T, R]
        if self.backbone is not None:
            if crops is None:
                raise ValueError("the region encoder runs on crops, but the batch has no crops")

            def encode(rows: torch.Tensor) -> torch.Tensor:  # [N, S*S] -> [N, D]
                side = int(round(rows.shape[-1] ** 0.5))
                return self.adapter(self.backbone(rows.view(-1, side, side)))

            flat = crops.flatten(-2)  # [B, T, R, S*S]
            encoded = apply_to_valid(encode, flat, valid)  # [B, T, R, D]
        else:
            if features is None:
                raise ValueError(
                    "the region encoder runs on stored features, but the batch has none"
                )
            encoded = apply_to_valid(self.adapter, features, valid)  # [B, T, R, D]
        # torch.where keeps e_r in the graph even when every region is present.
        return torch.where(valid.unsqueeze(-1), encoded, self.missing.to(encoded.dtype))

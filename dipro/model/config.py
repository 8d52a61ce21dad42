"""The model's settings (``configs/model/dipro.yaml`` after a task preset) as a checked value.

``ModelConfig.from_dict`` takes exactly the keys below, checks what the network needs to be
built (a checkpoint's stored model config is read the same way, without Hydra), and
``to_dict`` gives back the mapping that checkpoints store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from dipro.config import check_exact_keys

REGION_MODES = ("crops", "features")


@dataclass(frozen=True, kw_only=True)
class Ablation:
    """Which components are built (docs/model.md, "Ablations"); False turns one off."""

    std: bool = True
    pae: bool = True
    local_fusion: bool = True
    global_fusion: bool = True
    ehr: bool = True
    longitudinal: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ablation:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(
                f"model config: ablation has keys {sorted(data)}, expected {sorted(names)}"
            )
        return cls(**{name: bool(data[name]) for name in names})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The architecture's numbers; the docstring of ``configs/model/dipro.yaml`` says each."""

    region_mode: str
    backbone: str
    pretrained_weights: str | None
    feature_dim: int
    d_model: int
    num_heads: int
    ehr_layers: int
    local_fusion_layers: int
    fusion_layers: int
    num_groups: int
    dropout: float
    ehr_use_observed: bool
    ablation: Ablation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Exactly the fields of this class; a missing or unknown key, a region mode other
        than crops/features, a width that the heads do not divide, a depth below one or a
        dropout outside [0, 1) is a ValueError naming it."""
        check_exact_keys("model", data, [f.name for f in fields(cls)])
        weights = data["pretrained_weights"]
        cfg = cls(
            region_mode=str(data["region_mode"]),
            backbone=str(data["backbone"]),
            pretrained_weights=None if weights is None else str(weights),
            feature_dim=int(data["feature_dim"]),
            d_model=int(data["d_model"]),
            num_heads=int(data["num_heads"]),
            ehr_layers=int(data["ehr_layers"]),
            local_fusion_layers=int(data["local_fusion_layers"]),
            fusion_layers=int(data["fusion_layers"]),
            num_groups=int(data["num_groups"]),
            dropout=float(data["dropout"]),
            ehr_use_observed=bool(data["ehr_use_observed"]),
            ablation=Ablation.from_dict(data["ablation"]),
        )
        cfg._check()
        return cfg

    def _check(self) -> None:
        if self.region_mode not in REGION_MODES:
            raise ValueError(
                f"model config: region_mode {self.region_mode!r} is not crops/features"
            )
        for key in (
            "d_model",
            "num_heads",
            "ehr_layers",
            "local_fusion_layers",
            "fusion_layers",
            "num_groups",
        ):
            if getattr(self, key) < 1:
                raise ValueError(
                    f"model config: {key} must be at least 1, got {getattr(self, key)}"
                )
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ValueError(
                f"model config: d_model {self.d_model} must be even and divisible by num_heads "
                f"{self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model config: dropout {self.dropout} is not in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping ``from_dict`` reads (what checkpoints store)."""
        return asdict(self)

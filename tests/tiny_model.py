"""The tiny model of ``configs/experiment/tiny.yaml`` as a plain model config, for the tests
that build a model without composing a whole run config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The tiny model's backbone is random on purpose (a test has no weights file): build_model's
# warning that says so to a user is expected where a test builds it.
RANDOM_BACKBONE_EXPECTED = pytest.mark.filterwarnings(
    "ignore:model config. no pretrained_weights:UserWarning"
)


def tiny_model_cfg(**changes: Any) -> dict[str, Any]:
    """``configs/model/dipro.yaml`` with the tiny experiment's model settings and ``changes``."""
    base = OmegaConf.load(CONFIGS / "model" / "dipro.yaml")
    tiny = OmegaConf.load(CONFIGS / "experiment" / "tiny.yaml")["model"]
    cfg = OmegaConf.to_container(OmegaConf.merge(base, tiny), resolve=True)
    unknown = set(changes) - set(cfg)
    if unknown:
        raise KeyError(f"not model settings: {sorted(unknown)}")
    return {**cfg, **changes}

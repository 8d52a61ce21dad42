"""The DiPro model: ``build_model(model_cfg, task)`` and ``DiPro.forward(batch) -> DiProOutput``."""

from dipro.model.dipro import DiPro, build_model
from dipro.model.output import DiProOutput
from dipro.settings import ModelConfig

__all__ = ["DiPro", "DiProOutput", "ModelConfig", "build_model"]

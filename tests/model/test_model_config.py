"""ModelConfig: what the network is built from, read the same way from Hydra and checkpoints."""

from __future__ import annotations

import pytest
from tiny_model import tiny_model_cfg

from dipro.model import ModelConfig, build_model


def test_the_shipped_model_config_round_trips():
    cfg = ModelConfig.from_dict(tiny_model_cfg(region_mode="features", feature_dim=8))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.ablation.std and cfg.d_model == 16 and cfg.ehr_layers == 1
    assert build_model(cfg, "mortality").task == "mortality"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"d_model": 18, "num_heads": 4},
            "model.d_model=18 must be even and a multiple of model.num_heads=4",
        ),
        ({"local_fusion_layers": 0}, "model.local_fusion_layers=0 must be at least 1"),
        ({"dropout": 1.0}, "model.dropout=1.0 must be below 1.0"),
        ({"region_mode": "pixels"}, r"model.region_mode='pixels' is not one of 'crops' \| 'feat"),
    ],
)
def test_a_model_that_cannot_be_built_is_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(tiny_model_cfg(**changes))


def test_missing_unknown_and_ablation_keys_are_named():
    cfg = tiny_model_cfg()
    del cfg["ehr_layers"]
    with pytest.raises(ValueError, match=r"missing keys \['ehr_layers'\], unknown keys \[\]"):
        ModelConfig.from_dict({**cfg})
    with pytest.raises(ValueError, match=r"unknown keys \['num_layers'\]"):
        ModelConfig.from_dict({**tiny_model_cfg(), "num_layers": 2})
    bad = tiny_model_cfg()
    bad["ablation"] = {**bad["ablation"], "fusion": False}
    with pytest.raises(ValueError, match=r"model.ablation config: .* unknown keys \['fusion'\]"):
        ModelConfig.from_dict(bad)

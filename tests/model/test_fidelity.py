"""The defaults build the model the authors' code ran (docs/fidelity.md): depths per task, the
EHR input, token initialisation and where dropout sits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dipro import vocab
from dipro.model import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
AUTHORS_TRANSFORMER_LAYERS = {"disease_progression": 2, "mortality": 4, "length_of_stay": 2}


def preset_model(task: str) -> nn.Module:
    cfg = yaml.safe_load((CONFIGS / "model" / "dipro.yaml").read_text())
    cfg.update(yaml.safe_load((CONFIGS / "task" / f"{task}.yaml").read_text())["model"])
    cfg.update(region_mode="features", feature_dim=32)
    return build_model(cfg, task)


@pytest.mark.parametrize("task", vocab.TASKS)
def test_preset_depths_and_ehr_input_are_the_authors(task: str) -> None:
    model = preset_model(task)
    assert len(model.ehr.encoder.layers) == 1  # their EHR encoder: always one layer
    assert len(model.local_fusion.layers) == AUTHORS_TRANSFORMER_LAYERS[task] // 2
    assert len(model.final_fusion.layers) == 1
    assert model.ehr.embed[0].in_features == vocab.NUM_EHR  # the V values, not 2V


def test_tokens_start_standard_normal_and_attention_has_no_dropout() -> None:
    torch.manual_seed(0)
    model = preset_model("disease_progression")
    tokens = torch.cat([model.final_fusion.cls.flatten(), model.ehr.cls.flatten()])
    # N(0, 1): 7 x 256 + 256 draws, so the sample std is 1 within a few percent
    assert tokens.std().item() == pytest.approx(1.0, abs=0.06)
    assert tokens.mean().item() == pytest.approx(0.0, abs=0.08)
    for attn in (
        model.local_ehr.attn,
        model.global_fusion.attn,
        model.static_fusion.attn,
        *(layer.attn for layer in model.local_fusion.layers),
    ):
        assert attn.dropout == 0.0


def test_task_heads_drop_out_before_their_last_layer() -> None:
    model = preset_model("mortality").train()
    head = model.heads.heads[0]
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[2].p == pytest.approx(0.1)
    x = torch.randn(64, 256)
    torch.manual_seed(1)
    out = head(x)
    # the formula with the same dropout mask: W_2 (mask * ReLU(W_1 x + b_1) / (1 - p)) + b_2
    torch.manual_seed(1)
    hidden = torch.relu(x @ head[0].weight.T + head[0].bias)
    keep = torch.nn.functional.dropout(torch.ones_like(hidden), p=0.1, training=True)
    torch.testing.assert_close(out, (hidden * keep) @ head[3].weight.T + head[3].bias)

"""Strategies from the config, and FedAdam's server state through the project's checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)

from dipro import checkpoint as ckpt_io
from federated.config import ConfigError, parse_run
from federated.simulate import run_federated
from federated.strategy import ServerOptimizerState, build_strategy


def strategy_of(cfg):
    run = parse_run(cfg)
    return build_strategy(run.strategy, run.federated, site_lr=run.optim.lr, seed=run.seed)


@pytest.mark.parametrize(
    ("name", "kind"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)]
)
def test_strategy_from_config(tiny_data_root, tmp_path, name, kind):
    cfg = compose(tiny_data_root, tmp_path, f"strategy={name}", "federated.min_sites=3")
    base, quorum = strategy_of(cfg)
    assert type(base) is kind and quorum.strategy is base and quorum.min_sites == 3
    assert base.min_train_nodes == base.min_available_nodes == 3
    if name == "fedprox":
        assert base.proximal_mu == cfg["strategy"]["proximal_mu"] > 0


def test_dp_wraps_the_strategy_with_client_side_clipping(tiny_data_root, tmp_path):
    cfg = compose(
        tiny_data_root, tmp_path, "federated.dp.enabled=true", "federated.dp.clipping_norm=2.5"
    )
    base, quorum = strategy_of(cfg)
    assert isinstance(quorum.strategy, DifferentialPrivacyClientSideFixedClipping)
    assert quorum.strategy.strategy is base and quorum.strategy.clipping_norm == 2.5


def test_fedadam_moments_survive_a_checkpoint(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path, "strategy=fedadam")
    base, _ = strategy_of(cfg)
    rng = np.random.default_rng(0)
    base.m_t = {"a.weight": rng.normal(size=(3, 2)).astype(np.float32)}
    base.v_t = {"a.weight": rng.random((3, 2)).astype(np.float32)}
    path = tmp_path / "last.pt"
    ckpt_io.save_checkpoint(
        path,
        torch.nn.Linear(2, 3),
        model_cfg={},
        task="mortality",
        optimizer=ServerOptimizerState(base),
    )

    restored, _ = strategy_of(cfg)
    ServerOptimizerState(restored).load_state_dict(
        ckpt_io.read_checkpoint(path)["training"]["optimizer"]
    )
    np.testing.assert_array_equal(restored.m_t["a.weight"], base.m_t["a.weight"])
    np.testing.assert_array_equal(restored.v_t["a.weight"], base.v_t["a.weight"])
    other, _ = strategy_of(compose(tiny_data_root, tmp_path, "strategy=fedavg"))
    with pytest.raises(ValueError, match="FedAdam"):
        ServerOptimizerState(other).load_state_dict(
            ckpt_io.read_checkpoint(path)["training"]["optimizer"]
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federated.num_rounds=0", "num_rounds"),
        ("federated.fraction_train=0", "fraction_train"),
        ("federated.fraction_evaluate=0", "nothing would score the rounds"),
        ("data.root=/nonexistent/shards", "data.root: .*/nonexistent/shards"),
        ("server.eval_data=/nonexistent/held-out", "server.eval_data: .*/nonexistent/held-out"),
        ("model.region_mode=features", "data.root.* stores crops"),
    ],
)
def test_bad_config_fails_before_any_site_is_contacted(tiny_data_root, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_federated(compose(tiny_data_root, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()

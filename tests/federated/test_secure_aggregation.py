"""Secure aggregation (SecAgg+, ``federated.secure``): the secure round's global model is plain
FedAvg's up to quantisation, a site that fails while training (after the keys were shared)
leaves the round complete and its details in its own log, site-local layers stay local, and
settings the protocol cannot run are refused before any site is contacted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TASK, compose

from dipro import checkpoint as ckpt_io
from dipro.config import ConfigError
from dipro.data.layout import read_manifest
from federated.config import parse_run
from federated.secure import quantisation_error
from federated.simulate import run_federated

SECURE = ["federated.secure.enabled=true", "federated.secure.max_weight=100"]
# hospital 1 fails while training: after SecAgg+'s setup and key sharing, before its masked update
DROPOUT = ["+federated.fail_at={hospital: 1, round: 1}", "federated.local.batch_norm=true"]


def _round(out: Path) -> dict:
    (line,) = (out / "round_metrics.jsonl").read_text().splitlines()
    return json.loads(line)


@pytest.mark.slow
def test_a_secure_round_with_a_dropout_is_fedavg_up_to_quantisation(tiny_data_root, tmp_path):
    common = ["federated.num_rounds=1", "simulation.timeout_s=900", *DROPOUT]
    plain = run_federated(compose(tiny_data_root, tmp_path / "plain", *common))
    cfg = compose(tiny_data_root, tmp_path / "secure", *common, *SECURE)
    secure = run_federated(cfg)

    for out in (tmp_path / "plain", tmp_path / "secure"):
        sites = _round(out)["sites"]
        # the fault is in training only: the failing site still scores the round
        assert (sites["sampled"], sites["updated"], sites["evaluated"]) == (3, 2, 3)
        assert [f["reason"] for f in sites["train_failures"]] == ["site failed: injected-fault"]
        # the server logs the failure's category; its details stay in the site's own log
        log = (out / "simulation.log").read_text()
        assert "failed to train: site failed: injected-fault" in log
        assert "injected failure of hospital 1" not in log
        site_log = (tmp_path / f"{out.name}-site-logs" / "site-1.log").read_text()
        assert "InjectedSiteFault: injected failure of hospital 1" in site_log
    assert plain.rounds == 1 and Path(plain.final_checkpoint).exists()
    log = (tmp_path / "secure" / "simulation.log").read_text()
    assert "Secure aggregation completed." in log
    assert json.loads((tmp_path / "secure" / "metrics.json").read_text())["secure_aggregation"]

    expected = ckpt_io.read_checkpoint(plain.final_checkpoint)["weights"]
    got = ckpt_io.read_checkpoint(secure.final_checkpoint)["weights"]
    assert set(got) == set(expected)
    assert not any("running_" in key for key in got), "BatchNorm statistics left a site"
    train = read_manifest(tiny_data_root, TASK).counts["train"]
    secure = parse_run(cfg).federated.secure
    bound = quantisation_error(secure, sites=2, examples=train["0"] + train["2"])
    worst = 0.0
    for key, value in expected.items():
        if value.is_floating_point():
            worst = max(worst, (got[key] - value).abs().max().item())
        else:
            assert torch.equal(got[key], value), key
    assert 0.0 < worst <= bound + 1e-6, f"largest difference {worst:.2e}, bound {bound:.2e}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federated.min_sites=1"], "min_sites >= 2"),
        (["federated.dp.enabled=true"], "federated.secure and federated.dp"),
        (["federated.secure.modulus_range=1000000"], "federated.secure: .*modulus_range"),
        (["federated.secure.reconstruction_threshold=1.5"], "federated.secure: .*reconstruction"),
    ],
)
def test_secure_settings_the_protocol_cannot_run_are_refused(
    tiny_data_root, tmp_path, overrides, message
):
    cfg = compose(tiny_data_root, tmp_path / "run", *SECURE, *overrides)
    with pytest.raises(ConfigError, match=message):
        run_federated(cfg)
    assert not (tmp_path / "run").exists()

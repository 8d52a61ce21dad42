"""The real ClientApp handlers called with real Messages, as the SuperNode calls them: what a
site sends back, FedProx's term, DP clipping of the update, and where a site's data comes from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tiny_model import RANDOM_BACKBONE_EXPECTED

from dipro.config import ConfigError
from dipro.data.layout import read_manifest
from dipro.model import build_model
from federated.client_app import app
from federated.config import parse_run, site_config, train_config_record
from federated.site import InjectedSiteFault, load_site

pytestmark = RANDOM_BACKBONE_EXPECTED


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity a ServerApp process has, so that this process can write its messages."""
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _global_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg["model"], cfg["task"]["name"])


def _message(cfg, model, message_type=MessageType.TRAIN, **extra) -> Message:
    config = train_config_record(site_config(parse_run(cfg)), round_offset=0)
    config["server-round"] = 1
    for key, value in extra.items():
        config[key] = value
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content=content, dst_node_id=7, message_type=message_type)


def _context(node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


SIM_SITE = {"partition-id": 1, "num-partitions": 3}


def test_train_reply_holds_only_the_weights_and_scalar_metrics(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path, "train.max_steps_per_epoch=2")
    model = _global_model(cfg)
    reply = app(_message(cfg, model), _context(SIM_SITE))

    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert list(reply.content.array_records) == ["arrays"]
    assert list(reply.content.metric_records) == ["metrics"]
    assert not reply.content.config_records
    arrays = reply.content["arrays"]
    expected = model.state_dict()
    assert list(arrays.keys()) == list(expected.keys())
    assert all(tuple(arrays[k].shape) == tuple(v.shape) for k, v in expected.items())
    metrics = reply.content["metrics"]
    assert all(isinstance(v, int | float) for v in metrics.values()), dict(metrics)
    assert set(metrics) <= {"num-examples", "train-loss", "train-steps"} | {
        f"train-loss-{c}" for c in ("task", "orth", "temp", "static", "dyn", "prox")
    }
    # the site trained two steps on its own rows only: its weights moved
    site_rows = read_manifest(cfg["data"]["root"], "mortality").counts["train"]["1"]
    assert metrics["train-steps"] == 2 and metrics["num-examples"] == min(site_rows, 2 * 4)
    moved = [
        k
        for k, v in expected.items()
        if v.is_floating_point() and not torch.equal(torch.from_numpy(arrays[k].numpy()), v)
    ]
    assert moved


def test_evaluate_reply_holds_only_scalar_metrics(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path)
    reply = app(_message(cfg, _global_model(cfg), MessageType.EVALUATE), _context(SIM_SITE))

    assert not reply.has_error(), reply.error
    assert list(reply.content.keys()) == ["metrics"]
    metrics = reply.content["metrics"]
    hospital = read_manifest(tiny_data_root, "mortality").hospitals[1]
    assert (
        metrics["num-examples"]
        == read_manifest(tiny_data_root, "mortality").counts["val"][str(hospital)]
    )
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert {"val-auroc", "val-auprc", "val-loss"} <= set(metrics)


def test_fedprox_adds_the_proximal_term(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path, "train.max_steps_per_epoch=3")
    reply = app(_message(cfg, _global_model(cfg), **{"proximal-mu": 10.0}), _context(SIM_SITE))

    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["train-loss-prox"] > 0.0


def test_dp_clipping_bounds_the_update(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path, "train.max_steps_per_epoch=2")
    model = _global_model(cfg)
    reply = app(_message(cfg, model, clipping_norm=0.05), _context(SIM_SITE))

    assert not reply.has_error(), reply.error
    arrays = reply.content["arrays"]
    update = [
        arrays[k].numpy().astype(np.float64) - v.numpy().astype(np.float64)
        for k, v in model.state_dict().items()
    ]
    norm = float(np.sqrt(sum((u**2).sum() for u in update)))
    assert 0.0 < norm <= 0.05 + 1e-6


def test_a_site_reads_only_its_hospital(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path)
    manifest = read_manifest(tiny_data_root, "mortality")
    deployed = load_site({"data-path": str(tiny_data_root), "hospital-id": 2}, parse_run(cfg))
    simulated = load_site({"partition-id": 2, "num-partitions": 3}, parse_run(cfg))

    for site in (deployed, simulated):
        assert site.hospitals == (manifest.hospitals[2],)
        assert all("hospital=2/" in p for p in site.train_paths + site.val_paths)
        assert site.num_train == manifest.counts["train"]["2"]
    with pytest.raises(ConfigError, match="data-path"):
        load_site({}, parse_run(cfg))
    with pytest.raises(ConfigError, match="hospital-id"):
        load_site({"data-path": str(tiny_data_root), "hospital-id": 9}, parse_run(cfg))


def test_the_injected_fault_fails_only_its_hospital_in_its_round(tiny_data_root, tmp_path):
    cfg = compose(
        tiny_data_root,
        tmp_path,
        "train.max_steps_per_epoch=1",
        "+federated.fail_at={hospital: 1, round: 1}",
    )
    failed = app(_message(cfg, _global_model(cfg)), _context(SIM_SITE))
    assert failed.has_error() and failed.error.reason == "site failed: injected-fault"
    log = (tmp_path.parent / f"{tmp_path.name}-site-logs" / "site-1.log").read_text()
    assert f"{InjectedSiteFault.__name__}: injected failure of hospital 1" in log
    other = app(_message(cfg, _global_model(cfg)), _context({"partition-id": 0}))
    assert not other.has_error(), other.error


def test_config_record_is_plain(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path)
    record = train_config_record(site_config(parse_run(cfg)), 2)
    assert isinstance(record, ConfigRecord) and record["round-offset"] == 2

"""Site-local layers (FedBN): every BatchNorm layer and the named prefixes stay at the sites;
the server never receives, averages or checkpoints them; a site keeps its own across rounds,
SuperNode restarts and resumed runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tiny_model import RANDOM_BACKBONE_EXPECTED
from torch import nn

from dipro import checkpoint as ckpt_io
from dipro.checkpoint import CheckpointError
from dipro.config import ConfigError
from dipro.model import build_model
from dipro.runs import checkpoint_files
from federated.client_app import app
from federated.config import parse_run, site_config, train_config_record
from federated.local_state import global_part, local_keys
from federated.simulate import run_federated

pytestmark = RANDOM_BACKBONE_EXPECTED

FEDBN = "federated.local.batch_norm=true"


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _model(cfg) -> nn.Module:
    torch.manual_seed(int(cfg["seed"]))
    return build_model(cfg["model"], cfg["task"]["name"])


def _batch_norm_keys(model: nn.Module) -> set[str]:
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
        for key in module.state_dict()
    }


def test_fedbn_keeps_every_batch_norm_and_the_named_layers_local(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path, FEDBN, "federated.local.layers=[heads]")
    model = _model(cfg)
    local = local_keys(model, parse_run(cfg).federated.local)
    batch_norm = _batch_norm_keys(model)
    heads = {k for k in model.state_dict() if k.startswith("heads.")}
    assert batch_norm and heads and local == batch_norm | heads
    assert set(global_part(model.state_dict(), local)) == set(model.state_dict()) - local
    assert local_keys(model, parse_run(compose(tiny_data_root, tmp_path)).federated.local) == set()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federated.local.layers=[no_such_layer]", "'no_such_layer' names no parameter"),
        ("server.eval_data=/anywhere", "cannot score the model on server.eval_data"),
    ],
)
def test_bad_local_layers_fail_before_any_site_is_contacted(
    tiny_data_root, tmp_path, override, message
):
    with pytest.raises(ConfigError, match=message):
        run_federated(compose(tiny_data_root, tmp_path / "run", FEDBN, override))


def _train(cfg, arrays, partition: int, run_round: int) -> Message:
    """One train message of round ``run_round`` to a freshly started SuperNode (new context)."""
    config = train_config_record(site_config(parse_run(cfg)), round_offset=run_round - 1)
    config["server-round"] = 1
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": config})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    node = {"partition-id": partition, "num-partitions": 3}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    return app(msg, context)


def test_a_site_keeps_its_own_batch_norm_across_rounds_and_restarts(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path / "run", FEDBN, "train.max_steps_per_epoch=2")
    model = _model(cfg)
    local = local_keys(model, parse_run(cfg).federated.local)
    arrays = global_part(model.state_dict(), local)

    first = _train(cfg, arrays, partition=1, run_round=1)
    assert not first.has_error(), first.error
    assert set(first.content["arrays"].to_torch_state_dict()) == set(arrays)  # no BN sent
    state = tmp_path / "run-site-state"
    one = torch.load(state / "site-1" / "round-1.pt", weights_only=True)
    assert set(one) == local
    counters = [k for k in local if k.endswith("num_batches_tracked")]
    assert {int(one[k]) for k in counters} == {2}  # two local steps

    # a restarted SuperNode (empty context) goes on with its own layers from its files
    second = _train(cfg, first.content["arrays"].to_torch_state_dict(), partition=1, run_round=2)
    assert not second.has_error(), second.error
    two = torch.load(state / "site-1" / "round-2.pt", weights_only=True)
    assert {int(two[k]) for k in counters} == {4}

    other = _train(cfg, arrays, partition=0, run_round=1)
    assert not other.has_error(), other.error
    zero = torch.load(state / "site-0" / "round-1.pt", weights_only=True)
    means = [k for k in local if k.endswith("running_mean")]
    assert any(not torch.equal(zero[k], one[k]) for k in means)  # each site its own statistics


@pytest.mark.slow
def test_fedbn_simulation_keeps_statistics_at_the_sites_and_resumes_them(tiny_data_root, tmp_path):
    out = tmp_path / "run"
    run_federated(compose(tiny_data_root, out, FEDBN, "federated.num_rounds=2",
                          "simulation.timeout_s=900"))  # fmt: skip

    model = _model(compose(tiny_data_root, out))
    batch_norm = _batch_norm_keys(model)
    checkpoints = checkpoint_files(str(out))
    assert checkpoints
    for path in checkpoints:
        payload = ckpt_io.read_checkpoint(path)
        assert not batch_norm & set(payload["weights"]), "the checkpoint holds BatchNorm"
        assert set(payload["training"]["extra"]["site_local_keys"]) == batch_norm
    with pytest.raises(CheckpointError, match="stay at the sites"):
        ckpt_io.load_checkpoint(checkpoints[0])
    state = tmp_path / "run-site-state"
    sites = [torch.load(state / f"site-{i}" / "round-2.pt", weights_only=True) for i in range(3)]
    means = [k for k in batch_norm if k.endswith("running_mean")]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(sites[a][k], sites[b][k]) for k in means), (a, b)
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["site_test"]["sites"]) == 3  # each site scored with its own layers

    run_federated(compose(tiny_data_root, out, FEDBN, "federated.num_rounds=3",
                          "simulation.timeout_s=900"))  # fmt: skip
    counter = next(k for k in batch_norm if k.endswith("num_batches_tracked"))
    for i in range(3):
        first = torch.load(state / f"site-{i}" / "round-1.pt", weights_only=True)[counter]
        third = torch.load(state / f"site-{i}" / "round-3.pt", weights_only=True)[counter]
        assert int(third) == 3 * int(first), f"site {i} did not resume its own layers"

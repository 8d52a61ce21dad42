"""The Flower ClientApp of a hospital: global weights in, local training on its own shards,
updated weights and scalar metrics out.

A train reply holds exactly two records: ``arrays`` (the model's state dict as an ArrayRecord,
the same keys the server sent) and ``metrics`` (a MetricRecord of scalars: ``num-examples``,
the training loss and its components, optimizer steps). An evaluate reply holds only
``metrics``. No record, identifier, label, prediction or statistic of a patient is sent; the
site's normalisation statistics and class weights stay at the site.

With the server's DP wrapper on, the server asks for clipping and Flower's ``fixedclipping_mod``
clips the update (new weights minus the global weights) to the asked L2 norm before it leaves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from federated.config import read_site_config
from federated.site import evaluate_site, model_from_state, site_of, train_site

app = ClientApp()


def clip_update_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``fixedclipping_mod`` when the server sent a clipping norm (DP on), else nothing."""
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _scalars(values: dict[str, float], prefix: str) -> dict[str, float]:
    """Scalar metrics under Flower-style keys (``loss/task`` -> ``{prefix}loss-task``); the
    per-finding breakdown stays at the site."""
    return {
        prefix + key.replace("/", "-"): float(value)
        for key, value in values.items()
        if not key.startswith(("per_finding/", "n_findings/")) and key not in ("samples", "lr")
    }


def _trained_state(
    model: torch.nn.Module, received: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The trained state dict, with integer buffers (BatchNorm's step counters, unused with a
    momentum) as received: they would count the site's local steps and escape DP clipping."""
    return {
        key: value if value.is_floating_point() else received[key]
        for key, value in model.state_dict().items()
    }


@app.train(mods=[clip_update_when_asked])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's shards; reply with its weights and scalars."""
    config = msg.content["config"]
    cfg, server_round = read_site_config(config)
    torch.set_num_threads(int(cfg["federated"]["threads"]))
    site = site_of(context.node_config, cfg)
    state = msg.content["arrays"].to_torch_state_dict()
    model = model_from_state(cfg, state, f"the global model of round {server_round}")
    stats = train_site(
        model, site, cfg, server_round=server_round, prox_mu=float(config.get("proximal-mu", 0.0))
    )
    metrics = {"num-examples": int(stats["samples"]), **_scalars(stats, "train-")}
    content = RecordDict(
        {
            "arrays": ArrayRecord(_trained_state(model, state)),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this site's validation shards; reply with scalars only."""
    cfg, server_round = read_site_config(msg.content["config"])
    torch.set_num_threads(int(cfg["federated"]["threads"]))
    site = site_of(context.node_config, cfg)
    state = msg.content["arrays"].to_torch_state_dict()
    model = model_from_state(cfg, state, f"the global model of round {server_round}")
    values = evaluate_site(model, site, cfg)
    metrics = {"num-examples": int(values["samples"]), **_scalars(values, "val-")}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

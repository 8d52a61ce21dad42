"""The Flower ClientApp of a hospital: global weights in, local training on its own shards,
updated weights and scalar metrics out.

A train reply holds exactly two records: ``arrays`` (the model's state dict as an ArrayRecord,
the same keys the server sent) and ``metrics`` (a MetricRecord of scalars: ``num-examples``,
the training loss and its components, optimizer steps). An evaluate reply holds only
``metrics``: the site's scores of the model it was sent on its own validation split (every
round) or test split (the selected model, at the end). No record, identifier, label,
prediction or statistic of a patient is sent; the site's normalisation statistics and class
weights stay at the site.

With site-local layers (``federated.local``, FedBN) the arrays in and out hold only the global
keys; the site adds its own local part (``federated.local_state``) before training or
evaluating and writes it back, at the site, after training.

With secure aggregation on (``federated.secure``), the train handler runs unchanged inside
Flower's SecAgg+ protocol (``federated.secure``): what leaves the site is its update, masked,
and its scalar metrics.

With the server's DP wrapper on, the server asks for clipping and Flower's ``fixedclipping_mod``
clips the update (new weights minus the global weights) to the asked L2 norm before it leaves.

A site that fails keeps the error: the full traceback goes to the site's own log
(``site_log_path``) and the reply is a Flower error whose reason is only
``site failed: {category}`` (``FAILURE_CATEGORIES``), never a path, an id or an exception text.
A site with fewer than ``federated.min_report_count`` examples to train or evaluate on sends no
metrics and no weights: it replies ``site failed: too-few-examples`` and the round goes on
without it (its metrics would be those of a handful of patients).
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from dipro.checkpoint import CheckpointError
from dipro.config import ConfigError
from dipro.data.schema import SchemaError
from dipro.engine import NonFiniteOutputError
from federated.config import EVAL_SPLIT_KEY, SiteSettings, read_site_config
from federated.local_state import load_local, save_local, state_dir
from federated.secure import SecureAggregationError, secure_when_asked
from federated.site import (
    InjectedSiteFault,
    evaluate_site,
    load_site,
    model_from_state,
    train_site,
)

app = ClientApp()
logger = logging.getLogger("dipro.site")

# What a failing site tells the server: the category only (docs/federated.md).
FAILURE_CATEGORIES: Final[dict[str, int]] = {
    "site-data": 1,  # its shards are missing, unreadable or fail validation
    "site-config": 2,  # its node config or the run's settings do not fit its data or model
    "too-few-examples": 3,  # fewer than federated.min_report_count examples
    "injected-fault": 4,  # federated.fail_at (tests)
    "site-error": 5,  # anything else
    "secure-aggregation": 6,  # a step of the SecAgg+ protocol (federated.secure) failed
    "model-output": 7,  # the model it was sent predicts NaN or infinity on its data
}


class TooFewExamples(RuntimeError):
    """Fewer examples than ``federated.min_report_count``: nothing is reported."""


def failure_category(err: BaseException) -> str:
    """The category of a site's error (the only thing about it the server learns)."""
    if isinstance(err, TooFewExamples):
        return "too-few-examples"
    if isinstance(err, InjectedSiteFault):
        return "injected-fault"
    if isinstance(err, SecureAggregationError):
        return "secure-aggregation"
    if isinstance(err, NonFiniteOutputError):
        return "model-output"
    if isinstance(err, ConfigError | CheckpointError):
        return "site-config"
    if isinstance(err, SchemaError | OSError | pa.ArrowException | ValueError | KeyError):
        return "site-data"
    return "site-error"


def site_log_path(node_config: Mapping[str, Any], run: SiteSettings | None) -> Path | None:
    """The site's own log: the node config's ``log-path`` (a deployment), else
    ``{federated.site_log_dir}/site-{partition-id}.log`` (a simulation), else None (the
    SuperNode's own stderr)."""
    if "log-path" in node_config:
        return Path(str(node_config["log-path"]))
    log_dir = None if run is None else run.federated.site_log_dir
    if log_dir and "partition-id" in node_config:
        return Path(log_dir) / f"site-{int(node_config['partition-id'])}.log"
    return None


def _failed(
    msg: Message, context: Context, run: SiteSettings | None, what: str, err: Exception
) -> Message:
    """Log ``err`` (being handled) in full at the site; reply with its category only."""
    category = failure_category(err)
    text = traceback.format_exc()
    path = site_log_path(context.node_config, run)
    if path is None:
        logger.error("site failed to %s (%s):\n%s", what, category, text)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with path.open("a") as log:
            log.write(f"{stamp} pid {os.getpid()} failed to {what} ({category}):\n{text}\n")
    error = Error(code=FAILURE_CATEGORIES[category], reason=f"site failed: {category}")
    return Message(error=error, reply_to=msg)


def _contained(msg: Message, context: Context, what: str, work: Callable[..., Message]) -> Message:
    run = None
    try:
        run, server_round = read_site_config(msg.content["config"])
        return work(run, server_round)
    except Exception as err:
        return _failed(msg, context, run, what, err)


def _enough(run: SiteSettings, samples: float) -> None:
    if samples < run.federated.min_report_count:
        raise TooFewExamples(f"{int(samples)} examples, below federated.min_report_count")


def clip_update_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``fixedclipping_mod`` when the server sent a clipping norm (DP on), else nothing."""
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_round(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The SecAgg+ protocol's messages (``federated.secure``) through ``secure_when_asked``; a
    failure of the protocol itself is logged here and leaves as its category only."""
    try:
        return secure_when_asked(msg, context, call_next)
    except SecureAggregationError as err:
        return _failed(msg, context, None, "aggregate securely", err)


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
    """The trained state dict of the keys received (site-local layers stay here), with integer
    buffers (BatchNorm's step counters, unused with a momentum) as received: they would count
    the site's local steps and escape DP clipping."""
    return {
        key: value if value.is_floating_point() else received[key]
        for key, value in model.state_dict().items()
        if key in received
    }


def _local_layers(
    context: Context, run: SiteSettings, run_round: int
) -> tuple[Path | None, dict[str, torch.Tensor] | None]:
    """Where this site keeps its local layers and their state as of ``run_round`` (None, None
    when the run keeps nothing local)."""
    if not run.federated.local.any:
        return None, None
    directory = state_dir(context.node_config, run.federated)
    return directory, load_local(directory, run_round)


@app.train(mods=[secure_round, clip_update_when_asked])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's shards; reply with its weights and scalars."""

    def work(run: SiteSettings, server_round: int) -> Message:
        config = msg.content["config"]
        torch.set_num_threads(run.federated.threads)
        site = load_site(context.node_config, run)
        state = msg.content["arrays"].to_torch_state_dict()
        directory, own = _local_layers(context, run, server_round - 1)
        model = model_from_state(run, state, f"the global model of round {server_round}", own)
        stats = train_site(
            model,
            site,
            run,
            server_round=server_round,
            prox_mu=float(config.get("proximal-mu", 0.0)),
        )
        _enough(run, stats["samples"])
        if directory is not None:
            trained = model.state_dict()
            save_local(directory, server_round, {k: trained[k] for k in trained if k not in state})
        metrics = {"num-examples": int(stats["samples"]), **_scalars(stats, "train-")}
        content = RecordDict(
            {
                "arrays": ArrayRecord(_trained_state(model, state)),
                "metrics": MetricRecord(metrics),
            }
        )
        return Message(content=content, reply_to=msg)

    return _contained(msg, context, "train", work)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this site's shards of the split the server asks for
    (``eval-split``: ``val`` every round, ``test`` for the selected model); scalars only."""

    def work(run: SiteSettings, server_round: int) -> Message:
        torch.set_num_threads(run.federated.threads)
        split = str(msg.content["config"].get(EVAL_SPLIT_KEY, "val"))
        site = load_site(context.node_config, run)
        if not site.split_paths(split):
            raise TooFewExamples(f"no {split} shards at this site")
        state = msg.content["arrays"].to_torch_state_dict()
        _, own = _local_layers(context, run, server_round)
        model = model_from_state(run, state, f"the global model of round {server_round}", own)
        values = evaluate_site(model, site, run, split)
        _enough(run, values["samples"])
        metrics = {"num-examples": int(values["samples"]), **_scalars(values, "val-")}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return _contained(msg, context, "evaluate", work)

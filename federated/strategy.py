"""Flower strategies from the config, and the site quorum every run enforces.

``build_strategy`` gives Flower's FedAvg, FedProx (the server sends ``proximal-mu``; the sites'
engine adds the term) or FedAdam, optionally wrapped in
``DifferentialPrivacyClientSideFixedClipping`` (the sites clip their updates; the server adds
Gaussian noise to the mean). ``SiteQuorum`` wraps the result so that:

- waiting for sites is bounded: fewer than ``min_sites`` connected after ``wait_s`` seconds is a
  ``NotEnoughSitesError`` (Flower alone would wait forever);
- a site that fails during a round is logged (node id and reason) and recorded with the round;
  the round completes with the others as long as ``min_sites`` sent an update, and is an
  error otherwise; training and evaluation failures are kept apart;
- each round records which sites its aggregate holds: the node ids of the sites that sent an
  update (``trained_nodes``) and of those it sampled that did not (``dropped_nodes``: a
  failure, or a site whose process died and sent nothing). A site that comes back is sampled
  again from the next round on and trains on that round's global model;
- each evaluating site's own metrics are kept with the round (``RoundSites.per_site``) beside
  their aggregate (``finite_weighted_mean``), and ``evaluate_at_sites`` has every site score
  one model (the selected one, on its test split) at the end of a run;
- a run is repeatable: the sites a round samples are drawn from the run's seed and round
  (``federated.streams``), and the sites' replies are aggregated in the order of their node ids,
  not in the order they arrive (the sums of floats that aggregate them depend on the order).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from dipro.config import ConfigError
from dipro.seeds import stream_seed
from dipro.settings import FederatedSettings, StrategySettings
from federated.config import ROUND_OFFSET_KEY
from federated.streams import EVALUATE_SAMPLE, TRAIN_SAMPLE, global_rngs_restored

logger = logging.getLogger("flwr")  # Flower's log stream: shown by `flwr log` and the simulation


class NotEnoughSitesError(RuntimeError):
    """Fewer sites than the run's minimum connected or sent an update."""


@dataclass
class RoundSites:
    """What happened to the sites of one round (Flower's round number of this start): how
    many trained and which (node ids), which failed to train or to evaluate, the aggregated
    metrics, and each evaluating site's own validation metrics (``node_id``, ``num_examples``
    and scalars)."""

    sampled: int = 0
    updated: int = 0
    sampled_nodes: list[int] = field(default_factory=list)
    trained_nodes: list[int] = field(default_factory=list)
    train_failures: list[dict[str, Any]] = field(default_factory=list)
    evaluated: int = 0
    evaluate_failures: list[dict[str, Any]] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    per_site: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The round log's ``sites`` entry."""
        return {
            "sampled": self.sampled,
            "updated": self.updated,
            "trained_nodes": self.trained_nodes,
            "dropped_nodes": sorted(set(self.sampled_nodes) - set(self.trained_nodes)),
            "train_failures": self.train_failures,
            "evaluated": self.evaluated,
            "evaluate_failures": self.evaluate_failures,
            "val": self.per_site,
        }


def _failures(
    replies: list[Message], what: str, server_round: int, sent: Iterable[Message] = ()
) -> list[dict[str, Any]]:
    """The failed ``replies``, each with the node id of the site it was ``sent`` to: an error
    that the SuperLink wrote for a site (``Node Unavailable`` when the site stopped sending
    heartbeats) comes from the SuperLink's own node id, not the site's."""
    destination = {
        m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id
    }
    out = []
    for msg in replies:
        if msg.has_error():
            reason = str(msg.error.reason).strip()
            node = destination.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
            logger.warning(
                "round %d: site (node %d) failed to %s: %s", server_round, node, what, reason
            )
            out.append({"node_id": node, "reason": reason})
    return out


SITE_METRIC_PREFIX = "val-"


def site_metrics(reply: Message) -> dict[str, Any]:
    """One site's evaluate reply as a round-log entry: ``node_id``, ``num_examples`` and its
    metrics under the central run's names (``val-loss-task`` -> ``loss/task``)."""
    metrics = reply.content["metrics"]
    entry: dict[str, Any] = {
        "node_id": int(reply.metadata.src_node_id),
        "num_examples": int(metrics["num-examples"]),
    }
    for key, value in metrics.items():
        if key.startswith(SITE_METRIC_PREFIX):
            entry[metric_name(key)] = float(value)
    return entry


def in_node_order(replies: Iterable[Message]) -> list[Message]:
    """``replies`` sorted by the node id of their sender: Flower hands them over in the order
    they arrive, which differs between runs, and aggregating them in it would too."""
    return sorted(replies, key=lambda msg: int(msg.metadata.src_node_id))


def metric_name(key: str) -> str:
    """A site's metric key under the central run's name (``val-loss-task`` -> ``loss/task``)."""
    return key.removeprefix(SITE_METRIC_PREFIX).replace("-", "/")


class SiteQuorum(Strategy):
    """Bounded waits, logged failures and a minimum of updating sites around ``strategy``;
    its sampling drawn from the run's ``seed``, its aggregation in node order."""

    def __init__(self, strategy: Strategy, min_sites: int, wait_s: float, seed: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.min_sites = min_sites
        self.wait_s = wait_s
        self.seed = seed
        self.rounds: dict[int, RoundSites] = {}
        self.sent: dict[tuple[str, int], list[Message]] = {}  # a round's messages, once sent

    def _sampling_seed(self, stream: int, server_round: int, config: ConfigRecord) -> int:
        """The seed of a round's sampling: the run's round (the rounds of earlier starts plus
        Flower's round of this one), so a resumed run samples as an uninterrupted one."""
        run_round = server_round + int(config.get(ROUND_OFFSET_KEY, 0))
        return stream_seed(self.seed, stream, run_round)

    def _await_sites(self, grid: Grid, server_round: int) -> None:
        deadline = time.monotonic() + self.wait_s
        while (connected := len(list(grid.get_node_ids()))) < self.min_sites:
            if time.monotonic() >= deadline:
                raise NotEnoughSitesError(
                    f"round {server_round}: {connected} site(s) connected, the run needs at "
                    f"least {self.min_sites} (federated.min_sites); waited {self.wait_s:.0f} s "
                    "(federated.wait_for_sites_s)"
                )
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._await_sites(grid, server_round)
        with global_rngs_restored():  # Flower samples with Python's random (sample_nodes)
            random.seed(self._sampling_seed(TRAIN_SAMPLE, server_round, config))
            messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = RoundSites(
            sampled=len(messages),
            sampled_nodes=sorted(int(m.metadata.dst_node_id) for m in messages),
        )
        self.sent[("train", server_round)] = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = in_node_order(replies)
        sites = self.rounds.setdefault(server_round, RoundSites(sampled=len(replies)))
        sent = self.sent.pop(("train", server_round), [])
        sites.train_failures = _failures(replies, "train", server_round, sent)
        sites.trained_nodes = [int(m.metadata.src_node_id) for m in replies if not m.has_error()]
        sites.updated = len(sites.trained_nodes)
        missing = sites.sampled - len(replies)
        if missing > 0:
            logger.warning(
                "round %d: %d sampled site(s) sent no reply before the timeout",
                server_round,
                missing,
            )
        if sites.updated < self.min_sites:
            raise NotEnoughSitesError(
                f"round {server_round}: {sites.updated} of {sites.sampled} site(s) sent an "
                f"update, the run needs at least {self.min_sites} (federated.min_sites); "
                f"failures: {sites.train_failures}"
            )
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            raise NotEnoughSitesError(f"round {server_round}: the strategy aggregated no update")
        sites.train_metrics = {} if metrics is None else {k: float(v) for k, v in metrics.items()}
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._await_sites(grid, server_round)
        with global_rngs_restored():
            random.seed(self._sampling_seed(EVALUATE_SAMPLE, server_round, config))
            messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self.sent[("evaluate", server_round)] = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        sites = self.rounds.setdefault(server_round, RoundSites())
        sent = self.sent.pop(("evaluate", server_round), [])
        return self._aggregate_evaluation(sites, in_node_order(replies), server_round, sent)

    def _aggregate_evaluation(
        self,
        sites: RoundSites,
        replies: list[Message],
        server_round: int,
        sent: Iterable[Message] = (),
    ) -> MetricRecord | None:
        """Each site's metrics, each failure and the strategy's aggregate into ``sites``
        (``replies`` in node order, answering the messages ``sent``)."""
        sites.evaluate_failures = _failures(replies, "evaluate", server_round, sent)
        sites.per_site = [site_metrics(m) for m in replies if not m.has_error()]
        sites.evaluated = len(sites.per_site)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        sites.evaluate_metrics = (
            {} if metrics is None else {k: float(v) for k, v in metrics.items()}
        )
        return metrics

    def evaluate_at_sites(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> RoundSites:
        """Every connected site scores ``arrays`` (the run's selected model, on the split
        ``config`` names): each site's metrics and the example-weighted aggregate."""
        self._await_sites(grid, 0)
        record = RecordDict({"arrays": arrays, "config": config})
        messages = [
            Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=node)
            for node in sorted(grid.get_node_ids())
        ]
        sites = RoundSites(sampled=len(messages))
        replies = in_node_order(grid.send_and_receive(messages, timeout=timeout))
        self._aggregate_evaluation(sites, replies, 0, messages)
        return sites

    def summary(self) -> None:
        logger.info(
            "site quorum: at least %d site(s), waiting at most %.0f s", self.min_sites, self.wait_s
        )
        self.strategy.summary()


def finite_weighted_mean(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The sites' evaluation metrics aggregated: each metric's mean over the sites where it is
    finite, weighted by their ``weighting_key`` (examples). A site whose validation split has
    one class has no AUROC; the others' still count, instead of the aggregate being NaN."""
    rows = []
    for record in records:
        (metrics,) = record.metric_records.values()
        rows.append(metrics)
    keys = dict.fromkeys(key for metrics in rows for key in metrics if key != weighting_key)
    return MetricRecord(
        {
            key: weighted_finite_mean(
                (float(m[weighting_key]), float(m[key])) for m in rows if key in m
            )
            for key in keys
        }
    )


def weighted_finite_mean(pairs: Iterable[tuple[float, float]]) -> float:
    """The mean of the finite values of ``(weight, value)`` pairs, weighted; NaN when no value
    is finite (the sites' aggregation rule, ``finite_weighted_mean``)."""
    finite = [(weight, value) for weight, value in pairs if math.isfinite(value)]
    total = sum(weight for weight, _ in finite)
    return sum(weight * value for weight, value in finite) / total if total > 0 else math.nan


def build_strategy(
    spec: StrategySettings, fed: FederatedSettings, *, site_lr: float, seed: int
) -> tuple[FedAvg, SiteQuorum]:
    """The configured strategy (returned too, for its server state) and the quorum around it.
    ``site_lr`` is the sites' ``optim.lr`` (FedAdam's eta_l); ``seed`` the run's."""
    min_sites = fed.min_sites
    common = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
        "evaluate_metrics_aggr_fn": finite_weighted_mean,
    }
    name = spec.name
    if name == "fedavg":
        base: FedAvg = FedAvg(**common)
    elif name == "fedprox":
        base = FedProx(**common, proximal_mu=_needed(spec.proximal_mu, "strategy.proximal_mu"))
    elif name == "fedadam":
        base = FedAdam(
            **common,
            eta=_needed(spec.eta, "strategy.eta"),
            eta_l=site_lr,
            beta_1=_needed(spec.beta_1, "strategy.beta_1"),
            beta_2=_needed(spec.beta_2, "strategy.beta_2"),
            tau=_needed(spec.tau, "strategy.tau"),
        )
    else:
        raise ValueError(f"unknown strategy {name!r}")
    outer: Strategy = base
    if fed.dp.enabled:
        outer = DifferentialPrivacyClientSideFixedClipping(
            base,
            noise_multiplier=fed.dp.noise_multiplier,
            clipping_norm=fed.dp.clipping_norm,
            num_sampled_clients=min_sites,
        )
    return base, SiteQuorum(outer, min_sites, fed.wait_for_sites_s, seed)


def _needed(value: float | None, key: str) -> float:
    if value is None:
        raise ConfigError(f"{key} is missing: the strategy needs it (configs/strategy/)")
    return value


class ServerOptimizerState:
    """The moments of FedAdam, in the form a checkpoint's optimizer slot stores and restores
    (``state_dict``/``load_state_dict`` of tensors); empty for FedAvg and FedProx."""

    def __init__(self, strategy: FedAvg) -> None:
        self.strategy = strategy

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": type(self.strategy).__name__}
        for key in ("m_t", "v_t"):
            moments = getattr(self.strategy, key, None)
            if moments:
                out[key] = {k: torch.from_numpy(np.array(v)) for k, v in moments.items()}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("strategy") != type(self.strategy).__name__:
            raise ValueError(
                f"the checkpoint's server state is {state.get('strategy')!r}'s, the run uses "
                f"{type(self.strategy).__name__}"
            )
        for key in ("m_t", "v_t"):
            if key in state:
                setattr(self.strategy, key, {k: v.numpy() for k, v in state[key].items()})

"""Secure aggregation (SecAgg+) of the sites' updates: the server learns their example-weighted
sum, never one site's weights.

Flower 1.42 implements SecAgg+ for its legacy workflow only: the server's
``flwr.server.workflow.SecAggPlusWorkflow`` (four exchanges per round: setup, share keys,
collect masked vectors, unmask) drives a legacy ``flwr.server.strategy.Strategy`` through a
``LegacyContext``, and the site's ``flwr.client.mod.secaggplus_mod`` masks the legacy ``FitRes``
of its training. The project's round loop is the Message API's ``Strategy.start`` (one train
exchange per round). To keep one round loop, one round log and one site code path, the secure
round lives behind the ``Grid``:

- server: ``SecureGrid`` wraps the run's grid. A TRAIN exchange (the messages the configured
  strategy built) runs the whole SecAgg+ protocol over the real grid with those messages as the
  fit instructions, and returns one reply per site that sent its masked update: the site's own
  scalar metrics and, in place of its weights, the secure aggregate (the global weights plus
  the weighted mean of the updates). FedAvg / FedProx / FedAdam then aggregate replies that
  all hold the same weights, so the secure round's result is the strategy's own; the site
  quorum, the failures, the round log and the checkpoints are those of any round. Any other
  exchange (evaluation) passes through.
- site: ``secure_when_asked`` runs ``secaggplus_mod`` for the protocol's messages only, and
  ``_as_fitres`` translates between the protocol's legacy fit formats and the site's own train
  handler, which runs unchanged. What the site masks and sends is its update (trained minus
  received weights), not its weights: SecAgg+ clips each value to ``clipping_range`` before
  quantising, which an update fits and a BatchNorm running variance might not.

A site that fails after the keys were shared (while training, say) drops out: the others'
shares of its key remove its masks and the round completes with the rest, as long as every site
keeps ``reconstruction_threshold`` live neighbours. A site whose masked update arrived counts as
updated even if a later step of the protocol fails there. A site's failure reaches the server as
its category only, as in a plain round. Quantisation costs at most ``quantisation_error`` per
value of the aggregate.

A secure round is repeatable (``federated.streams``): the neighbourhoods are shuffled with a
generator seeded from the run's seed and round, and each site rounds its update with one seeded
from the run's seed, the round and its node id, which the server sends with the fit
instructions (``ROUNDING_SEED``). The keys and the masks stay random: they cancel exactly.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from dipro.config import ConfigError
from dipro.seeds import stream_seed
from dipro.settings import FederatedSettings, SecureSettings
from federated.streams import NEIGHBOURS, ROUNDING, global_rngs_restored

logger = logging.getLogger("flwr")
STATE_KEYS: Final = "state-keys"  # the arrays' names, in order, in the fit instructions
ROUNDING_SEED: Final = "rounding-seed"  # the seed of the site's stochastic rounding


def build_workflow(secure: SecureSettings, round_timeout_s: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with ``federated.secure``'s parameters, waiting at most
    ``federated.round_timeout_s`` for a stage (a ConfigError names the setting Flower refuses).
    A share count or threshold above 1 is a count, at most 1 a fraction (Flower's rule)."""
    try:
        return SecAggPlusWorkflow(
            num_shares=_count_or_fraction(secure.num_shares),
            reconstruction_threshold=_count_or_fraction(secure.reconstruction_threshold),
            max_weight=secure.max_weight,
            clipping_range=secure.clipping_range,
            quantization_range=secure.quantization_range,
            modulus_range=secure.modulus_range,
            timeout=round_timeout_s,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"federated.secure: {err}") from err


def _count_or_fraction(value: float) -> int | float:
    return int(value) if value > 1 and float(value).is_integer() else value


def quantisation_error(secure: SecureSettings, sites: int, examples: int) -> float:
    """The largest error SecAgg+'s quantisation adds to a value of the aggregate of ``sites``
    updates over ``examples`` training examples: each site's weighted value
    (``num_examples / max_weight`` times the update) is rounded stochastically, by less than one
    step of ``2 clipping_range / quantization_range``, and the sum is divided by the weights'
    total (``examples / max_weight``)."""
    step = 2.0 * secure.clipping_range / secure.quantization_range
    return sites * step * secure.max_weight / examples


def check_secure(fed: FederatedSettings) -> None:
    """The SecAgg+ settings fit the run: Flower accepts them, at least two sites train together
    (the protocol masks one site with the others' keys), and DP is off (its server-side noise
    on a secure aggregate is not supported here)."""
    if not fed.secure.enabled:
        return
    build_workflow(fed.secure, fed.round_timeout_s)
    if fed.min_sites < 2:
        raise ConfigError(
            "federated.secure needs federated.min_sites >= 2: SecAgg+ masks a site's update "
            "with keys it shares with the other sites of the round"
        )
    if fed.dp.enabled:
        raise ConfigError(
            "federated.secure and federated.dp together are not supported: turn one of them off"
        )


# --- server ------------------------------------------------------------------------------


class _RoundOfMessages(LegacyStrategy):
    """The legacy strategy the SecAgg+ workflow drives: its fit instructions are the messages
    the run's strategy built, each with its site's ``ROUNDING_SEED``, and its aggregate is what
    the protocol unmasked."""

    def __init__(
        self,
        messages: list[Message],
        proxies: Mapping[int, ClientProxy],
        rounding_seeds: Mapping[int, int],
    ) -> None:
        self.messages = messages
        self.proxies = proxies
        self.rounding_seeds = rounding_seeds
        self.aggregate: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        out = []
        for msg in self.messages:
            arrays = msg.content["arrays"]
            node = msg.metadata.dst_node_id
            config = {
                **dict(msg.content["config"]),
                STATE_KEYS: " ".join(arrays.keys()),
                ROUNDING_SEED: self.rounding_seeds[node],
            }
            parameters = ndarrays_to_parameters(arrays.to_numpy_ndarrays())
            out.append((self.proxies[node], FitIns(parameters, config)))
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


@dataclass
class _Replies:
    """The sites' replies over the protocol's exchanges: each site's masked-vector reply (the
    stage that trains) and each site's last error."""

    trained: dict[int, Message] = field(default_factory=dict)
    errors: dict[int, Message] = field(default_factory=dict)


class _DelegatingGrid(Grid):
    """A grid that passes everything to ``grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class _RecordingGrid(_DelegatingGrid):
    """The real grid, keeping the replies of the protocol's exchanges."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.replies = _Replies()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                self.replies.errors[node] = reply
            elif "fitres.num_examples" in reply.content.metric_records:
                self.replies.trained[node] = reply
        return replies


class SecureGrid(_DelegatingGrid):
    """The run's grid with every TRAIN exchange run as a SecAgg+ round (module docstring);
    ``seed`` is the run's, ``round_offset`` the rounds played before this start (Flower counts
    the rounds of each start from 1)."""

    def __init__(
        self, grid: Grid, workflow: SecAggPlusWorkflow, seed: int, round_offset: int
    ) -> None:
        super().__init__(grid)
        self.workflow = workflow
        self.seed = seed
        self.round_offset = round_offset

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return self._secure_round(messages)

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        server_round = int(messages[0].content["config"]["server-round"])
        global_arrays = messages[0].content["arrays"]
        recording = _RecordingGrid(self.grid)
        replies = recording.replies
        run_id = int(self.grid.run.run_id)
        proxies = {
            m.metadata.dst_node_id: GridClientProxy(m.metadata.dst_node_id, recording, run_id)
            for m in messages
        }
        manager = SimpleClientManager()
        for proxy in proxies.values():
            manager.register(proxy)
        run_round = self.round_offset + server_round
        rounding = {node: stream_seed(self.seed, ROUNDING, run_round, node) for node in proxies}
        strategy = _RoundOfMessages(messages, proxies, rounding)
        base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                       run_config={})  # fmt: skip
        context = LegacyContext(base, strategy=strategy, client_manager=manager)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = global_arrays
        with global_rngs_restored():  # the protocol's first draw: its neighbourhood shuffle
            random.seed(stream_seed(self.seed, NEIGHBOURS, run_round))
            self.workflow(recording, context)

        failed = [
            replies.errors[n] for n in proxies if n in replies.errors and n not in replies.trained
        ]
        if strategy.aggregate is None:
            logger.warning(
                "round %d: SecAgg+ halted: a site kept fewer live neighbours than the "
                "reconstruction threshold",
                server_round,
            )
            return failed  # the quorum reports the round's failures
        merged = _apply_update(global_arrays, strategy.aggregate)
        summed = []
        for reply in replies.trained.values():
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            reply.content = RecordDict(
                {"arrays": merged, "metrics": MetricRecord(dict(fitres.metrics))}
            )
            summed.append(reply)
        logger.info(
            "round %d: SecAgg+ unmasked the sum of %d site(s)' updates, %d dropped out",
            server_round,
            len(summed),
            len(proxies) - len(summed),
        )
        return summed + failed


def _apply_update(global_arrays: ArrayRecord, update: list[np.ndarray]) -> ArrayRecord:
    """The global weights plus the aggregated update, in the global weights' dtypes (0-d arrays,
    which numpy arithmetic turns into scalars, stay arrays); integer arrays (BatchNorm step
    counters, sent as a zero update) stay as they are."""
    out = {}
    for (key, array), delta in zip(global_arrays.items(), update, strict=True):
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating):
            value = np.asarray(value + delta.reshape(value.shape), dtype=value.dtype)
        out[key] = Array(value)
    return ArrayRecord(array_dict=out)


# --- site --------------------------------------------------------------------------------


class SecureAggregationError(RuntimeError):
    """A step of the SecAgg+ protocol failed at this site (not its training)."""


class _SiteFailed(Exception):
    """The site's train handler replied with an error: it leaves the protocol as that reply."""

    def __init__(self, reply: Message) -> None:
        super().__init__(str(reply.error.reason))
        self.reply = reply


def _as_fitres(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The protocol's legacy fit instructions as the train handler's message, and its reply as
    the legacy ``FitRes`` that ``secaggplus_mod`` masks: the update (trained minus received
    weights, zero for integer arrays) and the handler's scalar metrics. ``secaggplus_mod``
    quantises the update next, rounding each value up or down at random with numpy's global
    generator: it is seeded here with the server's ``ROUNDING_SEED`` for this site
    (``secure_when_asked`` restores it after)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.pop(STATE_KEYS)).split(" ")
    rounding_seed = int(config.pop(ROUNDING_SEED))
    received = parameters_to_ndarrays(fitins.parameters)
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in zip(keys, received, strict=True)})
    inner = copy.copy(msg)
    inner.content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    reply = call_next(inner, context)
    if reply.has_error():
        raise _SiteFailed(reply)
    trained = reply.content["arrays"]
    update = [
        np.asarray(trained[k].numpy() - v, dtype=np.float32)
        if np.issubdtype(v.dtype, np.floating)
        else np.zeros(v.shape, np.float32)
        for k, v in zip(keys, received, strict=True)
    ]
    metrics = dict(reply.content["metrics"])
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(update),
        num_examples=int(metrics["num-examples"]),
        metrics=metrics,
    )
    np.random.seed(rounding_seed)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` for the SecAgg+ protocol's messages (they carry its config record),
    with the site's train handler behind ``_as_fitres``; any other message goes straight on.
    A failure of the handler leaves as the handler's own reply (its category only); a failure
    of the protocol itself is a ``SecureAggregationError``."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def handler(inner: Message, ctx: Context) -> Message:
        return _as_fitres(inner, ctx, call_next)

    try:
        with global_rngs_restored():
            return secaggplus_mod(msg, context, handler)
    except _SiteFailed as failed:
        return Message(error=failed.reply.error, reply_to=msg)
    except Exception as err:
        raise SecureAggregationError(f"SecAgg+ step failed: {err}") from err

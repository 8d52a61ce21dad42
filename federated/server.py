"""The server's side of a federated run: start or resume, run the strategy's rounds, select
and checkpoint the global model every round, have the sites score the selected model, and
report like a central run.

The coordinator holds no patients. Every round (after aggregation) the sampled sites score the
global model on their own validation split (``server.eval_split``) and reply with scalars; the
server takes their example-weighted aggregate (``federated.strategy.finite_weighted_mean``) as
the round's ``val/*`` metrics, selects the best round on ``task.monitor`` of it, and appends a
line with the aggregate and each site's own metrics and count to
``{out_dir}/round_metrics.jsonl`` (rewritten atomically, so a resumed run never repeats a round),
with the node ids of the sites whose updates the round's model holds (``sites.trained_nodes``)
and of the sampled sites that sent none (``sites.dropped_nodes``).
Only when ``server.eval_data`` names a held-out dataset the coordinator owns does it read shards:
it then scores each round's model on that dataset's ``server.eval_split`` and selects on that
(``val/*``), the sites' aggregate going to ``sites/val/*``; and its rounds start at 0 (the
initial model scored).

With ``federated.secure.enabled`` each round's training is a SecAgg+ round
(``federated.secure.SecureGrid``): the server learns only the sites' weighted sum.

Run twice with the same seed (a simulation: ``federated.sim_process``), a run writes the same
numbers to its round log, checkpoints and report, timings aside: the sites' data order and
dropout, their node ids (and so the order their replies are aggregated in), their sampling and
SecAgg+'s rounding are drawn from the seed; DP noise is not (``federated.streams`` says why).

Every round writes ``checkpoint_{round:06d}/model.pt`` in the project's checkpoint format
(atomic; ``dipro.runs.step_checkpoint``, the run directory of a Ray Train run names them alike)
and keeps the best round's and the last ``KEEP_LAST`` rounds' (``dipro.runs.prune_checkpoints``).
The checkpoint's ``epoch`` holds the round; ``extra`` the round, the best round and its metric.
Normalisation: each site normalises with statistics fitted on its own training split, so a
federated checkpoint carries
none (``extra["site_normalisation"]``: whoever scores it uses the statistics of their own
data's training split, as a site does); with ``server.eval_data`` it carries that dataset's.

Resume: started again with the same ``out_dir``, the run loads its newest checkpoint that loads
(``dipro.runs.resume_point``, as a Ray Train run does: a damaged one is skipped and named) with
the weights, round, best so far and FedAdam's moments, and plays only the remaining rounds;
Flower counts the rounds of each start from 1, the offset is added back everywhere.

At the end every connected site scores the best round's model on its own ``server.test_split``
(``SiteQuorum.evaluate_at_sites``), and ``{out_dir}/metrics.json`` is written with the keys of a
central run's (``task``, ``run_name``, ``seed``, ``best_checkpoint``, ``val``, ``test``: the
sites' aggregate, or ``server.eval_data``'s test split when set) plus the federated ones,
``site_test`` among them (each site's metrics and count, and the failures).

With ``tracking.enabled`` the run is one MLflow run (``dipro.tracking``), logged by the server
only, from what it already holds: the config (and the central dataset's identity), each round's
metrics as the round ends (step = round), the test metrics and ``metrics.json``. It is tracked
from its directory (``dipro.tracking.track_run``, as a Ray Train run is) when it starts, so a
resumed run's earlier rounds come from its round log, and when it ends.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from dipro import checkpoint as ckpt_io
from dipro import storage, tracking
from dipro.data.layout import Manifest, list_shards
from dipro.data.shard_reader import read_batches
from dipro.engine import evaluate
from dipro.evaluation import evaluate_checkpoint
from dipro.model import DiPro, build_model
from dipro.runs import (
    ROUND_METRICS_FILE,
    SUMMARY_FILE,
    BestMetric,
    append_log,
    prune_checkpoints,
    resume_point,
    step_checkpoint,
    write_summary,
)
from dipro.settings import FederatedSettings, to_dict
from federated.config import FederatedRun, check_config, site_config, train_config_record
from federated.local_state import global_part, local_keys, with_local
from federated.privacy import PrivacyBudget
from federated.secure import SecureGrid, build_workflow
from federated.strategy import (
    RoundSites,
    ServerOptimizerState,
    SiteQuorum,
    build_strategy,
    metric_name,
)

logger = logging.getLogger("flwr")

KEEP_LAST = 2  # the last rounds' checkpoints kept besides the best round's


@dataclass(frozen=True)
class FederatedResult:
    """What a finished federated run leaves."""

    out_dir: str
    best_checkpoint: str
    final_checkpoint: str
    best_round: int
    rounds: int
    best_val: dict[str, float]
    test_metrics: dict[str, float] | None


class RoundRecorder:
    """Flower's ``evaluate_fn``: select, log and checkpoint the global model of each round."""

    def __init__(
        self,
        run: FederatedRun,
        central: Manifest | None,
        model: DiPro,
        quorum: SiteQuorum,
        server_state: ServerOptimizerState,
        *,
        round_offset: int,
        best_round: int | None,
        best_metric: float | None,
        local: frozenset[str] = frozenset(),
        tracked: tuple[tracking.Tracker, str] | None = None,
    ) -> None:
        self.run = run
        self.tracked = tracked
        self.model = model
        self.local = local
        self.quorum = quorum
        self.server_state = server_state
        self.round_offset = round_offset
        self.best_round = best_round
        self.best = BestMetric(run.task.monitor_mode, best_metric)
        self.privacy = PrivacyBudget.of(run.federated.dp)
        self.norm_stats = None if central is None else central.norm_statistics()
        self.eval_paths = (
            []
            if central is None or run.server.eval_data is None
            else list_shards(run.server.eval_data, run.task.name, run.server.eval_split)
        )
        self.out_dir = run.out_dir
        self.started = time.monotonic()

    def _path(self, name: str) -> str:
        return storage.join(self.out_dir, name)

    def _central_val(self) -> dict[str, float]:
        metrics, _ = evaluate(
            self.model,
            read_batches(
                self.eval_paths,
                self.run.train.eval_batch_size,
                self.run.model.region_mode,
                self.norm_stats,
            ),
            device="cpu",
        )
        return {f"val/{k}": float(v) for k, v in metrics.items()}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        run_round = self.round_offset + server_round
        if server_round == 0 and (self.round_offset > 0 or not self.eval_paths):
            return None  # resumed weights were scored when their round ended; no central set
        load_global_part(
            self.model, arrays.to_torch_state_dict(), self.local,
            f"the global model of round {run_round}",
        )  # fmt: skip
        sites = self.quorum.rounds.get(server_round, RoundSites())
        at_sites = {"val/" + metric_name(k): v for k, v in sites.evaluate_metrics.items()}
        if self.eval_paths:
            val = self._central_val()
            record: dict[str, Any] = {
                "round": run_round,
                **val,
                **{"sites/" + k: v for k, v in at_sites.items()},
            }
        else:
            val = at_sites
            record = {"round": run_round, **val}
        if server_round > 0:
            record.update(
                {"train/" + k.removeprefix("train-"): v for k, v in sites.train_metrics.items()}
            )
            record["sites"] = sites.summary()
        epsilon = None if self.privacy is None else self.privacy.spent(run_round)
        if epsilon is not None:
            record["dp/epsilon"] = epsilon
            record["dp/delta"] = self.privacy.delta
        record["seconds"] = time.monotonic() - self.started
        self.started = time.monotonic()
        if run_round > 0:
            self._checkpoint(run_round, val)
        append_log(self._path(ROUND_METRICS_FILE), record, "round")
        if self.tracked is not None:
            self.tracked[0].log_history(self.tracked[1], [record], "round")
        monitor = self.run.task.monitor
        logger.info(
            "round %d: train loss %.4f  val loss %.4f  %s %.4f (best %s at round %s; %d site(s) "
            "evaluated)  %.1f s; trained: nodes %s, dropped: nodes %s",
            run_round,
            record.get("train/loss", math.nan),
            val.get("val/loss", math.nan),
            monitor,
            val.get(monitor, math.nan),
            "n/a" if self.best.best is None else f"{self.best.best:.4f}",
            self.best_round,
            sites.evaluated,
            record["seconds"],
            sites.trained_nodes or "none",
            sites.summary()["dropped_nodes"] or "none",
        )
        return MetricRecord({k: v for k, v in val.items() if "/per_finding/" not in k})

    def _checkpoint(self, run_round: int, val: dict[str, float]) -> None:
        run = self.run
        improved = self.best.update(float(val.get(run.task.monitor, math.nan)))
        if improved:
            self.best_round = run_round
        extra = {
            "round": run_round,
            "best_round": self.best_round,
            "strategy": run.strategy.name,
            "local_epochs": run.federated.local_epochs,
            "run_name": run.run_name,
            "metrics": val,
            "site_normalisation": self.norm_stats is None,
        }
        if self.local:
            extra["site_local_keys"] = sorted(self.local)
        ckpt_io.save_checkpoint(
            step_checkpoint(self.out_dir, run_round),
            self.model,
            model_cfg=run.model,
            task=run.task.name,
            optimizer=self.server_state,  # FedAdam's moments (duck-typed state_dict)
            epoch=run_round,
            best_metric=self.best.best,
            norm_stats=self.norm_stats,
            extra=extra,
            exclude=self.local,
        )
        keep = [step_checkpoint(self.out_dir, r) for r in range(run_round, 0, -1)[:KEEP_LAST]]
        if self.best_round is not None:
            keep.append(step_checkpoint(self.out_dir, self.best_round))
        prune_checkpoints(self.out_dir, keep)


def load_global_part(
    model: DiPro, weights: Mapping[str, torch.Tensor], local: frozenset[str], where: str
) -> None:
    """Load the global ``weights`` into ``model`` strictly; its site-local keys (which the server
    never holds) keep the values they have."""
    ckpt_io.load_weights(model, with_local(weights, model.state_dict(), local), where)


def _rounds_within_budget(fed: FederatedSettings) -> int:
    """``federated.num_rounds``, or fewer when ``federated.dp.target_epsilon`` allows fewer."""
    planned = fed.num_rounds
    budget = PrivacyBudget.of(fed.dp)
    if budget is None:
        return planned
    allowed = budget.rounds_within(planned)
    if allowed < planned:
        logger.info(
            "federated.dp.target_epsilon=%g allows %d of %d rounds (epsilon %.3f at delta %g): "
            "the run stops after round %d",
            budget.target_epsilon,
            allowed,
            planned,
            budget.epsilon(allowed),
            budget.delta,
            allowed,
        )
    return allowed


def run_server(grid: Grid, cfg: Mapping[str, Any]) -> FederatedResult:
    """Run (or resume) the federated run ``cfg`` (resolved ``configs/federated.yaml``) over the
    sites reachable through ``grid``; return where its results are."""
    run, central = check_config(cfg)
    sites_cfg = site_config(run)
    fed = run.federated
    num_rounds = _rounds_within_budget(fed)
    model = build_model(run.model, run.task.name, seed=run.seed)
    local = local_keys(model, fed.local)
    base, quorum = build_strategy(run.strategy, fed, site_lr=run.optim.lr, seed=run.seed)
    server_state = ServerOptimizerState(base)

    done, best_round, best_metric = 0, None, None
    found = resume_point(
        run.out_dir,
        ckpt_io.read_checkpoint,
        lambda err: logger.warning("resume: skipped %s", err),
        error=ckpt_io.CheckpointError,
    )
    if found is not None:
        last, payload = found
        load_global_part(model, payload["weights"], local, last)
        state = ckpt_io.meta_of(payload, last)
        done = int(state.extra["round"])
        best_round, best_metric = state.extra["best_round"], state.best_metric
        if state.optimizer_state is not None:
            server_state.load_state_dict(state.optimizer_state)
        logger.info("resuming %s after round %d of %d", run.run_name, done, num_rounds)

    tracked = None
    tracker = tracking.open_tracker(run.tracking)
    dataset = (
        {}
        if central is None or run.server.eval_data is None
        else tracking.dataset_identity(run.server.eval_data, central.to_dict())
    )
    params = {**tracking.flatten(cfg), **dataset}
    if tracker is not None:  # a resumed run's rounds so far are logged from its round log
        started = tracking.track_run(tracker, run.out_dir, run.run_name, "federated", params)
        tracked = None if started is None else (tracker, started[0])
    recorder = RoundRecorder(
        run,
        central,
        model,
        quorum,
        server_state,
        round_offset=done,
        best_round=best_round,
        best_metric=best_metric,
        local=local,
        tracked=tracked,
    )
    if done < num_rounds:
        secure = fed.secure
        quorum.start(
            grid=SecureGrid(grid, build_workflow(secure, fed.round_timeout_s), run.seed, done)
            if secure.enabled
            else grid,
            initial_arrays=ArrayRecord(global_part(model.state_dict(), local)),
            num_rounds=num_rounds - done,
            timeout=fed.round_timeout_s,
            train_config=train_config_record(sites_cfg, done),
            evaluate_config=train_config_record(sites_cfg, done, run.server.eval_split),
            evaluate_fn=recorder,
        )
    result = write_report(run, score_at_sites(grid, run, quorum, sites_cfg))
    if tracked is not None:
        tracker, run_id = tracked
        tracking.track_run(tracker, result.out_dir, run.run_name, "federated", params)
        tracker.finish(run_id)
    return result


def last_and_selected(out_dir: str) -> tuple[str, str]:
    """The run's newest checkpoint that loads and the best round's (the newest one when the
    monitor was never finite)."""
    found = resume_point(
        out_dir, ckpt_io.read_checkpoint, lambda _: None, error=ckpt_io.CheckpointError
    )
    if found is None:
        raise ckpt_io.CheckpointError(f"{out_dir}: the run holds no checkpoint that loads")
    last, payload = found
    best_round = ckpt_io.meta_of(payload, last).extra.get("best_round")
    best = last if best_round is None else step_checkpoint(out_dir, int(best_round))
    return last, best if storage.exists(best) else last


def score_at_sites(
    grid: Grid, run: FederatedRun, quorum: SiteQuorum, sites_cfg: Mapping[str, Any]
) -> RoundSites | None:
    """Every connected site scores the selected model on its own ``server.test_split``
    (None when the run has no test split)."""
    split = run.server.test_split
    if split is None:
        return None
    _, selected = last_and_selected(run.out_dir)
    payload = ckpt_io.read_checkpoint(selected)
    best_round = int(ckpt_io.meta_of(payload, selected).extra["round"])
    sites = quorum.evaluate_at_sites(
        grid,
        ArrayRecord(payload["weights"]),
        train_config_record(sites_cfg, best_round, split),
        run.federated.round_timeout_s,
    )
    logger.info(
        "test of round %d's model at %d of %d site(s): %s",
        best_round,
        sites.evaluated,
        sites.sampled,
        {metric_name(k): round(v, 4) for k, v in sites.evaluate_metrics.items()},
    )
    return sites


def write_report(run: FederatedRun, site_test: RoundSites | None) -> FederatedResult:
    """``metrics.json`` of the run: the selected round, its validation metrics and its test
    metrics (the sites' aggregate, or the central ``server.eval_data`` test split when set),
    each site's test metrics and count, the privacy spent."""
    out_dir = run.out_dir
    last, best = last_and_selected(out_dir)
    best_extra = ckpt_io.meta_of(ckpt_io.read_checkpoint(best), best).extra
    rounds = int(ckpt_io.meta_of(ckpt_io.read_checkpoint(last), last).extra["round"])
    server = run.server
    at_sites = (
        None
        if site_test is None or not site_test.per_site
        else {metric_name(k): v for k, v in site_test.evaluate_metrics.items()}
    )
    test = at_sites
    if server.eval_data is not None and server.test_split is not None:
        paths = list_shards(server.eval_data, run.task.name, server.test_split)
        batch_size = run.train.eval_batch_size
        test = evaluate_checkpoint(best, paths, batch_size=batch_size).metrics if paths else None
    val = {k: float(v) for k, v in best_extra["metrics"].items()}
    report: dict[str, Any] = {
        "task": run.task.name,
        "run_name": run.run_name,
        "seed": run.seed,
        "best_checkpoint": best,
        "best_round": int(best_extra["round"]),
        "selected_on": "server.eval_data" if server.eval_data is not None else "sites",
        "val": val,
        "test": test,
        "site_test": None
        if site_test is None
        else {
            "split": server.test_split,
            "aggregate": at_sites,
            "sites": site_test.per_site,
            "failures": site_test.evaluate_failures,
        },
        "round_metrics": storage.join(out_dir, ROUND_METRICS_FILE),
        "final_checkpoint": last,
        "rounds": rounds,
        "strategy": run.strategy.name,
        "local_epochs": run.federated.local_epochs,
    }
    if run.federated.secure.enabled:
        report["secure_aggregation"] = {
            "protocol": "SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow)",
            **to_dict(run.federated.secure),
        }
    budget = PrivacyBudget.of(run.federated.dp)
    if budget is not None:
        report["privacy"] = {
            "unit": "one site's update per round (site-level DP)",
            "epsilon": budget.spent(rounds),
            "delta": budget.delta,
            "noise_multiplier": budget.noise_multiplier,
            "clipping_norm": run.federated.dp.clipping_norm,
            "target_epsilon": budget.target_epsilon,
            "accountant": "opacus RDPAccountant, sample rate 1 (no sampling amplification)",
        }
    write_summary(out_dir, report)
    return FederatedResult(
        out_dir=out_dir,
        best_checkpoint=best,
        final_checkpoint=last,
        best_round=int(best_extra["round"]),
        rounds=rounds,
        best_val=val,
        test_metrics=test,
    )


def read_result(out_dir: str | Path) -> FederatedResult:
    """The result of a finished run from its ``metrics.json``."""
    report = json.loads(storage.read_bytes(storage.join(str(out_dir), SUMMARY_FILE)))
    return FederatedResult(
        out_dir=str(out_dir),
        best_checkpoint=report["best_checkpoint"],
        final_checkpoint=report["final_checkpoint"],
        best_round=int(report["best_round"]),
        rounds=int(report["rounds"]),
        best_val=report["val"],
        test_metrics=report["test"],
    )

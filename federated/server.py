"""The server's side of a federated run: start or resume, run the strategy's rounds, evaluate
and checkpoint the global model every round, and report like a central run.

Every round (after aggregation) the server scores the global model on its held-out data
(``server.eval_split`` of ``server.data_root``, all hospitals) through ``dipro.engine.evaluate``
and the one collate, appends a line to ``{out_dir}/round_metrics.jsonl`` (rewritten atomically,
so a resumed run never repeats a round) and writes ``checkpoints/last.pt`` and, when
``task.monitor`` improves, ``checkpoints/best.pt`` in the project's checkpoint format (atomic).
The checkpoint's ``epoch`` holds the round; ``extra`` the round, the best round and its metric.

Normalisation on the server: the sites each fit their own statistics on their own training
shards; the server normalises its held-out data with the statistics of its dataset's training
split (its manifest) and stores those in the checkpoints, so ``dipro.evaluation`` scores a
federated checkpoint exactly as the server did.

Resume: started again with the same ``out_dir``, the run loads ``last.pt`` (weights, round,
best so far and FedAdam's moments) and plays only the remaining rounds; Flower counts the rounds
of each start from 1, the offset is added back everywhere.

At the end the best round's checkpoint is scored on ``server.test_split`` with
``dipro.evaluation.evaluate_checkpoint`` and ``{out_dir}/metrics.json`` is written with the keys
of a central run's (``task``, ``run_name``, ``seed``, ``best_checkpoint``, ``val``, ``test``)
plus the federated ones.

With ``tracking.enabled`` the run is one MLflow run (``dipro.tracking``), logged by the server
only, from what it already holds: the config and dataset identity, each round's metrics as the
round ends (step = round), the test metrics and ``metrics.json``.
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
from dipro.data.shards import Manifest, list_shards
from dipro.engine import evaluate
from dipro.evaluation import evaluate_checkpoint
from dipro.model import DiPro, build_model
from dipro.runs import ROUND_METRICS_FILE, BestMetric, append_log, read_log
from federated.config import check_config, site_config, train_config_record
from federated.privacy import PrivacyBudget
from federated.site import batches
from federated.strategy import ServerOptimizerState, SiteQuorum, build_strategy

logger = logging.getLogger("flwr")

LAST_CHECKPOINT = "checkpoints/last.pt"
BEST_CHECKPOINT = "checkpoints/best.pt"
REPORT_FILE = "metrics.json"


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
    """Flower's ``evaluate_fn``: score, log and checkpoint the global model of each round."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        manifest: Manifest,
        model: DiPro,
        quorum: SiteQuorum,
        server_state: ServerOptimizerState,
        *,
        round_offset: int,
        best_round: int | None,
        best_metric: float | None,
        tracked: tuple[tracking.Tracker, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tracked = tracked
        self.model = model
        self.quorum = quorum
        self.server_state = server_state
        self.round_offset = round_offset
        self.best_round = best_round
        self.best = BestMetric(cfg["task"]["monitor_mode"], best_metric)
        self.privacy = PrivacyBudget.of_run(cfg)
        self.norm_stats = manifest.norm()
        self.out_dir = str(cfg["out_dir"])
        self.eval_paths = list_shards(
            cfg["server"]["data_root"], cfg["task"]["name"], cfg["server"]["eval_split"]
        )
        self.started = time.monotonic()

    def _path(self, name: str) -> str:
        return storage.join(self.out_dir, name)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        run_round = self.round_offset + server_round
        if server_round == 0 and self.round_offset > 0:
            return None  # the resumed weights were scored when their round ended
        ckpt_io.load_weights(
            self.model, arrays.to_torch_state_dict(), f"the global model of round {run_round}"
        )
        cfg = self.cfg
        metrics, _ = evaluate(
            self.model,
            batches(
                self.eval_paths,
                int(cfg["train"]["eval_batch_size"]),
                cfg["model"]["region_mode"],
                self.norm_stats,
            ),
            device="cpu",
        )
        val = {f"val/{k}": float(v) for k, v in metrics.items()}
        record: dict[str, Any] = {"round": run_round, **val}
        sites = self.quorum.rounds.get(server_round)
        if sites is not None:
            record.update(
                {"train/" + k.removeprefix("train-"): v for k, v in sites.train_metrics.items()}
            )
            record.update(
                {
                    "sites/val/" + k.removeprefix("val-"): v
                    for k, v in sites.evaluate_metrics.items()
                }
            )
            record["sites"] = {
                "sampled": sites.sampled,
                "updated": sites.updated,
                "failures": sites.failures,
            }
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
        monitor = cfg["task"]["monitor"]
        logger.info(
            "round %d: train loss %.4f  val loss %.4f  %s %.4f (best %s at round %s)  %.1f s",
            run_round,
            record.get("train/loss", math.nan),
            val.get("val/loss", math.nan),
            monitor,
            val.get(monitor, math.nan),
            "n/a" if self.best.best is None else f"{self.best.best:.4f}",
            self.best_round,
            record["seconds"],
        )
        return MetricRecord({k: v for k, v in val.items() if "/per_finding/" not in k})

    def _checkpoint(self, run_round: int, val: dict[str, float]) -> None:
        task = self.cfg["task"]
        improved = self.best.update(float(val.get(task["monitor"], math.nan)))
        if improved:
            self.best_round = run_round
        fed = self.cfg["federated"]
        extra = {
            "round": run_round,
            "best_round": self.best_round,
            "strategy": self.cfg["strategy"]["name"],
            "local_epochs": int(fed["local_epochs"]),
            "run_name": self.cfg["run_name"],
            "metrics": val,
        }
        targets = [BEST_CHECKPOINT, LAST_CHECKPOINT] if improved else [LAST_CHECKPOINT]
        for name in targets:
            ckpt_io.save_checkpoint(
                self._path(name),
                self.model,
                model_cfg=self.cfg["model"],
                task=task["name"],
                optimizer=self.server_state,  # FedAdam's moments (duck-typed state_dict)
                epoch=run_round,
                best_metric=self.best.best,
                norm_stats=self.norm_stats,
                extra=extra,
            )


def _initial_model(cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> DiPro:
    torch.manual_seed(int(cfg["seed"]))
    return build_model(model_cfg, cfg["task"]["name"])


def _rounds_within_budget(cfg: Mapping[str, Any]) -> int:
    """``federated.num_rounds``, or fewer when ``federated.dp.target_epsilon`` allows fewer."""
    planned = int(cfg["federated"]["num_rounds"])
    budget = PrivacyBudget.of_run(cfg)
    if budget is None:
        return planned
    allowed = budget.rounds_within(planned)
    if allowed < planned:
        logger.info(
            "federated.dp.target_epsilon=%g allows %d of %d rounds (epsilon %.3f at delta %g): "
            "the run stops after round %d",
            budget.target_epsilon, allowed, planned, budget.epsilon(allowed), budget.delta, allowed,
        )
    return allowed


def run_server(grid: Grid, cfg: Mapping[str, Any]) -> FederatedResult:
    """Run (or resume) the federated run ``cfg`` (resolved ``configs/federated.yaml``) over the
    sites reachable through ``grid``; return where its results are."""
    manifest = check_config(cfg)
    sites_cfg = site_config(cfg, manifest)
    fed = cfg["federated"]
    num_rounds = _rounds_within_budget(cfg)
    model = _initial_model(cfg, sites_cfg["model"])
    base, quorum = build_strategy(cfg)
    server_state = ServerOptimizerState(base)

    last = storage.join(str(cfg["out_dir"]), LAST_CHECKPOINT)
    done, best_round, best_metric = 0, None, None
    if storage.exists(last):
        payload = ckpt_io.read_checkpoint(last)
        ckpt_io.load_weights(model, payload["weights"], last)
        training = payload["training"]
        done = int(training["extra"]["round"])
        best_round, best_metric = training["extra"]["best_round"], training["best_metric"]
        if training["optimizer"] is not None:
            server_state.load_state_dict(training["optimizer"])
        logger.info("resuming %s after round %d of %d", cfg["run_name"], done, num_rounds)

    tracked = None
    tracker = tracking.open_tracker(cfg)
    if tracker is not None:
        run_id = tracker.run(str(cfg["out_dir"]), str(cfg["run_name"]), "federated")
        dataset = tracking.dataset_identity(str(cfg["server"]["data_root"]), manifest.to_dict())
        tracker.log_params(run_id, {**tracking.flatten(cfg), **dataset})
        tracked = (tracker, run_id)
    recorder = RoundRecorder(
        cfg,
        manifest,
        model,
        quorum,
        server_state,
        round_offset=done,
        best_round=best_round,
        best_metric=best_metric,
        tracked=tracked,
    )
    if done < num_rounds:
        config = train_config_record(sites_cfg, done)
        quorum.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=num_rounds - done,
            timeout=float(fed["round_timeout_s"]),
            train_config=config,
            evaluate_config=train_config_record(sites_cfg, done),
            evaluate_fn=recorder,
        )
    result = write_report(cfg)
    if tracked is not None:
        tracker, run_id = tracked
        rounds = read_log(storage.join(result.out_dir, ROUND_METRICS_FILE))
        tracker.log_history(run_id, rounds, "round")
        tracker.log_summary(run_id, result.test_metrics or {}, "test/")
        tracker.log_files(run_id, [storage.join(result.out_dir, REPORT_FILE)], None)
        tracker.finish(run_id)
    return result


def write_report(cfg: Mapping[str, Any]) -> FederatedResult:
    """Score the best round's checkpoint (the last one when the monitor was never finite) on the
    test split with ``dipro.evaluation.evaluate_checkpoint``; write ``metrics.json``."""
    out_dir = str(cfg["out_dir"])
    last = storage.join(out_dir, LAST_CHECKPOINT)
    best = storage.join(out_dir, BEST_CHECKPOINT)
    if not storage.exists(best):
        best = last
    best_extra = ckpt_io.read_checkpoint(best)["training"]["extra"]
    rounds = int(ckpt_io.read_checkpoint(last)["training"]["extra"]["round"])
    test_paths = list_shards(
        cfg["server"]["data_root"], cfg["task"]["name"], cfg["server"]["test_split"]
    )
    batch_size = int(cfg["train"]["eval_batch_size"])
    test = (
        evaluate_checkpoint(best, test_paths, batch_size=batch_size).metrics if test_paths else None
    )
    val = {k: float(v) for k, v in best_extra["metrics"].items()}
    report = {
        "task": cfg["task"]["name"],
        "run_name": cfg["run_name"],
        "seed": int(cfg["seed"]),
        "best_checkpoint": best,
        "best_round": int(best_extra["round"]),
        "val": val,
        "test": test,
        "round_metrics": storage.join(out_dir, ROUND_METRICS_FILE),
        "final_checkpoint": last,
        "rounds": rounds,
        "strategy": cfg["strategy"]["name"],
        "local_epochs": int(cfg["federated"]["local_epochs"]),
    }
    budget = PrivacyBudget.of_run(cfg)
    if budget is not None:
        report["privacy"] = {
            "unit": "one site's update per round (site-level DP)",
            "epsilon": budget.spent(rounds),
            "delta": budget.delta,
            "noise_multiplier": budget.noise_multiplier,
            "clipping_norm": float(cfg["federated"]["dp"]["clipping_norm"]),
            "target_epsilon": budget.target_epsilon,
            "accountant": "opacus RDPAccountant, sample rate 1 (no sampling amplification)",
        }
    storage.write_bytes_atomic(
        storage.join(out_dir, REPORT_FILE), json.dumps(report, indent=2).encode()
    )
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
    report = json.loads(storage.read_bytes(storage.join(str(out_dir), REPORT_FILE)))
    return FederatedResult(
        out_dir=str(out_dir),
        best_checkpoint=report["best_checkpoint"],
        final_checkpoint=report["final_checkpoint"],
        best_round=int(report["best_round"]),
        rounds=int(report["rounds"]),
        best_val=report["val"],
        test_metrics=report["test"],
    )

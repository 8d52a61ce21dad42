"""The federated run's configuration: composed by Hydra from ``configs/federated.yaml``, checked
before anything starts, and the part of it that travels to the sites.

``parse_run`` checks the composed config once and returns it typed (``FederatedRun``): the
server, the strategy and the simulation read their settings from it. The server is the one
source of the run's settings. Each training or evaluation message carries ``SITE_CONFIG_KEY``:
the JSON of ``SiteSettings``, what a site needs (task, model, loss, optimiser, local training,
seed), which the site parses back. Sites add only what is theirs: where their shards are (node
config).
"""

from __future__ import annotations

import json
import shlex
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dipro.config import ConfigError, Schema, validate
from dipro.data.layout import Manifest, model_dataset
from dipro.model import build_model
from dipro.settings import (
    DataSettings,
    FederatedSettings,
    ModelTraining,
    ServerSettings,
    SimulationSettings,
    Str,
    StrategySettings,
    TrackingSettings,
    parse,
    section,
    setting,
    specs_of,
    to_dict,
)
from federated.local_state import local_keys
from federated.privacy import PrivacyBudget
from federated.secure import check_secure

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SITE_CONFIG_KEY = "dipro-config"
ROUND_OFFSET_KEY = "round-offset"
EVAL_SPLIT_KEY = "eval-split"


@dataclass(frozen=True, kw_only=True)
class SiteSettings(ModelTraining):
    """What a site needs of the run; sent as JSON with every message (``SITE_CONFIG_KEY``).
    ``data`` holds the run's ``data.root`` only: a simulated site's hospital lives there."""

    federated: FederatedSettings = section(FederatedSettings)


@dataclass(frozen=True, kw_only=True)
class FederatedRun(SiteSettings):
    """The whole federated run: the site's part and what only the server reads."""

    run_name: str = setting(Str())
    out_dir: str = setting(Str())
    strategy: StrategySettings = section(StrategySettings)
    server: ServerSettings = section(ServerSettings)
    simulation: SimulationSettings = section(SimulationSettings)
    tracking: TrackingSettings = section(TrackingSettings)


def parse_run(cfg: Mapping[str, Any]) -> FederatedRun:
    """The resolved ``configs/federated.yaml`` checked and typed; ConfigError names the first
    bad key."""
    return parse(FederatedRun, validate(cfg, Schema(specs_of(FederatedRun))))


def compose_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``configs/federated.yaml`` with Hydra ``overrides``, resolved to plain containers."""
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = compose("federated", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides from Flower's run config (``[tool.flwr.app.config]`` or
    ``flwr run --run-config``): the string ``overrides``, split like a shell would."""
    return shlex.split(str(run_config.get("overrides", "")))


def check_config(cfg: Mapping[str, Any]) -> tuple[FederatedRun, Manifest | None]:
    """The typed run (``parse_run``, ConfigError before any site is contacted), checked across
    its settings, and, when ``server.eval_data`` names one, the task's manifest of the
    coordinator's own held-out dataset (None: the coordinator holds no data)."""
    run = parse_run(cfg)
    budget = PrivacyBudget.of(run.federated.dp)
    if budget is not None and budget.rounds_within(1) == 0:
        raise ConfigError(
            f"federated.dp.target_epsilon={budget.target_epsilon} is below the epsilon of one "
            f"round ({budget.epsilon(1):.3f} at delta {budget.delta}, noise_multiplier "
            f"{budget.noise_multiplier}): raise the target or the noise"
        )
    _check_local_layers(run)
    check_secure(run.federated)
    root = run.server.eval_data
    if root is None:
        if run.federated.fraction_evaluate == 0.0:
            raise ConfigError(
                "federated.fraction_evaluate=0 and no server.eval_data: nothing would score "
                "the rounds to select the best one"
            )
        return run, None
    manifest = model_dataset(
        root,
        run.task.name,
        run.model.region_mode,
        "server.eval_data",
        splits=(run.server.eval_split,),
    ).manifest
    return run, manifest


def _check_local_layers(run: FederatedRun) -> None:
    """``federated.local`` names layers of the model, and no coordinator scores a model whose
    local layers it does not hold."""
    if not run.federated.local.any:
        return
    if run.server.eval_data is not None:
        raise ConfigError(
            "federated.local keeps layers at the sites, so the coordinator cannot score the "
            "model on server.eval_data: leave it null (the sites evaluate)"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="model config: no pretrained_weights")
        model = build_model(replace(run.model, pretrained_weights=None), run.task.name)
    local_keys(model, run.federated.local)


def site_config(run: FederatedRun) -> dict[str, Any]:
    """The JSON-ready ``SiteSettings`` of the run (``model.feature_dim`` is the stored feature
    width in features mode: the simulation takes it from the sites' manifest, a deployment
    sets it)."""
    site = {f.name: getattr(run, f.name) for f in fields(SiteSettings)}
    return to_dict(SiteSettings(**{**site, "data": DataSettings(root=run.data.root)}))


def train_config_record(
    site_cfg: Mapping[str, Any], round_offset: int, eval_split: str | None = None
) -> ConfigRecord:
    """What the server sends with the global weights: the site config, the rounds already
    done before this start (Flower numbers the rounds of each start from 1) and, for an
    evaluation, the split the sites score (``val`` when absent)."""
    record = ConfigRecord(
        {SITE_CONFIG_KEY: json.dumps(site_cfg, sort_keys=True), ROUND_OFFSET_KEY: round_offset}
    )
    if eval_split is not None:
        record[EVAL_SPLIT_KEY] = eval_split
    return record


def read_site_config(record: ConfigRecord) -> tuple[SiteSettings, int]:
    """The site settings and the run's round number (``server-round`` + offset) of a
    message."""
    if SITE_CONFIG_KEY not in record:
        raise ConfigError(f"the server's message carries no {SITE_CONFIG_KEY!r}")
    cfg = parse(SiteSettings, json.loads(str(record[SITE_CONFIG_KEY])))
    server_round = int(record.get("server-round", 0)) + int(record.get(ROUND_OFFSET_KEY, 0))
    return cfg, server_round

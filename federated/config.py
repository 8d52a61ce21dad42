"""The federated run's configuration: composed by Hydra from ``configs/federated.yaml``, checked
before anything starts, and the part of it that travels to the sites.

The server is the one source of the run's settings. Each training or evaluation message carries
``SITE_CONFIG_KEY``: the JSON of the settings a site needs (task, model, loss, optimiser, local
training, seed). Sites add only what is theirs: where their shards are (node config).
"""

from __future__ import annotations

import json
import shlex
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dipro.config import FEDERATED_SCHEMA, ConfigError, validate
from dipro.data.layout import Manifest, model_dataset
from dipro.model import build_model
from federated.local_state import keeps_layers, local_keys
from federated.privacy import PrivacyBudget
from federated.secure import check_secure

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SITE_CONFIG_KEY = "dipro-config"
ROUND_OFFSET_KEY = "round-offset"
EVAL_SPLIT_KEY = "eval-split"
STRATEGIES = ("fedavg", "fedprox", "fedadam")
_SITE_SECTIONS = ("seed", "task", "model", "loss", "optim", "train", "federated", "data")


def compose_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``configs/federated.yaml`` with Hydra ``overrides``, resolved to plain containers."""
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = compose("federated", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides from Flower's run config (``[tool.flwr.app.config]`` or
    ``flwr run --run-config``): the string ``overrides``, split like a shell would."""
    return shlex.split(str(run_config.get("overrides", "")))


def check_config(cfg: Mapping[str, Any]) -> Manifest | None:
    """Validate the settings (``dipro.config.FEDERATED_SCHEMA``, ConfigError before any site
    is contacted) and, when ``server.eval_data`` names one, the coordinator's own held-out
    dataset; return the task's manifest there (None: the coordinator holds no data)."""
    validate(cfg, FEDERATED_SCHEMA)
    if cfg["strategy"]["name"] not in STRATEGIES:
        raise ConfigError(
            f"strategy.name={cfg['strategy']['name']!r} is not one of {', '.join(STRATEGIES)}"
        )
    budget = PrivacyBudget.of_run(cfg)
    if budget is not None and budget.rounds_within(1) == 0:
        raise ConfigError(
            f"federated.dp.target_epsilon={budget.target_epsilon} is below the epsilon of one "
            f"round ({budget.epsilon(1):.3f} at delta {budget.delta}, noise_multiplier "
            f"{budget.noise_multiplier}): raise the target or the noise"
        )
    _check_local_layers(cfg)
    check_secure(cfg)
    root = cfg["server"]["eval_data"]
    if root is None:
        if float(cfg["federated"]["fraction_evaluate"]) == 0.0:
            raise ConfigError(
                "federated.fraction_evaluate=0 and no server.eval_data: nothing would score "
                "the rounds to select the best one"
            )
        return None
    return model_dataset(
        root,
        cfg["task"]["name"],
        cfg["model"]["region_mode"],
        "server.eval_data",
        splits=(cfg["server"]["eval_split"],),
    ).manifest


def _check_local_layers(cfg: Mapping[str, Any]) -> None:
    """``federated.local`` names layers of the model, and no coordinator scores a model whose
    local layers it does not hold."""
    spec = cfg["federated"].get("local")
    if not keeps_layers(spec):
        return
    if cfg["server"]["eval_data"] is not None:
        raise ConfigError(
            "federated.local keeps layers at the sites, so the coordinator cannot score the "
            "model on server.eval_data: leave it null (the sites evaluate)"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="model config: no pretrained_weights")
        model = build_model({**cfg["model"], "pretrained_weights": None}, cfg["task"]["name"])
    local_keys(model, spec)


def site_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a site needs (``model.feature_dim`` is the stored feature width in
    features mode: the simulation takes it from the sites' manifest, a deployment sets it)."""
    out = {key: cfg[key] for key in _SITE_SECTIONS}
    out["data"] = {"root": cfg["data"]["root"]}
    return out


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


def read_site_config(record: ConfigRecord) -> tuple[dict[str, Any], int]:
    """The site config and the run's round number (``server-round`` + offset) of a message."""
    if SITE_CONFIG_KEY not in record:
        raise ConfigError(f"the server's message carries no {SITE_CONFIG_KEY!r}")
    cfg = json.loads(str(record[SITE_CONFIG_KEY]))
    server_round = int(record.get("server-round", 0)) + int(record.get(ROUND_OFFSET_KEY, 0))
    return cfg, server_round

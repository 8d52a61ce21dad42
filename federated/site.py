"""One hospital's side of a federated run: its own shards, its own normalisation and class
weights, and local training or evaluation through the shared engine.

A site never reads another site's shards. Its EHR/demographic normalisation is fitted on its
own training shards (``dipro.data.normalize.fit_norm_stats``) and its class weights are counted
on its own training labels (``LabelCounts``); neither leaves the site. Pooling label counts
across sites would give the central run's weights but reveal each site's label distribution,
so the federated loss is weighted per site.

Which shards are the site's: in a deployment the SuperNode's ``--node-config`` names
``data-path`` (a dataset root in the project's shard layout) and optionally ``hospital-id``
(only that hospital's shards of it); in a simulation the node has ``partition-id`` and the site
is the dataset's ``partition-id``-th hospital under the run's ``data.root``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from dipro.checkpoint import load_weights
from dipro.config import ConfigError
from dipro.data.labels import LABEL_COLUMNS
from dipro.data.layout import Dataset
from dipro.data.normalize import NORM_COLUMNS, NormStats, fit_norm_stats
from dipro.data.shard_reader import read_batches, read_table, verify_shards
from dipro.engine import build_optimizer, evaluate, train_epoch
from dipro.losses import ClassWeights, LabelCounts, build_loss
from dipro.model import build_model
from dipro.seeds import stream_seed
from federated.config import SiteSettings
from federated.local_state import local_keys, with_local


class InjectedSiteFault(RuntimeError):
    """Raised by ``federated.fail_at`` to test a site failing during a round."""


@dataclass(frozen=True)
class Site:
    """The data of one site: where its shards are and what it fitted on its training split."""

    root: str
    task: str
    hospitals: tuple[int, ...]
    train_paths: tuple[str, ...]
    val_paths: tuple[str, ...]
    test_paths: tuple[str, ...]
    norm_stats: NormStats
    class_weights: ClassWeights
    num_train: int

    def split_paths(self, split: str) -> tuple[str, ...]:
        """The site's shards of ``split`` (train, val or test)."""
        return {"train": self.train_paths, "val": self.val_paths, "test": self.test_paths}[split]

    @property
    def name(self) -> str:
        return f"hospital {','.join(map(str, self.hospitals))} of {self.root}"


def load_site(node_config: Mapping[str, Any], run: SiteSettings) -> Site:
    """The site a SuperNode serves (module docstring), with its statistics fitted."""
    task = run.task.name
    if "data-path" in node_config:
        root = str(node_config["data-path"])
        dataset = Dataset.open(root, task)
        hospitals = (
            (int(node_config["hospital-id"]),)
            if "hospital-id" in node_config
            else tuple(dataset.manifest.hospitals)
        )
    elif "partition-id" in node_config:
        root = run.data.root
        dataset = Dataset.open(root, task)
        partition = int(node_config["partition-id"])
        known = dataset.manifest.hospitals
        if partition >= len(known):
            raise ConfigError(
                f"simulated site {partition} has no hospital: the {task} dataset under {root} "
                f"has hospitals {known}"
            )
        hospitals = (known[partition],)
    else:
        raise ConfigError(
            "the SuperNode's node config names no data-path (start it with "
            "--node-config 'data-path=\"/path/to/shards\"')"
        )
    manifest = dataset.manifest
    missing = sorted(set(hospitals) - set(manifest.hospitals))
    if missing:
        raise ConfigError(
            f"hospital-id {missing} is not in the {task} dataset under {root} "
            f"(it has {manifest.hospitals})"
        )
    train = tuple(dataset.shards("train", hospitals))
    if not train:
        raise ConfigError(f"no training shards for hospital {hospitals} under {root}")
    val = tuple(dataset.shards("val", hospitals))
    test = tuple(dataset.shards("test", hospitals))
    verify_shards(dataset, train + val + test, checksums=run.data.verify_checksums)
    norm_stats, class_weights = _fit(train, tuple(sorted(manifest.files.items())))
    return Site(
        root=root,
        task=task,
        hospitals=hospitals,
        train_paths=train,
        val_paths=val,
        test_paths=test,
        norm_stats=norm_stats,
        class_weights=class_weights,
        num_train=sum(manifest.counts["train"].get(str(h), 0) for h in hospitals),
    )


@functools.lru_cache(maxsize=16)
def _fit(
    train: tuple[str, ...], digests: tuple[tuple[str, str], ...]
) -> tuple[NormStats, ClassWeights]:
    """EHR normalisation statistics and class weights of a training split, fitted once per
    process for the dataset the manifest's shard ``digests`` identify (every message of a run
    reuses them; a rewritten dataset is fitted anew)."""
    stats = fit_norm_stats(_read(path, NORM_COLUMNS) for path in train)
    return stats, ClassWeights.from_counts(_label_counts(train))


def _read(path: str, columns: Sequence[str]) -> pa.Table:
    return read_table([path], columns)  # every record validated before the site fits on it


def _label_counts(paths: Sequence[str]) -> LabelCounts:
    counts = LabelCounts.zeros()
    for path in paths:
        counts = counts + LabelCounts.from_table(_read(path, LABEL_COLUMNS))
    return counts


def model_from_state(
    run: SiteSettings,
    state: Mapping[str, torch.Tensor],
    where: str,
    local_part: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The run's model with ``state`` loaded strictly (``dipro.checkpoint.load_weights``).

    With site-local layers (``federated.local``) the server's ``state`` holds only the global
    keys: the site adds its own ``local_part``, or before its first round the model's initial
    values of them (the same at every site: the model is built from the run's seed)."""
    model = build_model(run.model, run.task.name, seed=run.seed)
    local = local_keys(model, run.federated.local)
    own = model.state_dict() if local_part is None else local_part
    load_weights(model, with_local(state, own, local), where)
    return model


def train_site(
    model: nn.Module,
    site: Site,
    run: SiteSettings,
    *,
    server_round: int,
    prox_mu: float = 0.0,
) -> dict[str, float]:
    """``federated.local_epochs`` passes of the engine over the site's training shards.

    With ``prox_mu > 0`` the engine adds FedProx's term against a snapshot of the weights the
    model holds on entry (the global model). Returns the last epoch's row-weighted means
    (``loss``, ``loss/<component>``) and the totals ``samples`` and ``steps``.
    """
    fed, train = run.federated, run.train
    fail_at = fed.fail_at
    if (
        fail_at
        and int(fail_at["round"]) == server_round
        and int(fail_at["hospital"]) in site.hospitals
    ):
        raise InjectedSiteFault(f"injected failure of {site.name} in round {server_round}")
    device = fed.device
    model.to(device)
    global_params = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    loss_fn = build_loss(site.task, run.loss, site.class_weights)
    optimizer = build_optimizer(model, run.optim)
    samples = steps = 0.0
    stats: dict[str, float] = {}
    for epoch in range(fed.local_epochs):
        seed = stream_seed(run.seed, server_round, epoch, site.hospitals[0])
        torch.manual_seed(seed)
        stats = train_epoch(
            model,
            read_batches(
                site.train_paths,
                run.optim.batch_size,
                run.model.region_mode,
                site.norm_stats,
                shuffle_seed=seed,
            ),
            optimizer,
            loss_fn,
            device=device,
            accumulation_steps=train.accumulation_steps,
            max_grad_norm=train.max_grad_norm,
            prox_mu=prox_mu,
            global_params=global_params,
            max_steps=train.max_steps_per_epoch,
        )
        samples += stats["samples"]
        steps += stats["steps"]
    model.to("cpu")
    return {**stats, "samples": samples, "steps": steps}


def evaluate_site(
    model: nn.Module, site: Site, run: SiteSettings, split: str = "val"
) -> dict[str, float]:
    """The task's metrics of ``model`` on the site's ``split`` shards (its own statistics)."""
    device = run.federated.device
    model.to(device)
    loss_fn = build_loss(site.task, run.loss, site.class_weights)
    metrics, predictions = evaluate(
        model,
        read_batches(
            site.split_paths(split),
            run.train.eval_batch_size,
            run.model.region_mode,
            site.norm_stats,
        ),
        loss_fn,
        device=device,
    )
    model.to("cpu")
    return {**metrics, "samples": float(len(predictions))}

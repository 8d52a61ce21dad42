"""Site-local layers: which parameters and buffers never leave a site, and the site's store of
them.

FedBN (Li et al., ICLR 2021): hospitals whose scanners differ in contrast and brightness have
different feature statistics, and averaging BatchNorm layers across them mixes those
statistics. With ``federated.local.batch_norm`` every BatchNorm layer (affine weight and bias,
running mean and variance, step counter) stays at its site; ``federated.local.layers`` names
more state-dict prefixes to keep local (for example a task head). The server aggregates,
checkpoints and sends only the other, global keys.

A site keeps its local part in files at the site: ``{state dir}/round-{R}.pt``, the local part
after its training in round R (written atomically). The state dir is the node config's
``state-path`` (a deployment), else ``{federated.site_state_dir}/site-{partition-id}`` (a
simulation). Flower's ``context.state`` lives in the SuperNode's memory and is gone when it
restarts; the files are not, so a restarted site or a resumed run goes on with its own layers,
and the selected round's model is scored at the end with the local part of that round.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dipro import storage
from dipro.config import ConfigError
from dipro.settings import FederatedSettings, LocalLayers

STATE_FILE = "round-{round}.pt"


def local_keys(model: nn.Module, spec: LocalLayers) -> frozenset[str]:
    """The state-dict keys of ``model`` that stay at the sites under ``federated.local``
    (``batch_norm``, ``layers``); empty when nothing is local. A layer prefix that names no
    key of the model is a ConfigError."""
    keys = list(model.state_dict())
    local: set[str] = set()
    if spec.batch_norm:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                local.update(f"{name}.{key}" for key in module.state_dict())
    for prefix in spec.layers:
        matched = [k for k in keys if k == prefix or k.startswith(f"{prefix}.")]
        if not matched:
            raise ConfigError(
                f"federated.local.layers: {prefix!r} names no parameter or buffer of the model"
            )
        local.update(matched)
    return frozenset(local)


def global_part(state: Mapping[str, torch.Tensor], local: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` without the site-local keys."""
    keep = set(local)
    return {k: v for k, v in state.items() if k not in keep}


def with_local(
    weights: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    local: Iterable[str],
) -> dict[str, torch.Tensor]:
    """The global ``weights`` completed with the site-local keys' values from ``own`` (a
    site's local part, or the model's current state): a whole state dict to load strictly."""
    return {**weights, **{k: own[k] for k in local if k in own}}


def state_dir(node_config: Mapping[str, Any], fed: FederatedSettings) -> Path:
    """Where this site keeps its local layers (module docstring)."""
    if "state-path" in node_config:
        return Path(str(node_config["state-path"]))
    base = fed.site_state_dir
    if base and "partition-id" in node_config:
        return Path(base) / f"site-{int(node_config['partition-id'])}"
    raise ConfigError(
        "federated.local keeps layers at the sites, but this SuperNode has no place for them: "
        "start it with --node-config 'state-path=\"/path/at/the/site\"'"
    )


def save_local(directory: Path, run_round: int, state: Mapping[str, torch.Tensor]) -> Path:
    """Write the site's local part after its training in ``run_round`` (atomically)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    path = directory / STATE_FILE.format(round=run_round)
    directory.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(str(path), buffer.getvalue())
    return path


def load_local(directory: Path, run_round: int) -> dict[str, torch.Tensor] | None:
    """The site's local part as of ``run_round``: that of the latest round <= ``run_round``
    it trained in, or None before its first."""
    rounds = sorted(
        int(p.stem.removeprefix("round-"))
        for p in directory.glob(STATE_FILE.format(round="*"))
        if p.stem.removeprefix("round-").isdigit()
    )
    done = [r for r in rounds if r <= run_round]
    if not done:
        return None
    path = directory / STATE_FILE.format(round=done[-1])
    return torch.load(path, map_location="cpu", weights_only=True)

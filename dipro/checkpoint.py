"""The one checkpoint format: a single ``torch.save`` file that rebuilds the model on its own.

| key                 | type              | meaning                                          |
|---------------------|-------------------|--------------------------------------------------|
| format              | str               | "dipro-checkpoint"                               |
| format_version      | int               | FORMAT_VERSION of this module                    |
| data_schema_version | int               | the sample-record schema the model reads         |
| task                | str               | one of vocab.TASKS                               |
| model_cfg           | dict (json-able)  | resolved model config, input of build_model      |
| weights             | dict[str, Tensor] | state_dict of the model, unwrapped from DDP      |
| training            | dict              | optimizer and scheduler state dicts (or None),   |
|                     |                   | epoch, best_metric, norm_stats, class_weights,   |
|                     |                   | extra (json-able, e.g. a global step or a round) |

Only tensors and json-able values are stored, so the file loads with ``weights_only=True``.
Loading is strict: a missing or unexpected weight, a shape mismatch, or an unknown format or
schema version is refused with an error naming the file and the keys. The file is written
atomically (temporary file + rename, or upload + copy on an object store): a reader sees the
old checkpoint or the new one, never half of one. Paths may be local or filesystem URIs
(``dipro.storage``).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
from torch import nn

from dipro import storage, vocab
from dipro.data.normalize import NormStats
from dipro.data.schema import KNOWN_SCHEMA_VERSIONS, SCHEMA_VERSION
from dipro.engine import unwrap
from dipro.losses import ClassWeights
from dipro.model import DiPro, ModelConfig, build_model

FORMAT: Final[str] = "dipro-checkpoint"
FORMAT_VERSION: Final[int] = 1
KNOWN_FORMAT_VERSIONS: Final[frozenset[int]] = frozenset({1})
_TOP_KEYS: Final[frozenset[str]] = frozenset(
    {"format", "format_version", "data_schema_version", "task", "model_cfg", "weights", "training"}
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything in a checkpoint besides the weights."""

    path: str
    task: str
    model_cfg: dict[str, Any]
    format_version: int
    data_schema_version: int
    epoch: int | None = None
    best_metric: float | None = None
    norm_stats: NormStats | None = None
    class_weights: ClassWeights | None = None
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any, where: str) -> Any:
    """A json-able copy of ``value`` (mappings and sequences of it, e.g. an OmegaConf node)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where} holds {type(value).__name__!r}, which a checkpoint cannot store")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    model_cfg: ModelConfig | Mapping[str, Any],
    task: str,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int | None = None,
    best_metric: float | None = None,
    norm_stats: NormStats | None = None,
    class_weights: ClassWeights | None = None,
    extra: Mapping[str, Any] | None = None,
    exclude: Collection[str] = (),
) -> str:
    """Write a checkpoint of ``model`` (DDP-wrapped or not) atomically to ``path``; returns it.

    ``model_cfg`` is the resolved model config the model was built from (``build_model``'s
    input); an OmegaConf node is converted to plain containers. ``exclude``: state-dict keys
    left out of the weights (a federated model's site-local layers, listed in
    ``extra["site_local_keys"]``; such a checkpoint loads only where they are added back).
    """
    if task not in vocab.TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {vocab.TASKS}")
    weights = {
        k: v.detach().cpu() for k, v in unwrap(model).state_dict().items() if k not in exclude
    }
    training = {
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "epoch": epoch,
        "best_metric": None if best_metric is None else float(best_metric),
        "norm_stats": None if norm_stats is None else norm_stats.to_dict(),
        "class_weights": None if class_weights is None else class_weights.to_dict(),
        "extra": _plain(extra or {}, "extra"),
    }
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "data_schema_version": SCHEMA_VERSION,
        "task": task,
        "model_cfg": _plain(
            model_cfg.to_dict() if isinstance(model_cfg, ModelConfig) else model_cfg, "model_cfg"
        ),
        "weights": weights,
        "training": training,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes_atomic(path, buffer.getvalue())
    return os.fspath(path)


def read_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, loaded with ``weights_only=True`` and its header checked."""
    where = os.fspath(path)
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, OSError) as err:
        raise CheckpointError(f"{where}: cannot read the checkpoint: {err}") from err
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{where}: not a loadable checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a {FORMAT} file")
    missing, extra = sorted(_TOP_KEYS - set(payload)), sorted(set(payload) - _TOP_KEYS)
    if missing or extra:
        raise CheckpointError(f"{where}: missing entries {missing}, unexpected entries {extra}")
    if payload["format_version"] not in KNOWN_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{where}: checkpoint format version {payload['format_version']!r} is not known "
            f"(this code reads {sorted(KNOWN_FORMAT_VERSIONS)})"
        )
    if payload["data_schema_version"] not in KNOWN_SCHEMA_VERSIONS:
        raise CheckpointError(
            f"{where}: data schema version {payload['data_schema_version']!r} is not known "
            f"(this code reads {sorted(KNOWN_SCHEMA_VERSIONS)})"
        )
    if payload["task"] not in vocab.TASKS:
        raise CheckpointError(f"{where}: unknown task {payload['task']!r}")
    return payload


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``weights`` into ``model`` (unwrapped from DDP) strictly; a missing or unexpected key
    or a shape mismatch raises CheckpointError naming ``where`` and the keys."""
    target = unwrap(model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    mismatched = [
        f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(weights[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        raise CheckpointError(f"{where}: weights with the wrong shape: {mismatched}")
    target.load_state_dict(weights, strict=True)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str = "cpu"
) -> tuple[DiPro, CheckpointMeta]:
    """Rebuild the model from the checkpoint alone, load its weights strictly; return it (in
    eval mode) with the rest of the checkpoint.

    The backbone is rebuilt without its ``pretrained_weights`` file (the checkpoint's weights
    replace it, and the file need not exist where the checkpoint is loaded); ``meta.model_cfg``
    keeps the config as saved.
    """
    where = os.fspath(path)
    payload = read_checkpoint(path, map_location)
    model_cfg, task = payload["model_cfg"], payload["task"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="model config: no pretrained_weights")
        try:
            model = build_model({**model_cfg, "pretrained_weights": None}, task)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: its model config does not build: {err}") from err
    training = payload["training"]
    held = (training.get("extra") or {}).get("site_local_keys")
    if held:
        raise CheckpointError(
            f"{where}: a federated model whose {len(held)} site-local parameters and buffers "
            "(federated.local, e.g. FedBN's BatchNorm layers) stay at the sites; each site "
            "scores it with its own"
        )
    load_weights(model, payload["weights"], where)
    model.eval()
    return model, meta_of(payload, where)


def meta_of(payload: Mapping[str, Any], where: str) -> CheckpointMeta:
    """Everything but the weights of a checkpoint (``read_checkpoint``'s dict) read from
    ``where``, typed."""
    training = payload["training"]
    return CheckpointMeta(
        path=where,
        task=payload["task"],
        model_cfg=payload["model_cfg"],
        format_version=payload["format_version"],
        data_schema_version=payload["data_schema_version"],
        epoch=training.get("epoch"),
        best_metric=training.get("best_metric"),
        norm_stats=None
        if training.get("norm_stats") is None
        else NormStats.from_dict(training["norm_stats"]),
        class_weights=None
        if training.get("class_weights") is None
        else ClassWeights.from_dict(training["class_weights"]),
        optimizer_state=training.get("optimizer"),
        scheduler_state=training.get("scheduler"),
        extra=training.get("extra") or {},
    )


def normalised_at_sites(payload: Mapping[str, Any]) -> bool:
    """Whether the checkpoint (``read_checkpoint``'s dict) is a federated model normalised at
    each site with its own statistics, so that it carries none (``extra.site_normalisation``)."""
    return bool((payload["training"].get("extra") or {}).get("site_normalisation"))


def check_matches(
    payload: Mapping[str, Any],
    where: str,
    *,
    task: str,
    norm_stats: NormStats | None = None,
    region_mode: str | None = None,
) -> None:
    """Raise CheckpointError when the checkpoint (``read_checkpoint``'s dict) is of another
    task, was trained on data with other normalisation statistics than ``norm_stats`` (the
    training split of the data it is used with), or reads another region mode."""
    if payload["task"] != task:
        raise CheckpointError(f"{where}: a {payload['task']} checkpoint, not a {task} one")
    stored = payload["training"].get("norm_stats")
    if norm_stats is not None:
        if stored is None:
            raise CheckpointError(f"{where}: carries no normalisation statistics")
        if NormStats.from_dict(stored).to_dict() != norm_stats.to_dict():
            raise CheckpointError(
                f"{where}: trained on data with other normalisation statistics than this "
                "dataset's training split (the data changed since, or it is another dataset)"
            )
    mode = payload["model_cfg"].get("region_mode")
    if region_mode is not None and mode != region_mode:
        raise CheckpointError(f"{where}: the model reads {mode}, the data store {region_mode}")

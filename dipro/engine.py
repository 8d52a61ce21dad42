"""The one training and evaluation engine: ``train_epoch`` and ``evaluate`` over any iterable of
``Batch``. The Ray worker and the Flower client both call these; nothing here knows about
either framework.

Gradient accumulation. Each micro-batch's loss is a mean over its rows; its gradient is
accumulated with weight n_b (its rows) and the sum is divided by the rows of the whole group
before the optimizer step, so a group of micro-batches gives the gradient of the mean over all
of its rows (exactly, for a model without batch statistics), whether the group is full or the
last, partial one. Under DDP the gradients are all-reduced only on a group's last micro-batch
(``no_sync`` on the others). Clipping happens on the final (unscaled) gradient, then the
optimizer steps, then the scheduler steps: once per optimizer step.

FedProx. With ``prox_mu > 0`` the term (mu / 2) * ||w - w_global||^2 over all parameters is added
to each group's objective once, against ``global_params``: a snapshot list of tensors in
``model.parameters()`` order, taken when the global weights arrived.

Mixed precision. ``amp_dtype`` (bf16 or fp16) enables autocast on CUDA only; fp16 uses a
``GradScaler``. On another device the run stays in fp32 and a warning says so. The losses are
computed in fp32.

Evaluation runs the unwrapped module (no DDP collective), so workers may hold different numbers
of batches; their ``Predictions`` are gathered by the caller, joined with
``Predictions.concatenate`` and scored once with ``dipro.metrics.compute_metrics``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from dipro.batch import Batch
from dipro.losses import DiProLoss
from dipro.metrics import Predictions, compute_metrics
from dipro.settings import OptimSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
StepCallback = Callable[[int, dict[str, float]], None]

_AMP_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def learning_rate(optim: OptimSettings, world_size: int = 1, accumulation_steps: int = 1) -> float:
    """The lr to use: ``optim.lr`` as configured, or, with ``lr_scaling: linear``, scaled by the
    effective batch relative to the training the lr belongs to (``optim.reference``):

        lr_used = lr * (batch_size * accumulation_steps * world_size)
                     / (reference.batch_size * reference.accumulation_steps * reference.num_workers)

    The default ``none`` never rescales; ``linear`` needs ``optim.reference`` (``OptimSettings``
    refuses it without one).
    """
    reference = optim.reference
    if optim.lr_scaling == "none" or reference is None:
        return optim.lr
    used = optim.batch_size * accumulation_steps * world_size
    ref = reference.batch_size * reference.accumulation_steps * reference.num_workers
    return optim.lr * used / ref


def build_optimizer(
    model: nn.Module,
    optim: OptimSettings,
    *,
    world_size: int = 1,
    accumulation_steps: int = 1,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over all parameters with ``optim.lr`` (see ``learning_rate``) and
    ``optim.weight_decay``.

    ``fused`` (``scaling.fused_optimizer``): the update of the parameters and their moments in
    one fused pass, instead of torch's default (on CUDA about ten multi-tensor passes, on the
    CPU a loop over the parameter tensors). torch implements it on CUDA and on the CPU, among
    others; on a device it does not cover, torch's error names the devices it does.
    """
    return torch.optim.AdamW(
        unwrap(model).parameters(),
        lr=learning_rate(optim, world_size, accumulation_steps),
        weight_decay=optim.weight_decay,
        fused=True if fused else None,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimSettings, total_steps: int
) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """Cosine decay from the optimizer's lr to ``optim.min_lr`` over
    ``total_steps`` optimizer steps (max_epochs x optimizer steps per epoch)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=total_steps, eta_min=optim.min_lr
    )


def resolve_amp(
    amp_dtype: torch.dtype | str | None, device: torch.device | str
) -> torch.dtype | None:
    """The autocast dtype to use on ``device``: None for fp32 (no amp asked, or not on CUDA)."""
    if amp_dtype is None:
        return None
    if isinstance(amp_dtype, str):
        if amp_dtype not in _AMP_DTYPES:
            raise ValueError(f"amp dtype {amp_dtype!r} is not one of {sorted(_AMP_DTYPES)}")
        amp_dtype = _AMP_DTYPES[amp_dtype]
    if amp_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"amp dtype {amp_dtype} is not bfloat16 or float16")
    if torch.device(device).type != "cuda":
        logger.warning(
            "mixed precision %s is for CUDA only; running in fp32 on %s", amp_dtype, device
        )
        return None
    return amp_dtype


def _autocast(device: torch.device | str, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yield (item, is_last) with one item of lookahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def proximal_term(
    params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx: (mu / 2) * sum over tensors of ||w - w_global||^2."""
    if len(params) != len(global_params):
        raise ValueError(
            f"FedProx: the model has {len(params)} parameter tensors, the global snapshot "
            f"{len(global_params)}"
        )
    sq = sum((w - g.to(w.device)).pow(2).sum() for w, g in zip(params, global_params, strict=True))
    return 0.5 * mu * sq


class NonFiniteOutputError(ValueError):
    """The model's outputs are NaN or infinite (diverged or broken weights), so nothing can be
    scored; raised by ``evaluate`` instead of a metric library's complaint about its input."""


def check_finite(predictions: Predictions) -> None:
    """Raise ``NonFiniteOutputError`` naming how many samples, and the first one, have a
    non-finite output."""
    logits = predictions.logits
    bad = ~np.isfinite(logits.reshape(len(logits), int(np.prod(logits.shape[1:])))).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise NonFiniteOutputError(
            f"the model's outputs are not finite for {int(bad.sum())} of {len(bad)} samples "
            f"(first: subject {int(predictions.subject_id[first])}, stay "
            f"{int(predictions.stay_id[first])}): its weights have diverged or are broken"
        )


class _RunningMeans:
    """Row-weighted running means of logged values."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.rows = 0

    def add(self, values: Mapping[str, float], rows: int) -> None:
        for key, value in values.items():
            self.sums[key] += value * rows
        self.rows += rows

    def means(self) -> dict[str, float]:
        return {k: v / self.rows if self.rows else math.nan for k, v in self.sums.items()}


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: DiProLoss,
    *,
    device: torch.device | str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    amp_dtype: torch.dtype | str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    prox_mu: float = 0.0,
    global_params: Sequence[torch.Tensor] | None = None,
    max_steps: int | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """One pass of training over ``batches`` (or until ``max_steps`` optimizer steps).

    ``model`` may be wrapped in DDP. ``scaler`` keeps fp16 loss scaling across epochs (one is
    made for this epoch when fp16 runs without it). ``on_step(step, {"loss", "lr"})`` is called
    after each optimizer step with the step's row-weighted mean loss and the lr after it.
    Returns row-weighted means ``loss`` (total, with the FedProx term) and ``loss/<component>``
    (``task``, the auxiliary terms the model produces, ``prox``), plus ``samples``, ``steps``
    and the last ``lr``.
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    if prox_mu > 0 and global_params is None:
        raise ValueError("FedProx needs global_params (a snapshot of the global weights)")
    model.train()
    loss_fn.to(device)
    dtype = resolve_amp(amp_dtype, device)
    if dtype == torch.float16 and scaler is None:
        scaler = torch.amp.GradScaler(torch.device(device).type)
    elif dtype != torch.float16:
        scaler = None
    params = list(unwrap(model).parameters())
    sync_free = getattr(model, "no_sync", None)

    logged = _RunningMeans()
    steps = micro = group_rows = 0
    group_loss = 0.0
    optimizer.zero_grad(set_to_none=True)
    for batch, is_last in _with_last(batches):
        batch = batch.to(device, non_blocking=True)
        rows = batch.size
        closes_group = is_last or micro + 1 == accumulation_steps
        context = sync_free() if sync_free is not None and not closes_group else nullcontext()
        with context:
            with _autocast(device, dtype):
                output = model(batch)
            loss, parts = loss_fn(output, batch)
            if prox_mu > 0:
                prox = proximal_term(params, global_params, prox_mu)
                loss = loss + prox
                parts["prox"] = float(prox.detach())
            weighted = loss * rows
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        value = float(loss.detach())
        logged.add({"loss": value, **{f"loss/{k}": v for k, v in parts.items()}}, rows)
        micro += 1
        group_rows += rows
        group_loss += value * rows
        if not closes_group:
            continue

        if scaler is not None:
            scaler.unscale_(optimizer)
        for p in params:
            if p.grad is not None:
                p.grad.div_(max(group_rows, 1))
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        steps += 1
        if on_step is not None:
            step_loss = group_loss / max(group_rows, 1)
            on_step(steps, {"loss": step_loss, "lr": optimizer.param_groups[0]["lr"]})
        micro = group_rows = 0
        group_loss = 0.0
        if max_steps is not None and steps >= max_steps:
            break

    return {
        **logged.means(),
        "samples": float(logged.rows),
        "steps": float(steps),
        "lr": float(optimizer.param_groups[0]["lr"]),
    }


def predict_with_loss(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: DiProLoss | None,
    *,
    device: torch.device | str,
    amp_dtype: torch.dtype | str | None = None,
) -> tuple[Predictions, dict[str, float]]:
    """Predictions on every batch, in order, and (with ``loss_fn``) the row-weighted means of
    ``loss`` and ``loss/<component>``: what a distributed caller gathers before scoring once."""
    module = unwrap(model)
    module.eval()
    if loss_fn is not None:
        loss_fn.to(device)
    dtype = resolve_amp(amp_dtype, device)
    parts_out: list[Predictions] = []
    logged = _RunningMeans()
    with torch.inference_mode():
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            with _autocast(device, dtype):
                output = module(batch)
            parts_out.append(Predictions.from_output(module.task, batch, output))
            if loss_fn is not None:
                loss, parts = loss_fn(output, batch)
                values = {"loss": float(loss), **{f"loss/{k}": v for k, v in parts.items()}}
                logged.add(values, batch.size)
    predictions = (
        Predictions.concatenate(parts_out) if parts_out else Predictions.empty(module.task)
    )
    return predictions, logged.means()


def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str,
    amp_dtype: torch.dtype | str | None = None,
) -> Predictions:
    """Predictions of the model (in eval mode, no gradients) on every batch, in order."""
    return predict_with_loss(model, batches, None, device=device, amp_dtype=amp_dtype)[0]


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: DiProLoss | None = None,
    *,
    device: torch.device | str,
    amp_dtype: torch.dtype | str | None = None,
) -> tuple[dict[str, float], Predictions]:
    """The task's metrics on ``batches`` (plus ``loss`` and ``loss/<component>`` when a loss is
    given) and the predictions.

    The model (unwrapped from DDP) names its task in ``model.task``, as ``DiPro`` does. Outputs
    that are not finite are a ``NonFiniteOutputError``.
    """
    predictions, losses = predict_with_loss(
        model, batches, loss_fn, device=device, amp_dtype=amp_dtype
    )
    check_finite(predictions)
    return {**compute_metrics(predictions), **losses}, predictions

"""The DiPro training objective (docs/model.md, "Losses").

    L = l_ce * L_task + l_orth * L_orth + l_temp * L_temp + l_static * L_static + l_dyn * L_dyn

L_task per task:

- disease_progression: sum over the K findings of the class-weighted cross-entropy over the rows
  labelled for that finding (code 3, not mentioned, is masked), the weighted mean
  sum(w_y * ce) / sum(w_y), with w_c = N / (3 n_c) counted on the training split per finding;
- mortality: binary cross-entropy with logits, pos_weight = n_negative / n_positive of the
  training split (the authors passed the positive fraction, which down-weights positives);
- length_of_stay: cross-entropy.

Rows labelled IGNORE_INDEX (mortality, LOS) do not count. The auxiliary terms are the paper's
formulas in ``dipro.model.std`` and ``dipro.model.pae``, averaged over the output's
``pair_region_mask``; a term whose inputs an ablation removes (None in ``DiProOutput``)
contributes nothing and is absent from the logged components. L_dyn uses class weights counted
the same way on the region-level labels.

Class weights and pos_weight come from ``LabelCounts`` of the training split (counts add up
across shards and federated sites), turned into a json-able ``ClassWeights`` that travels in the
checkpoint; ``DiProLoss`` is built once from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dipro import vocab
from dipro.batch import Batch
from dipro.data.collate import IGNORE_INDEX
from dipro.data.labels import LabelCounts
from dipro.model.output import DiProOutput
from dipro.model.pae import dynamic_loss, region_cross_entropy, static_consistency_loss
from dipro.model.std import masked_mean, orthogonality_loss, temporal_consistency_loss
from dipro.settings import LossWeights

K, C = vocab.NUM_FINDINGS, vocab.NUM_PROGRESSION_CLASSES


def count_labels(batches: Iterable[Batch]) -> LabelCounts:
    """LabelCounts of all batches (e.g. one pass over the training split)."""
    total = LabelCounts.zeros()
    for batch in batches:
        total = total + LabelCounts.from_labels(
            progression=batch.progression.cpu().numpy(),
            region_labels=batch.region_labels.cpu().numpy(),
            mortality=batch.mortality.cpu().numpy(),
            los_class=batch.los_class.cpu().numpy(),
        )
    return total


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """w_c = N / (C n_c) along the last axis of counts [..., C].

    A class absent from the counts gets weight 0 (it has no rows to weigh); a row of counts that
    is all zero (nothing labelled) gets weight 1 for every class.
    """
    counts = np.asarray(counts, np.float64)
    n = counts.sum(-1, keepdims=True)
    weights = np.divide(n, counts.shape[-1] * counts, out=np.zeros_like(counts), where=counts > 0)
    return np.where(n > 0, weights, 1.0)


@dataclass(frozen=True)
class ClassWeights:
    """Loss weights counted on the training split; json-able through ``to_dict``.

    progression [K, 3]: finding-level task loss; region [K, 3]: L_dyn; mortality_pos_weight:
    n_negative / n_positive (1.0 when a class is absent from the split).
    """

    progression: tuple[tuple[float, ...], ...]
    region: tuple[tuple[float, ...], ...]
    mortality_pos_weight: float

    @classmethod
    def from_counts(cls, counts: LabelCounts) -> ClassWeights:
        neg, pos = (int(x) for x in counts.mortality)
        return cls(
            progression=tuple(map(tuple, balanced_class_weights(counts.progression).tolist())),
            region=tuple(map(tuple, balanced_class_weights(counts.region).tolist())),
            mortality_pos_weight=neg / pos if pos > 0 and neg > 0 else 1.0,
        )

    @classmethod
    def uniform(cls) -> ClassWeights:
        """All weights 1: an unweighted loss."""
        ones = tuple((1.0,) * C for _ in range(K))
        return cls(progression=ones, region=ones, mortality_pos_weight=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "progression": [list(r) for r in self.progression],
            "region": [list(r) for r in self.region],
            "mortality_pos_weight": self.mortality_pos_weight,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassWeights:
        def table(name: str) -> tuple[tuple[float, ...], ...]:
            arr = np.asarray(data[name], np.float64)
            if arr.shape != (K, C):
                raise ValueError(f"class weights {name!r}: shape {arr.shape}, expected {(K, C)}")
            return tuple(map(tuple, arr.tolist()))

        return cls(table("progression"), table("region"), float(data["mortality_pos_weight"]))


class DiProLoss(nn.Module):
    """Total loss of one task; build once per run, call ``loss_fn(output, batch)`` each step.

    Returns the total (a scalar tensor) and the unweighted components as floats: ``task`` and
    whichever of ``orth``, ``temp``, ``static``, ``dyn`` the output supports.
    """

    def __init__(self, *, task: str, weights: LossWeights, class_weights: ClassWeights) -> None:
        super().__init__()
        if task not in vocab.TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {vocab.TASKS}")
        self.task = task
        self.weights = weights
        self.class_weights = class_weights
        self.register_buffer(
            "progression_weight", torch.tensor(class_weights.progression), persistent=False
        )
        self.register_buffer("region_weight", torch.tensor(class_weights.region), persistent=False)
        self.register_buffer(
            "pos_weight", torch.tensor(class_weights.mortality_pos_weight), persistent=False
        )

    def task_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """L_task; logits [B, K, 3] / [B] / [B, 4] as in ``DiProOutput``."""
        logits = logits.float()
        if self.task == "disease_progression":
            every_row = torch.ones_like(batch.progression[:, 0], dtype=torch.bool)  # [B]
            return region_cross_entropy(
                logits, batch.progression, every_row, self.progression_weight
            )
        if self.task == "mortality":
            keep = batch.mortality != IGNORE_INDEX  # [B]
            bce = F.binary_cross_entropy_with_logits(
                logits,
                batch.mortality.clamp(min=0).to(logits.dtype),
                pos_weight=self.pos_weight,
                reduction="none",
            )
            return masked_mean(bce, keep)
        keep = batch.los_class != IGNORE_INDEX  # [B]
        ce = F.cross_entropy(logits, batch.los_class.clamp(min=0), reduction="none")
        return masked_mean(ce, keep)

    def auxiliary_losses(self, output: DiProOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """The auxiliary terms the output supports, keyed like ``LossWeights``."""
        mask = output.pair_region_mask
        terms: dict[str, torch.Tensor] = {}
        if output.static is not None and output.dynamic is not None:
            static, dynamic = output.static.float(), output.dynamic.float()
            terms["orth"] = orthogonality_loss(static, dynamic, mask)
            terms["temp"] = temporal_consistency_loss(static, mask)
        if output.static is not None and output.static_rev is not None:
            terms["static"] = static_consistency_loss(
                output.static.float(), output.static_rev.float(), mask
            )
        if output.region_logits is not None and output.region_logits_rev is not None:
            terms["dyn"] = dynamic_loss(
                output.region_logits.float(),
                output.region_logits_rev.float(),
                batch.region_labels,
                mask,
                self.region_weight,
            )
        return terms

    def forward(self, output: DiProOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        terms = {"task": self.task_loss(output.logits, batch)}
        terms.update(self.auxiliary_losses(output, batch))
        w = self.weights
        lambdas = {"task": w.ce, "orth": w.orth, "temp": w.temp, "static": w.static, "dyn": w.dyn}
        total = sum(lambdas[name] * value for name, value in terms.items())
        values = torch.stack([v.detach() for v in terms.values()]).tolist()  # one device sync
        return total, dict(zip(terms, values, strict=True))


def build_loss(
    task: str, weights: LossWeights | Mapping[str, Any], class_weights: ClassWeights
) -> DiProLoss:
    """The loss of ``task``: its lambdas (``LossWeights``, or the ``loss`` config's mapping),
    class weights from the training split (``ClassWeights.from_counts``). Every training path
    builds its loss here."""
    if not isinstance(weights, LossWeights):
        weights = LossWeights.from_dict(weights)
    return DiProLoss(task=task, weights=weights, class_weights=class_weights)

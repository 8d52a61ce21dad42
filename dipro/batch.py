"""``Batch``: the contract between the data side (``dipro.data.collate`` makes it) and the model
side (``dipro.model``, ``dipro.losses``, ``dipro.metrics`` and ``dipro.engine`` read it); it
belongs to neither, so the model imports nothing from ``dipro.data``."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class Batch:
    """A padded batch of samples. B batch, T CXRs, P = T-1 pairs, R regions, K findings,
    S crop size, F feature size, L EHR hours, V EHR variables, G demographics.

    | field          | dtype   | shape           | notes                                    |
    |----------------|---------|-----------------|------------------------------------------|
    | subject_id     | int64   | [B]             |                                          |
    | stay_id        | int64   | [B]             |                                          |
    | hospital       | int64   | [B]             |                                          |
    | cxr_times      | float32 | [B, T]          | hours; 0 at padding                      |
    | cxr_mask       | bool    | [B, T]          | CXR exists                               |
    | pair_mask      | bool    | [B, P]          | both CXRs of pair i exist                |
    | crops          | uint8   | [B, T, R, S, S] | or None in features mode; 0 at padding   |
    | features       | float32 | [B, T, R, F]    | or None in crops mode; 0 at padding      |
    | region_present | bool    | [B, T, R]       | region has a box; False on padded CXRs   |
    | ehr_times      | float32 | [B, L]          | hours; 0 at padding                      |
    | ehr_mask       | bool    | [B, L]          | EHR hour exists                          |
    | ehr_values     | float32 | [B, L, V]       | z-scored; 0 at padding                   |
    | ehr_observed   | bool    | [B, L, V]       | measured in that hour                    |
    | demographics   | float32 | [B, G]          | numeric part z-scored                    |
    | region_labels  | int64   | [B, P, R, K]    | codes 0..3; 3 on padded pairs            |
    | progression    | int64   | [B, K]          | codes 0..3; all 3 when the task has none |
    | mortality      | int64   | [B]             | 0/1; IGNORE_INDEX when absent            |
    | los_class      | int64   | [B]             | 0..3; IGNORE_INDEX when absent           |
    """

    subject_id: torch.Tensor
    stay_id: torch.Tensor
    hospital: torch.Tensor
    cxr_times: torch.Tensor
    cxr_mask: torch.Tensor
    pair_mask: torch.Tensor
    crops: torch.Tensor | None
    features: torch.Tensor | None
    region_present: torch.Tensor
    ehr_times: torch.Tensor
    ehr_mask: torch.Tensor
    ehr_values: torch.Tensor
    ehr_observed: torch.Tensor
    demographics: torch.Tensor
    region_labels: torch.Tensor
    progression: torch.Tensor
    mortality: torch.Tensor
    los_class: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        moved = {
            f.name: None
            if getattr(self, f.name) is None
            else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return replace(self, **moved)

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory (for non-blocking copies to a GPU)."""
        pinned = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory()
            for f in fields(self)
        }
        return replace(self, **pinned)

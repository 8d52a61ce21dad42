"""Per-stream seeds: one run seed, many streams (an epoch of a rank, a local epoch of a site).

``stream_seed(seed, *coordinates)`` hashes the run seed with the stream's coordinates through
``numpy.random.SeedSequence``, so two streams share a seed only by a 2^-32 hash collision,
whatever the number of ranks, epochs, rounds or hospitals (an arithmetic formula such as
``seed * 1000 + epoch * 10 + rank`` collides from 10 ranks on).
"""

from __future__ import annotations

import os

import numpy as np
import torch

# Tags of the streams that are not an (epoch, rank) local shuffle: a run's file order, and the
# torch generator (dropout, augmentation) of one rank in one epoch.
FILE_ORDER = 1
TORCH = 2


def stream_seed(seed: int, *coordinates: int) -> int:
    """A 32-bit seed for the stream at ``coordinates`` (non-negative ints) of run ``seed``."""
    entropy = [int(seed), *(int(c) for c in coordinates)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def set_determinism(enabled: bool, device_type: str = "cpu") -> None:
    """Ask torch for deterministic kernels (``enabled``) or the fastest ones.

    Deterministic: ``torch.use_deterministic_algorithms`` (an op with no deterministic kernel
    warns instead of failing), cuDNN's deterministic convolutions without autotuning, and on
    CUDA the cuBLAS workspace size that makes its reductions repeatable. Free: cuDNN autotunes
    (``cudnn.benchmark``) and torch picks any kernel.
    """
    if enabled and device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled

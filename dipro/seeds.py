"""Per-stream seeds: one run seed, many streams (an epoch of a rank, a local epoch of a site).

``stream_seed(seed, *coordinates)`` hashes the run seed with the stream's coordinates through
``numpy.random.SeedSequence``, so two streams share a seed only by a 2^-32 hash collision,
whatever the number of ranks, epochs, rounds or hospitals (an arithmetic formula such as
``seed * 1000 + epoch * 10 + rank`` collides from 10 ranks on).
"""

from __future__ import annotations

import numpy as np


def stream_seed(seed: int, *coordinates: int) -> int:
    """A 32-bit seed for the stream at ``coordinates`` (non-negative ints) of run ``seed``."""
    entropy = [int(seed), *(int(c) for c in coordinates)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])

"""The random streams of a federated run that Flower draws from the process's global generators,
each seeded from the run's ``seed`` (``dipro.seeds.stream_seed``), so that a simulation run
twice gives the same numbers.

- ``NODE_IDS``: the node ids of the simulated SuperNodes (``federated.sim_process``), which
  Flower would draw from ``os.urandom``; the server samples the sites and orders their replies
  by them, and the round log names the sites by them.
- ``TRAIN_SAMPLE`` and ``EVALUATE_SAMPLE`` (with the run's round): the sites a strategy samples
  each round (Flower's ``sample_nodes``, Python's ``random``).
- ``NEIGHBOURS`` (round): SecAgg+'s shuffle of a round's sites into neighbourhoods (Python's
  ``random``), which decides whose key shares can remove a dropped site's masks.
- ``ROUNDING`` (round, node id): a site's stochastic rounding of its update before SecAgg+ masks
  it (numpy's global generator, at the site; the server sends each site its seed).

The server and the sites seed Python's ``random`` or numpy's global generator right before the
draw and restore it after (``global_rngs_restored``), so that the run's streams and any other
user of those generators in the process leave each other alone.

Not seeded, by design: SecAgg+'s key pairs and mask seeds (``os.urandom``), which are secrets;
the masks they make cancel exactly, so the aggregate does not depend on them. And the Gaussian
noise of ``federated.dp`` (numpy's global generator, seeded by the OS): noise that the run's
seed reproduced could be subtracted from the published models by anyone who reads the seed (in
the run's config, ``metrics.json`` and the tracked parameters), which would void the guarantee.
A run with ``federated.dp.noise_multiplier > 0`` therefore differs from its rerun by its noise.

A site's own streams (data order, dropout) are ``stream_seed(seed, round, epoch, hospital)``
(``federated.site.train_site``). The tags here start at 2**32, above any round, so that none of
these streams shares its coordinates with one of those.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

NODE_IDS = 2**32
TRAIN_SAMPLE = 2**32 + 1
EVALUATE_SAMPLE = 2**32 + 2
NEIGHBOURS = 2**32 + 3
ROUNDING = 2**32 + 4


@contextmanager
def global_rngs_restored() -> Iterator[None]:
    """Python's ``random`` and numpy's global generator as they were before the block, whatever
    it seeded them with: a stream of the run seeded for one draw stays confined to it."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)

"""The privacy loss of a federated run with ``federated.dp`` on: (epsilon, delta) after each
round, accounted with Opacus' Rényi-DP accountant.

What is protected (the unit of privacy) is **one site's update in a round**: site-level DP, the
guarantee that the published global models would be about as likely had any one hospital's
update been replaced. It is not a per-patient guarantee beyond that (a patient is part of one
site's update). Each round the server adds Gaussian noise of std ``z x C / m`` to the mean of
``m`` updates each clipped to L2 norm ``C`` (``DifferentialPrivacyClientSideFixedClipping``): one
application of the Gaussian mechanism with noise multiplier ``z`` with respect to one site's
update. ``T`` rounds compose; Rényi DP gives the epsilon at the configured delta.

No amplification by sampling is claimed: every round is accounted with sample rate 1, as if
every site took part. For ``federated.fraction_train < 1`` the true loss is smaller (Flower
samples a fixed number of sites without replacement, which the Poisson-sampling analysis of the
accountant does not cover exactly), so the reported epsilon is an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants import RDPAccountant

from dipro.settings import DPSettings


@dataclass(frozen=True)
class PrivacyBudget:
    """The Gaussian mechanism of one round (``noise_multiplier`` z), the ``delta`` at which
    epsilon is reported, and the ``target_epsilon`` a run may not exceed (None: no target)."""

    noise_multiplier: float
    delta: float
    target_epsilon: float | None = None

    @classmethod
    def of(cls, dp: DPSettings) -> PrivacyBudget | None:
        """The budget of ``federated.dp``; None when DP is off."""
        if not dp.enabled:
            return None
        return cls(
            noise_multiplier=dp.noise_multiplier,
            delta=dp.delta,
            target_epsilon=dp.target_epsilon,
        )

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (0 before any; inf without noise)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier <= 0.0:
            return math.inf
        accountant = RDPAccountant()
        for _ in range(rounds):
            accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        return float(accountant.get_epsilon(self.delta))

    def spent(self, rounds: int) -> float | None:
        """The epsilon to report after ``rounds``: None without noise (no guarantee at all)."""
        return self.epsilon(rounds) if self.noise_multiplier > 0 else None

    def rounds_within(self, max_rounds: int) -> int:
        """The most rounds, at most ``max_rounds``, whose epsilon stays within the target
        (``max_rounds`` without a target). Epsilon grows with the rounds: a binary search."""
        if self.target_epsilon is None:
            return max_rounds
        low, high = 0, max_rounds
        while low < high:
            middle = (low + high + 1) // 2
            if self.epsilon(middle) <= self.target_epsilon:
                low = middle
            else:
                high = middle - 1
        return low

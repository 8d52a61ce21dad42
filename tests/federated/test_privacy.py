"""The privacy accountant of federated DP: epsilon per round, against the Gaussian mechanism's
Rényi-DP formula; a target epsilon caps the rounds (a run that reports its epsilon and stops at
the target: ``test_coordinator_data.py``)."""

from __future__ import annotations

import math

import pytest
from conftest import compose

from dipro.config import ConfigError
from federated.config import check_config
from federated.privacy import PrivacyBudget


def _classic_bound(rounds: int, z: float, delta: float) -> float:
    """The Gaussian mechanism is (alpha, alpha / (2 z^2))-RDP per round; T rounds compose to
    T alpha / (2 z^2); the classic conversion gives epsilon <= RDP + log(1/delta) / (alpha - 1),
    minimised over alpha (the accountant's conversion is tighter, never looser)."""
    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    return min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in alphas)


@pytest.mark.parametrize("z", [0.8, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("rounds", [1, 5, 20])
def test_epsilon_is_within_the_gaussian_mechanisms_bound(z, rounds):
    epsilon = PrivacyBudget(noise_multiplier=z, delta=1e-5).epsilon(rounds)
    bound = _classic_bound(rounds, z, 1e-5)
    assert 0 < epsilon <= bound
    assert epsilon > 0.5 * bound  # the same order: not a different mechanism


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    low, high = PrivacyBudget(1.0, 1e-5), PrivacyBudget(2.0, 1e-5)
    by_round = [low.epsilon(r) for r in range(0, 6)]
    assert by_round[0] == 0 and by_round == sorted(by_round) and len(set(by_round)) == 6
    assert all(high.epsilon(r) < low.epsilon(r) for r in range(1, 6))
    assert PrivacyBudget(0.0, 1e-5).epsilon(1) == math.inf


def test_a_target_allows_the_last_round_within_it():
    budget = PrivacyBudget(noise_multiplier=1.0, delta=1e-5, target_epsilon=10.0)
    allowed = budget.rounds_within(50)
    assert budget.epsilon(allowed) <= 10.0 < budget.epsilon(allowed + 1)
    assert budget.rounds_within(allowed - 1) == allowed - 1
    assert PrivacyBudget(1.0, 1e-5).rounds_within(7) == 7


def test_a_target_below_one_round_is_a_configuration_error(tiny_data_root, tmp_path):
    cfg = compose(
        tiny_data_root,
        tmp_path / "run",
        "federated.dp.enabled=true",
        "federated.dp.noise_multiplier=1.0",
        "federated.dp.target_epsilon=1.0",
    )
    with pytest.raises(ConfigError, match="below the epsilon of one round"):
        check_config(cfg)

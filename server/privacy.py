"""User-level differential privacy accounting: a run's epsilon, each user's, and their budgets (Google's dp-accounting).

Pure bookkeeping, no Flower and no ledger: the strategy tells it who took part in each released
aggregate, and it answers with epsilons from dp-accounting's RDP accountant (Mironov, 2017), never
from a formula of our own. Two numbers, two threat models (docs/trust.md):

- **the run's epsilon**: every round is a Poisson-subsampled Gaussian mechanism at that round's
  sampling rate (sampled nodes / nodes that could be sampled), composed over the rounds. It bounds
  what the released adapters reveal about any one user, provided who took part stays hidden.
- **a user's epsilon**: the Gaussian mechanisms of the rounds the user took part in, composed without
  amplification by sampling, which would need their participation to stay hidden, and the server
  knows it. A user on k devices in one round counts as one mechanism of noise multiplier sigma / k:
  their k clipped updates move the sum by up to k clipping norms. ``dp-user-budget`` caps this one.

In both, a mechanism's noise multiplier is the noise's standard deviation over one user's largest
contribution to the sum of clipped updates (the clipping norm), neighbouring datasets differing by
one user added or removed (dp-accounting's default relation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from shared.config import ConfigError, FederationConfig
from shared.methods import DpMode


@dataclass(frozen=True)
class PrivacySettings:
    """The run config's dp-* keys, as the strategy and Flower's wrappers use them."""

    mode: DpMode = DpMode.OFF
    noise_multiplier: float = 1.0
    clipping_norm: float = 0.1  # the fixed norm, or the adaptive one's start
    delta: float = 1e-5
    user_budget: float = 0.0  # epsilon; 0: none
    target_quantile: float = 0.5  # adaptive clipping (Flower's parameters)
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = 0.0  # 0: Flower's default, expected_replies / 20
    expected_replies: int = 1  # what Flower's adaptive wrapper derives its defaults from (min-train-nodes)

    def __post_init__(self) -> None:
        # A node's user is known from its first reply on: a first round must fit in any budget.
        if not self.user_budget:
            return
        one_round = gaussian_epsilon([self.noise_multiplier], self.delta)
        if one_round > self.user_budget:
            raise ConfigError(f"dp-user-budget {self.user_budget:g} is below one round's epsilon {one_round:.4g} at "
                              f"dp-noise-multiplier {self.noise_multiplier:g} (delta {self.delta:g}): no user could "
                              "take part even once")

    @classmethod
    def from_config(cls, config: FederationConfig) -> PrivacySettings:
        return cls(DpMode(config.dp), config.dp_noise_multiplier, config.dp_clipping_norm, config.dp_delta,
                   config.dp_user_budget, config.dp_target_quantile, config.dp_clip_norm_lr,
                   config.dp_clipped_count_stddev, config.min_train_nodes)


@dataclass(frozen=True)
class Release:
    """One round's released aggregate: its sampling rate and noise multiplier."""

    sampling_rate: float
    noise_multiplier: float

    def event(self) -> dp_event.DpEvent:
        return dp_event.PoissonSampledDpEvent(self.sampling_rate, dp_event.GaussianDpEvent(self.noise_multiplier))


def run_epsilon(releases: Sequence[Release], delta: float) -> float:
    """Epsilon at ``delta`` of the Poisson-subsampled Gaussian mechanisms of ``releases``, composed."""
    accountant = RdpAccountant()
    # Alike releases are composed at once: a subsampled Gaussian's RDP is costly (0.1-0.2 s) to compute.
    for release, count in Counter(releases).items():
        accountant.compose(release.event(), count)
    return accountant.get_epsilon(delta)


def gaussian_epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` of Gaussian mechanisms of these noise multipliers, composed, without sampling."""
    accountant = RdpAccountant()
    for noise_multiplier, count in Counter(noise_multipliers).items():
        accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), count)
    return accountant.get_epsilon(delta)


def noise_for_epsilon(epsilon: float, rounds: int, sampling_rate: float, delta: float) -> float:
    """The noise multiplier whose ``rounds`` releases at ``sampling_rate`` compose to ``epsilon`` at ``delta``.

    dp-accounting's own calibration. With ``sampling_rate`` 1 it is also the noise that brings a user
    taking part in all ``rounds`` to ``epsilon``: how to pick ``dp-noise-multiplier`` for a target.
    """
    def event(noise_multiplier: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(Release(sampling_rate, noise_multiplier).event(), rounds)

    return float(dp_accounting.calibrate_dp_mechanism(RdpAccountant, event, epsilon, delta))


@dataclass(frozen=True)
class RoundSpend:
    """What one release cost: the run's epsilon after it, the round's alone, and each user charged."""

    release: Release
    round_epsilon: float
    run_epsilon: float
    users: dict[str, UserSpend]


@dataclass(frozen=True)
class UserSpend:
    devices: int  # this round
    noise_multiplier: float  # of this round's mechanism for the user: sigma / devices
    rounds: int  # rounds taken part in so far
    epsilon: float  # spent so far


@dataclass
class PrivacyAccount:
    """A run's releases and, per user, the noise multiplier of each round they took part in."""

    settings: PrivacySettings
    releases: list[Release] = field(default_factory=list)
    users: dict[str, list[float]] = field(default_factory=dict)
    # the run's releases composed as they come: recomposing them all each round grows with the rounds
    _composed: RdpAccountant = field(default_factory=RdpAccountant, repr=False, compare=False)

    def release(self, sampled: int, available: int, devices_by_user: Mapping[str, int]) -> RoundSpend:
        """Charge one released aggregate: ``sampled`` of ``available`` nodes, the users on them (with their devices)."""
        if not 0 < sampled <= available:
            raise ValueError(f"a round samples between 1 and the {available} available nodes, not {sampled}")
        release = Release(sampled / available, self.settings.noise_multiplier)
        self.add(release, {user: self.settings.noise_multiplier / devices for user, devices in devices_by_user.items()})
        users = {user: UserSpend(devices, self.users[user][-1], len(self.users[user]), self.user_epsilon(user))
                 for user, devices in devices_by_user.items()}
        return RoundSpend(release, run_epsilon([release], self.settings.delta), self.run_epsilon(), users)

    def add(self, release: Release, noise_multipliers_by_user: Mapping[str, float]) -> None:
        """Add a release and what it cost each user (their mechanism's noise multiplier).

        A resumed run replays the releases the ledger recorded with it.
        """
        self.releases.append(release)
        self._composed.compose(release.event())
        for user, noise_multiplier in noise_multipliers_by_user.items():
            self.users.setdefault(user, []).append(noise_multiplier)

    def run_epsilon(self) -> float:
        return self._composed.get_epsilon(self.settings.delta) if self.releases else 0.0

    def user_epsilon(self, user: str) -> float:
        spent = self.users.get(user, [])
        return gaussian_epsilon(spent, self.settings.delta) if spent else 0.0

    def allows(self, user: str) -> bool:
        """Whether ``user`` can take part in one more round (on one device) within ``dp-user-budget``."""
        if not self.settings.user_budget:
            return True
        after = gaussian_epsilon([*self.users.get(user, []), self.settings.noise_multiplier], self.settings.delta)
        return after <= self.settings.user_budget

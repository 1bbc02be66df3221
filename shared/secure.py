"""What the server and the devices agree on under secure aggregation (Flower's SecAgg+, docs/trust.md).

Flower 1.42's SecAgg+ runs on its legacy message format, where an update is an unnamed list of
arrays and its weight an integer ``num_examples``. The server names the list's tensors in the fit
config (``ADAPTER_KEYS``); each device weighs its own update by the run's example-weight policy,
because the server never sees an update to weigh; and SecAgg+ quantizes each weight as a share of
``max_weight``, which the policy bounds.
"""

from __future__ import annotations

from shared.config import FederationConfig
from shared.methods import ExampleWeights

ADAPTER_KEYS = "adapter-keys"  # fit-config key: the names of the legacy parameter list's tensors, in order


def max_weight(config: FederationConfig) -> float:
    """The largest weight a device can give its update: SecAgg+ quantizes weight / max_weight.

    A tight bound keeps the quantization fine: with ``uniform`` weights it is 1, with ``capped`` the cap.
    ``claimed`` has no bound and is refused with secure aggregation (shared/config.py).
    """
    policy = ExampleWeights(config.example_weights)
    if policy is ExampleWeights.UNIFORM:
        return 1.0
    if policy is ExampleWeights.CAPPED:
        return float(config.max_examples_per_client)
    raise ValueError("example-weights = \"claimed\" has no maximum weight for SecAgg+")


def device_weight(config: FederationConfig, claimed: float) -> int:
    """The weight a device gives its own update under the run's example-weight policy (at most ``max_weight``)."""
    return int(ExampleWeights(config.example_weights).weight(claimed, config.max_examples_per_client))

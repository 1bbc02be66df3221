"""Aggregation groups, their rules and the rules' state: small helpers the strategy composes.

Aggregation is Flower's: FedAvg (McMahan et al., 2017, https://arxiv.org/abs/1602.05629), FedProx,
FedAdam or FedYogi (Reddi et al., 2021), one instance per aggregation group, used only for its
aggregation step. A group is the global adapter or, for per-domain methods, one domain's adapter
(``shared.methods.group_of``). Like Flower's ``strategy_utils``, nothing here talks to the grid or
the ledger: the strategy hands in replies and stores what ``checkpoints`` returns.

Ledger checkpoints are keyed by a "domain" string: "" for the global adapter, the domain's name for
its adapter, and ``optimizer:<group>`` for a server optimizer's moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from shared.adapters import AdapterUpdateError
from shared.methods import GLOBAL_GROUP, Aggregation

TRAIN_METRICS = frozenset({"num-examples", "train-loss", "train-steps", "eval-loss-before", "eval-loss",
                           "eval-perplexity", "eval-accuracy", "eval-tokens", "seconds", "peak-rss-mb"})
EVALUATE_METRICS = frozenset({"num-examples", "base-loss", "base-perplexity", "base-accuracy", "eval-loss",
                              "eval-perplexity", "eval-accuracy", "eval-tokens", "seconds"})
# Sent only when personal training keeps its best validation checkpoint (run-config validation-fraction);
# the personal adapter's steps, where it trains beside the shared one or at evaluation;
# the shared adapter alone beside the user's model; by retrieval methods, the user's model without its
# cache and the cache's setting.
OPTIONAL_METRICS = frozenset({"personal-best-step", "personal-steps", "shared-perplexity", "model-loss", "model-perplexity", "cache-weight",
                              "cache-temperature", "cache-neighbours", "cache-validation-loss", "cache-keys"})
MAX_EXAMPLES = 10**9  # a client claiming more is lying about its weight in the average
OPTIMIZER_PREFIX = "optimizer:"
DOMAIN_PREFIX = "domain:"


def check_metrics(metrics: Mapping[str, float], expected: frozenset[str]) -> None:
    """Metric keys must be the expected ones (plus any of OPTIONAL_METRICS), values finite, and the weight plausible."""
    if not expected <= set(metrics) <= expected | OPTIONAL_METRICS:
        raise AdapterUpdateError(f"metric keys differ: missing {sorted(expected - set(metrics))}, "
                                 f"unexpected {sorted(set(metrics) - expected - OPTIONAL_METRICS)}")
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterUpdateError(f"metric {key!r} is not a finite number: {value!r}")
    if not 0 < metrics["num-examples"] <= MAX_EXAMPLES:
        raise AdapterUpdateError(f"num-examples {metrics['num-examples']} is out of range")


def make_rule(aggregation: Aggregation, server_learning_rate: float = 0.01, proximal_mu: float = 0.01) -> Strategy:
    """A Flower strategy used only for its aggregation step (sampling is done by the caller)."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 0, "min_available_nodes": 0}
    if aggregation is Aggregation.FEDPROX:  # the proximal term itself is applied by the clients
        return FedProx(proximal_mu=proximal_mu, **common)
    if aggregation is Aggregation.FEDADAM:
        return FedAdam(eta=server_learning_rate, **common)
    if aggregation is Aggregation.FEDYOGI:
        return FedYogi(eta=server_learning_rate, **common)
    return FedAvg(**common)


def aggregate_group(rule: Strategy, server_round: int, current: ArrayRecord, replies: list[Message]) -> ArrayRecord:
    """One group's new adapter: the rule's aggregate of its replies, starting from ``current``."""
    if isinstance(rule, (FedAdam, FedYogi)):
        # A server optimizer steps from the adapter the group's clients started from; Flower's own
        # configure_train would record it, but the caller samples and sends the messages itself.
        rule.current_arrays = {key: array.numpy() for key, array in current.items()}
    arrays, _ = rule.aggregate_train(server_round, replies)
    return arrays if arrays is not None else current


def mix(domain: ArrayRecord, global_: ArrayRecord, weight: float) -> ArrayRecord:
    """weight * domain + (1 - weight) * global, key by key (hierarchical global -> domain)."""
    return ArrayRecord({key: Array(weight * domain[key].numpy() + (1 - weight) * global_[key].numpy())
                        for key in domain.keys()})


def optimizer_state(rule: Strategy) -> dict[str, np.ndarray]:
    """A server optimizer's moments as flat tensors (``m/<key>``, ``v/<key>``); empty before its first step."""
    if not isinstance(rule, (FedAdam, FedYogi)) or not rule.m_t:
        return {}
    return {f"m/{k}": v for k, v in rule.m_t.items()} | {f"v/{k}": v for k, v in (rule.v_t or {}).items()}


def load_optimizer_state(rule: Strategy, tensors: Mapping[str, np.ndarray]) -> None:
    """Put moments saved by ``optimizer_state`` back, so the next step is the one an unbroken run takes."""
    if not isinstance(rule, (FedAdam, FedYogi)):
        raise ValueError(f"the run being resumed saved server-optimizer moments, which {type(rule).__name__} cannot "
                         "use; resume it with the aggregation it was started with")
    rule.m_t = {k.removeprefix("m/"): v for k, v in tensors.items() if k.startswith("m/")}
    rule.v_t = {k.removeprefix("v/"): v for k, v in tensors.items() if k.startswith("v/")}


def checkpoint_domain(group: str) -> str:
    """The ledger checkpoint key of a group's adapter."""
    return "" if group == GLOBAL_GROUP else group.removeprefix(DOMAIN_PREFIX)


def group_of_checkpoint(domain: str) -> str:
    """The group whose adapter a ledger checkpoint holds (the inverse of ``checkpoint_domain``)."""
    return f"{DOMAIN_PREFIX}{domain}" if domain else GLOBAL_GROUP


class GroupAdapters:
    """Each group's current adapter and the rule, with its optimizer state, that updates it.

    Every round the global adapter aggregates all accepted replies; each domain then aggregates its
    own clients from where it stood (a new domain from the previous global adapter) and is mixed with
    the new global one by ``domain_mix`` (1: pure domain).
    """

    def __init__(self, new_rule: Callable[[], Strategy], domain_mix: float = 1.0) -> None:
        self.new_rule = new_rule
        self.domain_mix = domain_mix
        self.rules: dict[str, Strategy] = {}
        self.adapters: dict[str, ArrayRecord] = {}  # group -> its current adapter (the shared part)

    def rule(self, group: str) -> Strategy:
        return self.rules.setdefault(group, self.new_rule())

    def aggregate(self, server_round: int, replies: list[Message], groups: list[str]) -> None:
        """One round: the global aggregate of every reply, then each domain's, mixed with the global one.

        ``groups[i]`` is the group of ``replies[i]``.
        """
        by_group: dict[str, list[Message]] = {}
        for reply, group in zip(replies, groups, strict=True):
            by_group.setdefault(group, []).append(reply)
        previous_global = self.adapters[GLOBAL_GROUP]
        self.adapters[GLOBAL_GROUP] = aggregate_group(self.rule(GLOBAL_GROUP), server_round, previous_global, replies)
        for group, group_replies in sorted(by_group.items()):
            if group == GLOBAL_GROUP:
                continue
            current = self.adapters.get(group, previous_global)  # a new domain starts where its nodes started
            aggregate = aggregate_group(self.rule(group), server_round, current, group_replies)
            self.adapters[group] = mix(aggregate, self.adapters[GLOBAL_GROUP], self.domain_mix)

    def checkpoints(self) -> dict[str, dict[str, np.ndarray]]:
        """Everything a resumed run needs, by ledger checkpoint key: adapters, then optimizer moments."""
        saved = {checkpoint_domain(group): {k: v.numpy() for k, v in arrays.items()}
                 for group, arrays in self.adapters.items()}
        for group, rule in self.rules.items():
            if state := optimizer_state(rule):
                saved[OPTIMIZER_PREFIX + group] = state
        return saved

    def restore(self, checkpoints: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Load what ``checkpoints`` returned."""
        for domain, tensors in checkpoints.items():
            if domain.startswith(OPTIMIZER_PREFIX):
                load_optimizer_state(self.rule(domain.removeprefix(OPTIMIZER_PREFIX)), tensors)
            else:
                self.adapters[group_of_checkpoint(domain)] = ArrayRecord({k: Array(v) for k, v in tensors.items()})

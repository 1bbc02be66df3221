"""Aggregation groups, their rules and the rules' state, and the poisoning defence: small helpers the strategy composes.

Aggregation is Flower's: FedAvg (McMahan et al., 2017, https://arxiv.org/abs/1602.05629), FedProx,
FedAdam, FedYogi or FedAdagrad (Reddi et al., 2021), FedAvgM (Hsu et al., 2019,
https://arxiv.org/abs/1909.06335), or one of its Byzantine-robust rules (FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan), one instance per aggregation group, used only for its
aggregation step. A group is the global adapter or, for per-domain methods, one domain's adapter
(``shared.methods.group_of``). Like Flower's ``strategy_utils``, nothing here talks to the grid or
the ledger: the strategy hands in replies and stores what ``checkpoints`` returns.

The defence before the rule (docs/trust.md): each update's L2 norm of change from what its client
received (``update_norm``), a bound on it (``NormBound``) that rejects or clips (``clip_update``),
and the weight a client's claimed example count buys (``shared.methods.ExampleWeights``).

User-level differential privacy wraps the rule in one of Flower's DP wrappers (``with_privacy``):
they clip each update's change from what its client received and add Gaussian noise to the
aggregate; the accounting is server/privacy.py's.

Replies from devices of lower LoRA rank arrive padded to the run's rank (server/strategy.py); before
the rule sees them, the components a device lacks are filled with the per-component average of the
devices that have them (``shared.ranks.fill_missing``), so the rule aggregates each component over
those devices only (HetLoRA, docs/communication.md).

Ledger checkpoints are keyed by a "domain" string: "" for the global adapter, the domain's name for
its adapter, and ``optimizer:<group>`` for a server optimizer's state (FedAdam's, FedYogi's and
FedAdagrad's moments, FedAvgM's momentum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (Bulyan, DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdagrad, FedAdam, FedAvg, FedAvgM,
                                     FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy)
from flwr.serverapp.strategy.fedopt import FedOpt

from server.privacy import PrivacySettings
from shared.adapters import AdapterUpdateError
from shared.methods import GLOBAL_GROUP, Aggregation, DpMode
from shared.ranks import adapter_rank, fill_missing

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
MOMENTUM = "momentum/"  # FedAvgM's state in an optimizer checkpoint
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


# --- the defence before the rule ------------------------------------------------------------------


def update_norm(received: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``returned - received`` over all of ``returned``'s tensors, in float64.

    inf when the squares overflow float64 (finite float64 values near 1e308): such an update is over
    any bound.
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for key, value in returned.items():
            delta = np.asarray(value, np.float64) - np.asarray(received[key], np.float64)
            total += float(np.vdot(delta, delta))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_update(received: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray], bound: float,
                norm: float) -> dict[str, np.ndarray]:
    """``returned`` with its change from ``received`` scaled down to norm ``bound`` (``norm``: its norm now).

    Each tensor keeps its dtype. An update whose norm is not finite cannot be scaled: refuse it first.
    """
    if not math.isfinite(norm):
        raise ValueError("an update of infinite norm cannot be clipped")
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {key: (np.asarray(received[key], np.float64)
                  + scale * (np.asarray(value, np.float64) - np.asarray(received[key], np.float64))).astype(value.dtype)
            for key, value in returned.items()}


@dataclass(frozen=True)
class NormBound:
    """Run config's bound on an update's norm (``max-update-norm``, ``norm-bound-relative``, ``norm-bound-mode``).

    ``absolute``: a fixed bound; ``relative``: that multiple of the round's median norm; 0 turns a part
    off, and with both on the tighter one holds. ``clip``: scale a longer update down to the bound
    (else reject it).
    """

    absolute: float = 0.0
    relative: float = 0.0
    clip: bool = False

    def limit(self, norms: Sequence[float]) -> float:
        """This round's bound, given the norms of its well-formed updates; inf when the bound is off."""
        limits = [math.inf]
        if self.absolute > 0:
            limits.append(self.absolute)
        finite = [norm for norm in norms if math.isfinite(norm)]
        if self.relative > 0 and finite:
            limits.append(self.relative * float(np.median(finite)))
        return min(limits)


# --- Flower's rules ---------------------------------------------------------------------------------


class MultiKrumKeepingHonest(MultiKrum):
    """Flower's MultiKrum keeping n - f of each aggregation's n replies (m = n - f, Blanchard et al.).

    Flower's MultiKrum keeps a fixed number; a group's replies per round vary, so run config
    ``krum-keep = 0`` sets the number from the replies actually received.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


def make_rule(aggregation: Aggregation, server_learning_rate: float = 0.01, proximal_mu: float = 0.01,
              trim_beta: float = 0.2, byzantine_clients: int = 0, krum_keep: int = 0,
              server_momentum: float = 0.9) -> Strategy:
    """A Flower strategy used only for its aggregation step (sampling is done by the caller).

    ``server_learning_rate``: the server optimizer's step (FedAdam's, FedYogi's and FedAdagrad's eta,
    FedAvgM's learning rate); ``server_momentum``: FedAvgM's momentum.
    ``trim_beta``: FedTrimmedAvg's cut from each tail; ``byzantine_clients``: the f that Krum,
    MultiKrum and Bulyan tolerate; ``krum_keep``: the replies MultiKrum averages (0: n - f).
    """
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 0, "min_available_nodes": 0}
    f = {"num_malicious_nodes": byzantine_clients}
    builders: dict[Aggregation, Callable[[], Strategy]] = {
        Aggregation.FEDAVG: lambda: FedAvg(**common),
        Aggregation.FEDPROX: lambda: FedProx(proximal_mu=proximal_mu, **common),  # the clients add the proximal term
        Aggregation.FEDADAM: lambda: FedAdam(eta=server_learning_rate, **common),
        Aggregation.FEDYOGI: lambda: FedYogi(eta=server_learning_rate, **common),
        Aggregation.FEDADAGRAD: lambda: FedAdagrad(eta=server_learning_rate, **common),
        Aggregation.FEDAVGM: lambda: FedAvgM(server_learning_rate=server_learning_rate, server_momentum=server_momentum,
                                             **common),
        Aggregation.FEDMEDIAN: lambda: FedMedian(**common),
        Aggregation.FEDTRIMMEDAVG: lambda: FedTrimmedAvg(beta=trim_beta, **common),
        Aggregation.KRUM: lambda: Krum(**f, **common),
        Aggregation.MULTIKRUM: lambda: (MultiKrum(num_nodes_to_select=krum_keep, **f, **common) if krum_keep
                                        else MultiKrumKeepingHonest(**f, **common)),
        Aggregation.BULYAN: lambda: Bulyan(**f, **common),
    }
    return builders[Aggregation(aggregation)]()  # a value string too: never a silent fallback


# --- Flower's DP wrappers ---------------------------------------------------------------------------


class _NoiseForTheReplies:
    """Flower's DP wrappers scale the noise to ``num_sampled_clients``, fixed when they are built.

    The mean they wrap is over the replies actually aggregated, which vary by round (failures,
    rejections, the budget): with fewer, each clipped update weighs more than the noise covers. Set
    from the replies each aggregation receives, the noise stays ``noise_multiplier x clipping_norm``
    on the sum of clipped updates (McMahan et al., 2018).
    """

    num_sampled_clients: int

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_sampled_clients = max(1, len(replies))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class ServerSideFixedClipping(_NoiseForTheReplies, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, its noise scaled to the round's replies."""


class ClientSideFixedClipping(_NoiseForTheReplies, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (devices run ``fixedclipping_mod``), its noise scaled to the round's replies."""


class ServerSideAdaptiveClipping(_NoiseForTheReplies, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, with the noise at the norm the round's updates were clipped to.

    Flower 1.42 moves the clipping norm towards the target quantile before it adds the noise, so a
    round whose norm shrinks gets noise scaled to the smaller norm while its updates were clipped to
    the larger one: less noise than the noise multiplier promises. Here the move waits until the
    noise is added (Andrew et al., 2021, Algorithm 1: noise at C_t, then C_t+1).
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._clipped_fraction: float | None = None
        result = super().aggregate_train(server_round, replies)
        if self._clipped_fraction is not None:
            super()._geometric_update(self._clipped_fraction)
        return result

    def _geometric_update(self, clipped_fraction: float) -> None:
        self._clipped_fraction = clipped_fraction  # applied once the noise is added


def with_privacy(rule: Strategy, privacy: PrivacySettings) -> Strategy:
    """``rule`` wrapped in the Flower DP wrapper ``privacy.mode`` names (the rule itself when dp is off)."""
    noise, norm, replies = privacy.noise_multiplier, privacy.clipping_norm, privacy.expected_replies
    builders: dict[DpMode, Callable[[], Strategy]] = {
        DpMode.OFF: lambda: rule,
        DpMode.SERVER_FIXED: lambda: ServerSideFixedClipping(rule, noise, norm, replies),
        DpMode.CLIENT_FIXED: lambda: ClientSideFixedClipping(rule, noise, norm, replies),
        DpMode.SERVER_ADAPTIVE: lambda: ServerSideAdaptiveClipping(
            rule, noise, replies, initial_clipping_norm=norm, target_clipped_quantile=privacy.target_quantile,
            clip_norm_lr=privacy.clip_norm_lr, clipped_count_stddev=privacy.clipped_count_stddev or None),
    }
    return builders[privacy.mode]()


# --- one group's aggregation -------------------------------------------------------------------------


def copy_for_rule(reply: Message, order: Iterable[str]) -> Message:
    """A reply whose array and metric records are the rule's own: FedMedian and Bulyan empty the records they read.

    Its tensors come in ``order`` (the keys of what the clients were sent): Flower's server-side DP
    wrappers pair a reply's tensors with the sent ones by position. The reply itself is aggregated
    again by its domain's group and its bytes counted afterwards.
    """
    keys = list(order)
    content = RecordDict({name: ArrayRecord({key: record[key] for key in keys})
                          for name, record in reply.content.array_records.items()}
                         | {name: MetricRecord(dict(record.items())) for name, record in reply.content.metric_records.items()})
    return Message(metadata=reply.metadata, content=content)


def aggregate_group(rule: Strategy, server_round: int, current: ArrayRecord, replies: list[Message],
                    ranks: Sequence[int] | None = None) -> ArrayRecord | None:
    """One group's new adapter: the rule's aggregate of its replies, starting from ``current``.

    ``ranks[i]``: the LoRA rank ``replies[i]``'s device trained (None: all at ``current``'s rank).
    None when the rule declines (Flower's Bulyan with fewer than 4f + 3 replies).
    """
    # Flower's own configure_train would record what the clients started from, but the caller
    # samples and sends the messages itself: a server optimizer steps from it, and Flower's
    # server-side DP wrappers clip each update's change from it.
    if isinstance(rule, FedOpt):  # FedAdam, FedYogi, FedAdagrad
        rule.current_arrays = {key: array.numpy() for key, array in current.items()}
    if isinstance(rule, FedAvgM):
        rule.current_arrays = current
    if isinstance(rule, (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)):
        rule.current_arrays = current
    copies = [copy_for_rule(reply, current.keys()) for reply in replies]
    full = adapter_rank({key: tuple(array.shape) for key, array in current.items()})
    if ranks is not None and full is not None and any(rank < full for rank in ranks):
        fill_lower_ranks(copies, ranks, current)
    arrays, _ = rule.aggregate_train(server_round, copies)
    return arrays


def fill_lower_ranks(copies: list[Message], ranks: Sequence[int], current: ArrayRecord) -> None:
    """Fill, in the rule's copies, each rank component a device lacks with the average of those that have it."""
    weights = [float(copy.content["metrics"]["num-examples"]) for copy in copies]
    filled = fill_missing([{key: array.numpy() for key, array in copy.content["arrays"].items()} for copy in copies],
                          ranks, weights, {key: array.numpy() for key, array in current.items()})
    for copy, tensors in zip(copies, filled, strict=True):
        copy.content["arrays"] = ArrayRecord({key: Array(tensors[key]) for key in current.keys()})


def mix(domain: ArrayRecord, global_: ArrayRecord, weight: float) -> ArrayRecord:
    """weight * domain + (1 - weight) * global, key by key (hierarchical global -> domain)."""
    return ArrayRecord({key: Array(weight * domain[key].numpy() + (1 - weight) * global_[key].numpy())
                        for key in domain.keys()})


def optimizer_state(rule: Strategy) -> dict[str, np.ndarray]:
    """A server optimizer's state as flat tensors; empty before its first step.

    FedAdam's, FedYogi's and FedAdagrad's moments as ``m/<key>`` and ``v/<key>``; FedAvgM's momentum
    as ``momentum/<key>`` (Flower keeps it as a list in the order of the adapter's keys).
    """
    if isinstance(rule, FedOpt) and rule.m_t:
        return {f"m/{k}": v for k, v in rule.m_t.items()} | {f"v/{k}": v for k, v in (rule.v_t or {}).items()}
    if isinstance(rule, FedAvgM) and rule.momentum_vector is not None and rule.current_arrays is not None:
        return {f"{MOMENTUM}{k}": v for k, v in zip(rule.current_arrays.keys(), rule.momentum_vector, strict=True)}
    return {}


def load_optimizer_state(rule: Strategy, tensors: Mapping[str, np.ndarray], keys: Iterable[str]) -> None:
    """Put state saved by ``optimizer_state`` back, so the next step is the one an unbroken run takes.

    ``keys``: the group's adapter keys in the order its rule will receive them (FedAvgM's momentum
    is positional).
    """
    if isinstance(rule, FedOpt):
        rule.m_t = {k.removeprefix("m/"): v for k, v in tensors.items() if k.startswith("m/")}
        rule.v_t = {k.removeprefix("v/"): v for k, v in tensors.items() if k.startswith("v/")}
    elif isinstance(rule, FedAvgM) and all(k.startswith(MOMENTUM) for k in tensors):
        rule.momentum_vector = [tensors[MOMENTUM + key] for key in keys]
    else:
        raise ValueError(f"the run being resumed saved server-optimizer state ({sorted(tensors)[:2]}...), which "
                         f"{type(rule).__name__} cannot use; resume it with the aggregation it was started with")


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
        if group not in self.rules:  # built once: a rule keeps state (moments, an adaptive clipping norm)
            self.rules[group] = self.new_rule()
        return self.rules[group]

    def aggregate(self, server_round: int, replies: list[Message], groups: list[str],
                  ranks: Sequence[int] | None = None) -> list[str]:
        """One round: the global aggregate of every reply, then each domain's, mixed with the global one.

        ``groups[i]`` is the group of ``replies[i]``, ``ranks[i]`` the LoRA rank its device trained
        (None: all at the adapters' rank). Returns the groups whose rule declined to aggregate (they
        keep their adapter).
        """
        by_group: dict[str, list[int]] = {}  # group -> the indices of its replies
        for index, group in enumerate(groups):
            by_group.setdefault(group, []).append(index)
        previous_global = self.adapters[GLOBAL_GROUP]
        declined: list[str] = []
        new_global = aggregate_group(self.rule(GLOBAL_GROUP), server_round, previous_global, replies, ranks)
        if new_global is None:
            declined.append(GLOBAL_GROUP)
        self.adapters[GLOBAL_GROUP] = previous_global if new_global is None else new_global
        for group, indices in sorted(by_group.items()):
            if group == GLOBAL_GROUP:
                continue
            current = self.adapters.get(group, previous_global)  # a new domain starts where its nodes started
            aggregate = aggregate_group(self.rule(group), server_round, current, [replies[i] for i in indices],
                                        None if ranks is None else [ranks[i] for i in indices])
            if aggregate is None:
                declined.append(group)
                aggregate = current
            self.adapters[group] = mix(aggregate, self.adapters[GLOBAL_GROUP], self.domain_mix)
        return declined

    def checkpoints(self) -> dict[str, dict[str, np.ndarray]]:
        """Everything a resumed run needs, by ledger checkpoint key: adapters, then optimizer moments."""
        saved = {checkpoint_domain(group): {k: v.numpy() for k, v in arrays.items()}
                 for group, arrays in self.adapters.items()}
        for group, rule in self.rules.items():
            if state := optimizer_state(rule):
                saved[OPTIMIZER_PREFIX + group] = state
        return saved

    def restore(self, checkpoints: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Load what ``checkpoints`` returned: the adapters first, as a rule's state follows its adapter's keys."""
        for domain, tensors in checkpoints.items():
            if not domain.startswith(OPTIMIZER_PREFIX):
                self.adapters[group_of_checkpoint(domain)] = ArrayRecord({k: Array(v) for k, v in tensors.items()})
        for domain, tensors in checkpoints.items():
            if domain.startswith(OPTIMIZER_PREFIX):
                group = domain.removeprefix(OPTIMIZER_PREFIX)
                load_optimizer_state(self.rule(group), tensors, self.adapters[group].keys())

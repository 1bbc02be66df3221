"""Personalization methods: what each one shares, keeps private, and scores.

Every method runs over the same base and data; they differ only in which LoRA tensors travel and how a
user's model is assembled. A client holds up to two adapters on the base:

- ``shared``: aggregated by the server (all of it, or only its A matrices for ``fedsa``);
- ``personal``: trained on the device and saved there, never sent.

| method        | travels (`Shares`)         | personal adapter (`Personal`)                               | a user's model    |
|---------------|----------------------------|-------------------------------------------------------------|-------------------|
| `local`       | nothing (`NONE`)           | trained alone, with the local-steps budget (`ALONE`)        | personal          |
| `fedavg`      | shared, global (`ALL`)     | none (`NONE`)                                               | shared            |
| `fedavg-ft`   | shared, global (`ALL`)     | shared copied, fine-tuned at evaluation (`FINETUNE`)        | personal          |
| `domain`      | shared, per domain (`ALL`) | none (`NONE`)                                               | shared            |
| `fedsa`       | A of shared (`LORA_A`)     | B of shared stays on the device (`B_MATRICES`)              | global A + own B  |
| `dual`        | shared, global (`ALL`)     | trained on top of the frozen shared one (`STACKED`)         | shared + personal |
| `dual-domain` | shared, per domain (`ALL`) | trained on top of the frozen shared one (`STACKED`)         | shared + personal |
| `ditto`       | shared, global (`ALL`)     | starts from shared, trained with a pull toward it (`ALONE`) | personal          |
| `fedavg-knn`  | shared, global (`ALL`)     | none (`NONE`); a kNN cache of the user's speeches            | shared + cache    |
| `dual-knn`    | shared, global (`ALL`)     | as `dual` (`STACKED`); a kNN cache of the user's speeches    | shared + personal + cache |

A method with ``retrieval`` scores its user's model mixed with a kNN-LM cache built on the device from
the user's training speeches (shared/retrieval.py): no training, nothing sent, built at evaluation.

The client asks a method questions (``trains_personal``, ``tunes_at_evaluation``, ``keeps_b_matrices``,
``personal_from_shared``, ``proximal_to_shared``, ...), never its name.

References: FedAvg (McMahan et al., 2017); FedSA-LoRA (Guo et al., ICLR 2025); FDLoRA (Qi et al.,
2024) and FedDPA (Yang et al., 2024) for dual adapters; Ditto (Li et al., ICML 2021); kNN-LM
(Khandelwal et al., ICLR 2020) for the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

SHARED, PERSONAL = "shared", "personal"
GLOBAL_GROUP = "global"


class Shares(Enum):
    """Which tensors of the shared adapter travel to the server."""

    NONE = "none"
    ALL = "all"
    LORA_A = "lora_A"  # FedSA: only the A matrices

    def travels(self, key: str) -> bool:
        """Whether an adapter tensor (peft state-dict key) travels."""
        return self is Shares.ALL or (self is Shares.LORA_A and "lora_A" in key)


class Personal(Enum):
    """How the device's private adapter takes part in a user's model."""

    NONE = "none"  # no private adapter: the user's model is the shared one
    STACKED = "stacked"  # shared + personal active together, personal trained on top of the frozen shared
    ALONE = "alone"  # personal replaces shared
    B_MATRICES = "b-matrices"  # the device's own B under the global A, kept in its saved shared adapter
    FINETUNE = "finetune"  # a copy of the shared adapter tuned at evaluation


@dataclass(frozen=True)
class Method:
    """How one personalization method uses the two adapters."""

    name: str
    shares: Shares
    by_domain: bool  # shared adapter aggregated per domain (else one global adapter)
    personal: Personal
    personal_from_shared: bool = False  # a new personal adapter starts as a copy of the shared one (Ditto)
    proximal_to_shared: bool = False  # personal training is pulled toward the shared adapter (Ditto)
    retrieval: bool = False  # the user's model is mixed with a kNN cache of the user's own speeches (kNN-LM)

    @property
    def sends_arrays(self) -> bool:
        return self.shares is not Shares.NONE

    @property
    def keeps_personal(self) -> bool:
        """Whether the device saves and restores a ``personal`` adapter."""
        return self.personal in (Personal.STACKED, Personal.ALONE, Personal.FINETUNE)

    @property
    def keeps_b_matrices(self) -> bool:
        """Whether the device's saved ``shared`` adapter holds its private B (FedSA)."""
        return self.personal is Personal.B_MATRICES

    @property
    def trains_personal(self) -> bool:
        """Whether a train message trains the personal adapter."""
        return self.personal in (Personal.STACKED, Personal.ALONE)

    @property
    def stacks_personal(self) -> bool:
        """Whether the personal adapter runs on top of the shared one (else alone)."""
        return self.personal is Personal.STACKED

    @property
    def tunes_at_evaluation(self) -> bool:
        """Whether an evaluate message first tunes a copy of the shared adapter (fedavg-ft)."""
        return self.personal is Personal.FINETUNE

    @property
    def personal_steps_from_local(self) -> bool:
        """Whether personal training is the method's only training, with ``local-steps`` and its stats (local)."""
        return self.trains_personal and not self.sends_arrays

    @property
    def user_adapters(self) -> list[str]:
        """The adapters active in a user's model under this method (the last column of the table above)."""
        if self.personal in (Personal.NONE, Personal.B_MATRICES):
            return [SHARED]
        return [SHARED, PERSONAL] if self.stacks_personal else [PERSONAL]

    @property
    def adds_to_shared(self) -> bool:
        """Whether a user's model is more than the shared adapter alone (a personal adapter, or a cache)."""
        return self.user_adapters != [SHARED] or self.retrieval

    def shared_key(self, key: str) -> bool:
        """Whether an adapter tensor (peft state-dict key) travels under this method."""
        return self.shares.travels(key)


METHODS: dict[str, Method] = {
    "local": Method("local", Shares.NONE, by_domain=False, personal=Personal.ALONE),
    "fedavg": Method("fedavg", Shares.ALL, by_domain=False, personal=Personal.NONE),
    "fedavg-ft": Method("fedavg-ft", Shares.ALL, by_domain=False, personal=Personal.FINETUNE),
    "domain": Method("domain", Shares.ALL, by_domain=True, personal=Personal.NONE),
    "fedsa": Method("fedsa", Shares.LORA_A, by_domain=False, personal=Personal.B_MATRICES),
    "dual": Method("dual", Shares.ALL, by_domain=False, personal=Personal.STACKED),
    "dual-domain": Method("dual-domain", Shares.ALL, by_domain=True, personal=Personal.STACKED),
    "ditto": Method("ditto", Shares.ALL, by_domain=False, personal=Personal.ALONE, personal_from_shared=True,
                    proximal_to_shared=True),
    "fedavg-knn": Method("fedavg-knn", Shares.ALL, by_domain=False, personal=Personal.NONE, retrieval=True),
    "dual-knn": Method("dual-knn", Shares.ALL, by_domain=False, personal=Personal.STACKED, retrieval=True),
}



class Aggregation(Enum):
    """The Flower rule that aggregates each group's replies (built by ``server.aggregation.make_rule``).

    FedAdam, FedYogi and FedAdagrad (Reddi et al., 2021) and FedAvgM (Hsu et al., 2019) step from the
    mean with a server optimizer whose state a resumed run restores. The last five are Flower's
    Byzantine-robust rules (docs/trust.md): coordinate-wise median and trimmed mean (Yin et al.,
    2018), Krum and Multi-Krum (Blanchard et al., 2017), Bulyan (El Mhamdi et al., 2018).
    """

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    FEDAVGM = "fedavgm"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    BULYAN = "bulyan"

    @property
    def clients_add_proximal_term(self) -> bool:
        """FedProx's proximal term is part of the clients' local loss; the server only averages."""
        return self is Aggregation.FEDPROX

    @property
    def is_mean(self) -> bool:
        """Whether the server's aggregate is the weighted mean of the replies (FedProx's term is the clients')."""
        return self in (Aggregation.FEDAVG, Aggregation.FEDPROX)

    @property
    def robust(self) -> bool:
        """Whether the rule bounds what a minority of replies can do to the aggregate, whatever their values."""
        return self in (Aggregation.FEDMEDIAN, Aggregation.FEDTRIMMEDAVG, Aggregation.KRUM, Aggregation.MULTIKRUM,
                        Aggregation.BULYAN)

    @property
    def selects_replies(self) -> bool:
        """Whether the rule picks whole replies by their distances (Krum, Multi-Krum, Bulyan).

        Such a rule needs a minimum number of replies in every group it aggregates (``min_replies``).
        """
        return self in (Aggregation.KRUM, Aggregation.MULTIKRUM, Aggregation.BULYAN)

    @property
    def weighs_by_examples(self) -> bool:
        """Whether clients' ``num-examples`` weigh the aggregate (median, trimmed mean, Krum and Bulyan ignore them)."""
        return self in (Aggregation.FEDAVG, Aggregation.FEDPROX, Aggregation.FEDADAM, Aggregation.FEDYOGI,
                        Aggregation.FEDADAGRAD, Aggregation.FEDAVGM, Aggregation.MULTIKRUM)

    def min_replies(self, byzantine_clients: int, trim_beta: float) -> int:
        """The fewest replies with which the rule does what it is chosen for (1: no minimum).

        Krum and Multi-Krum resist f = ``byzantine_clients`` bad replies from n >= 2f + 3 (Blanchard et
        al.), Bulyan from n >= 4f + 3 (below it Flower's Bulyan skips the aggregation); a median differs
        from a mean from 3 replies, and a trimmed mean (``trim_beta`` > 0) trims a reply from each tail
        once int(trim_beta * n) >= 1.
        """
        if self in (Aggregation.KRUM, Aggregation.MULTIKRUM):
            return 2 * byzantine_clients + 3
        if self is Aggregation.BULYAN:
            return 4 * byzantine_clients + 3
        if self is Aggregation.FEDTRIMMEDAVG:
            if not trim_beta > 0:
                raise ValueError(f"a trimmed mean with beta {trim_beta} trims nothing, whatever the number of replies")
            n = 3
            while int(trim_beta * n) < 1:  # Flower's trim_mean cuts int(beta * n) from each end
                n += 1
            return n
        return 3 if self is Aggregation.FEDMEDIAN else 1


AGGREGATIONS = tuple(rule.value for rule in Aggregation)


class ExampleWeights(Enum):
    """What a client's claimed ``num-examples`` buys in a weighted aggregate (run config ``example-weights``)."""

    CLAIMED = "claimed"  # the claim itself
    CAPPED = "capped"  # at most max-examples-per-client
    UNIFORM = "uniform"  # 1 for every client

    def weight(self, claimed: float, cap: int) -> float:
        if self is ExampleWeights.CAPPED:
            return min(claimed, cap)
        return 1 if self is ExampleWeights.UNIFORM else claimed


class DpMode(Enum):
    """User-level differential privacy (run config ``dp``; server/privacy.py, docs/trust.md).

    Each mode but off wraps the global group's rule in one of Flower's DP wrappers: each update's
    change from what its node was sent is clipped to an L2 norm, on the server or on the device
    (Flower's ``fixedclipping_mod``), and Gaussian noise is added to the aggregate (McMahan et al.,
    2018; adaptive clipping: Andrew et al., 2021).
    """

    OFF = "off"
    SERVER_FIXED = "server-fixed"
    SERVER_ADAPTIVE = "server-adaptive"
    CLIENT_FIXED = "client-fixed"

    @property
    def on(self) -> bool:
        return self is not DpMode.OFF

    @property
    def clips_on_device(self) -> bool:
        """Whether the devices clip (the server sends the norm and checks that they did)."""
        return self is DpMode.CLIENT_FIXED

    @property
    def adaptive(self) -> bool:
        """Whether the clipping norm follows a quantile of the updates' norms, round by round."""
        return self is DpMode.SERVER_ADAPTIVE


DP_MODES = tuple(mode.value for mode in DpMode)


def method(name: str) -> Method:
    """Look a method up by name, with the list of known ones in the error."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def without_retrieval(method_: Method) -> Method | None:
    """The method that trains and shares exactly as a retrieval method does, without its cache (``fedavg-knn`` -> ``fedavg``).

    A retrieval method's evaluate reply scores its user's model with and without the cache, so one run
    gives both rows of a comparison, paired on the same adapters.
    """
    if not method_.retrieval:
        return None
    for other in METHODS.values():
        if not other.retrieval and dataclasses.replace(other, name=method_.name, retrieval=True) == method_:
            return other
    return None


def group_of(method_: Method, domain: str | None) -> str:
    """The aggregation group a client's shared adapter belongs to."""
    if method_.by_domain and domain:
        return f"domain:{domain}"
    return GLOBAL_GROUP

"""Personalization methods: what each one shares, keeps private, and scores.

Every method runs over the same base and data; they differ only in which LoRA tensors travel and how a
user's model is assembled. A client holds up to two adapters on the base:

- ``shared``: aggregated by the server (all of it, or only its A matrices for ``fedsa``);
- ``personal``: trained on the device and saved there, never sent.

| method      | travels                  | personal adapter                           | a user's model            |
|-------------|--------------------------|--------------------------------------------|---------------------------|
| `local`     | nothing                  | trained alone                              | personal                  |
| `fedavg`    | shared (global)          | none                                       | shared                    |
| `fedavg-ft` | shared (global)          | shared copied, fine-tuned at evaluation    | personal                  |
| `domain`    | shared (one per domain)  | none                                       | shared                    |
| `fedsa`     | A of shared (global)     | B of shared stays on the device            | global A + own B          |
| `dual`      | shared (global/domain)   | trained on top of the frozen shared one    | shared + personal         |
| `ditto`     | shared (global)          | trained with a pull toward shared          | personal                  |

References: FedAvg (McMahan et al., 2017); FedSA-LoRA (Guo et al., ICLR 2025); FDLoRA (Qi et al.,
2024) and FedDPA (Yang et al., 2024) for dual adapters; Ditto (Li et al., ICML 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

SHARED, PERSONAL = "shared", "personal"
GLOBAL_GROUP = "global"


@dataclass(frozen=True)
class Method:
    """How one personalization method uses the two adapters."""

    name: str
    shares: str  # "none", "all" (every shared tensor) or "lora_A" (only A matrices)
    by_domain: bool  # shared adapter aggregated per domain (else one global adapter)
    personal: str  # "none", "stacked" (shared + personal active), "alone" (personal replaces shared),
    #              "b-matrices" (own B under the global A), "finetune" (copy of shared tuned at evaluation)

    @property
    def sends_arrays(self) -> bool:
        return self.shares != "none"

    @property
    def user_adapters(self) -> list[str]:
        """The adapters active in a user's model under this method (the last column of the table above)."""
        return {"none": [SHARED], "b-matrices": [SHARED], "stacked": [SHARED, PERSONAL]}.get(self.personal, [PERSONAL])

    def shared_key(self, key: str) -> bool:
        """Whether an adapter tensor (peft state-dict key) travels under this method."""
        return self.shares == "all" or (self.shares == "lora_A" and "lora_A" in key)


METHODS: dict[str, Method] = {
    "local": Method("local", shares="none", by_domain=False, personal="alone"),
    "fedavg": Method("fedavg", shares="all", by_domain=False, personal="none"),
    "fedavg-ft": Method("fedavg-ft", shares="all", by_domain=False, personal="finetune"),
    "domain": Method("domain", shares="all", by_domain=True, personal="none"),
    "fedsa": Method("fedsa", shares="lora_A", by_domain=False, personal="b-matrices"),
    "dual": Method("dual", shares="all", by_domain=False, personal="stacked"),
    "dual-domain": Method("dual-domain", shares="all", by_domain=True, personal="stacked"),
    "ditto": Method("ditto", shares="all", by_domain=False, personal="alone"),
}

AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "fedyogi")


def method(name: str) -> Method:
    """Look a method up by name, with the list of known ones in the error."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def group_of(method_: Method, domain: str | None) -> str:
    """The aggregation group a client's shared adapter belongs to."""
    if method_.by_domain and domain:
        return f"domain:{domain}"
    return GLOBAL_GROUP

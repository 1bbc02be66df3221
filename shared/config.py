"""The run configuration shared by server and clients, validated in one place.

Flower hands both sides the same run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden
by ``flwr run --run-config``). Every key is documented in docs/run-config.md; defaults here equal the
pyproject defaults (a test checks it).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.codec import DOWNLINK_CODECS, UPDATE_CODECS, Codecs, UpdateCodec
from shared.device import DEVICES
from shared.methods import AGGREGATIONS, DP_MODES, METHODS, Aggregation, DpMode, ExampleWeights

# the poisoning defence (server/aggregation.py) and the attack harness (client/attacks.py); docs/trust.md
NORM_BOUND_MODES = ("reject", "clip")
EXAMPLE_WEIGHTS = tuple(policy.value for policy in ExampleWeights)
ATTACKS = ("none", "scale", "sign-flip", "gaussian", "inflate-examples")
SECAGG_MODULUS_RANGE = 2**32  # Flower's SecAggPlusWorkflow default: masks are drawn below it

CHOICES: dict[str, tuple[str, ...]] = {
    "method": tuple(METHODS),
    "aggregation": AGGREGATIONS,
    "base_dtype": ("float32", "bfloat16", "float16"),
    "split": ("random", "temporal"),
    "score_split": ("test", "validation"),
    "norm_bound_mode": NORM_BOUND_MODES,
    "example_weights": EXAMPLE_WEIGHTS,
    "attack": ATTACKS,
    "dp": DP_MODES,
    "update_codec": UPDATE_CODECS,
    "downlink_codec": DOWNLINK_CODECS,
    "device": DEVICES,
}


def fedgraft_home() -> Path:
    """Where the server's ledger and outputs and a device's private state live by default: $FEDGRAFT_HOME or ~/.fedgraft."""
    return Path(os.environ.get("FEDGRAFT_HOME", Path.home() / ".fedgraft"))


class ConfigError(ValueError):
    """A run-config or node-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class FederationConfig:
    """Typed view of the run config; attribute ``num_server_rounds`` is key ``num-server-rounds``."""

    # federation
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 0  # nodes to wait for before sampling; 0: min-train-nodes
    node_wait_seconds: float = 180.0
    round_timeout: float = 900.0
    # base model
    base_model: str = "smollm2"
    base_dtype: str = "float32"
    # personalization (shared/methods.py)
    method: str = "fedavg-knn"
    aggregation: str = "fedavg"
    personal_steps: int = 12
    personal_learning_rate: float = 0.0
    validation_fraction: float = 0.0
    validate_every: int = 2
    ditto_lambda: float = 0.1
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_momentum: float = 0.9  # FedAvgM's (aggregation = fedavgm)
    domain_mix: float = 1.0
    state_dir: str = ""
    # adapter
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,v_proj"
    # local training and evaluation
    local_steps: int = 12
    batch_size: int = 4
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    seq_len: int = 128
    learning_rate: float = 0.002
    max_eval_blocks: int = 32
    device: str = "auto"  # where clients train and score (shared/device.py): auto, cpu, cuda
    # data
    min_speeches: int = 60
    exclude_plays: str = ""
    split: str = "random"
    test_fraction: float = 0.2
    score_split: str = "test"
    seed: int = 0
    # server safety and bookkeeping
    max_update_mb: float = 64.0
    # communication (shared/codec.py, docs/communication.md): how train replies and the server's adapters travel
    update_codec: str = "float32"
    downlink_codec: str = "float32"
    topk_fraction: float = 0.1
    evaluate_every: int = 0
    ledger_url: str = ""
    output_dir: str = ""
    resume_run: int = 0
    checkpoint_every: int = 1  # rounds between adapter checkpoints in the ledger; the last round always has one
    # poisoning defence (docs/trust.md): a bound on each update's norm, the example-weight policy, and
    # the settings of Flower's robust rules (aggregation = fedmedian, fedtrimmedavg, krum, multikrum, bulyan)
    max_update_norm: float = 0.0
    norm_bound_mode: str = "reject"
    norm_bound_relative: float = 0.0
    example_weights: str = "claimed"
    max_examples_per_client: int = 0
    trim_beta: float = 0.2
    byzantine_clients: int = 0
    krum_keep: int = 0
    # attack harness for simulations (client/attacks.py): a seeded fraction of nodes corrupts its train replies
    attack: str = "none"
    attack_fraction: float = 0.3
    attack_scale: float = 10.0
    # user-level differential privacy (server/privacy.py, docs/trust.md): one of Flower's DP wrappers
    # around the global rule, Google's RDP accountant, and a budget after which a user is not sampled
    dp: str = "off"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 0.1
    dp_delta: float = 1e-5
    dp_user_budget: float = 0.0
    dp_target_quantile: float = 0.5
    dp_clip_norm_lr: float = 0.2
    dp_clipped_count_stddev: float = 0.0
    # secure aggregation (server/secure.py, client/secure.py, docs/trust.md): Flower's SecAgg+, the server
    # learns only the weighted average of a round's updates; the protocol's settings are Flower's
    secure_aggregation: bool = False
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederationConfig":
        """Build from Flower's run config, refusing unknown keys and bad values by name."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"Unknown run-config key {key!r}; known keys: {sorted(k.replace('_', '-') for k in fields)}")
            values[name] = _coerce(key, raw, type(fields[name].default))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Range and choice checks; raises ConfigError naming the key."""
        positive = ("num_server_rounds", "min_train_nodes", "lora_r", "lora_alpha", "local_steps", "batch_size",
                    "micro_batch_size",
                    "seq_len", "max_eval_blocks", "min_speeches", "node_wait_seconds", "round_timeout",
                    "learning_rate", "max_update_mb", "validate_every", "checkpoint_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_key(name)} must be > 0, got {getattr(self, name)!r}")
        for name, low, high in (("fraction_train", 0.0, 1.0), ("lora_dropout", 0.0, 0.99), ("test_fraction", 0.01, 0.99),
                                ("domain_mix", 0.0, 1.0), ("validation_fraction", 0.0, 0.5)):
            value, open_low = getattr(self, name), name in ("fraction_train", "domain_mix")
            if not low <= value <= high or (open_low and value == low):
                raise ConfigError(f"{_key(name)} must be in {'(' if open_low else '['}{low}, {high}], got {value!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_key(name)} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("personal_steps", "ditto_lambda", "proximal_mu", "server_learning_rate", "personal_learning_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key(name)} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.server_momentum < 1:  # FedAvgM: at 1 or above, past steps never fade
            raise ConfigError(f"server-momentum must be in [0, 1), got {self.server_momentum!r}")
        if self.min_available_nodes and self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(f"min-available-nodes ({self.min_available_nodes}) must be 0 or at least min-train-nodes "
                              f"({self.min_train_nodes}): a round cannot sample more nodes than it waits for")
        if self.resume_run < 0:
            raise ConfigError(f"resume-run must be a ledger run id (> 0) or 0 for a new run, got {self.resume_run}")
        if self.evaluate_every < 0:
            raise ConfigError(f"evaluate-every must be >= 0 (0: only after the last round), got {self.evaluate_every}")
        if not self.target_modules:
            raise ConfigError("lora-target-modules must name at least one module, e.g. 'q_proj,v_proj'")
        self._validate_defence()
        self._validate_rule_composition()
        self._validate_privacy()
        self._validate_codecs()
        self._validate_secure_aggregation()

    def _validate_codecs(self) -> None:
        """topk-fraction's range; refuse a lossy update codec where the exact update must reach the server or the sum."""
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError(f"topk-fraction must be in (0, 1], got {self.topk_fraction!r}")
        up = UpdateCodec(self.update_codec)
        if DpMode(self.dp).clips_on_device and up not in (UpdateCodec.FLOAT32, UpdateCodec.FLOAT16):
            raise ConfigError(f"dp = \"client-fixed\" with update-codec {self.update_codec!r}: the server rejects an "
                              "update over the clipping norm, and this code's error (or top-k's error feedback) can "
                              "carry a clipped update past it; use float32 or float16")
        if self.secure_aggregation and not self.codecs.plain:
            raise ConfigError("secure-aggregation with update-codec or downlink-codec other than float32: SecAgg+ "
                              "masks and sums the plain float32 adapters")

    def _validate_defence(self) -> None:
        """Ranges of the poisoning-defence and attack keys."""
        for name in ("max_update_norm", "norm_bound_relative", "max_examples_per_client", "byzantine_clients",
                     "krum_keep", "attack_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key(name)} must be >= 0 (0: off), got {getattr(self, name)!r}")
        if not 0.0 <= self.trim_beta < 0.5:  # Flower's FedTrimmedAvg cuts trim-beta of each tail
            raise ConfigError(f"trim-beta must be in [0, 0.5), got {self.trim_beta!r}")
        if not 0.0 <= self.attack_fraction <= 1.0:
            raise ConfigError(f"attack-fraction must be in [0, 1], got {self.attack_fraction!r}")
        if ExampleWeights(self.example_weights) is ExampleWeights.CAPPED and self.max_examples_per_client == 0:
            raise ConfigError("example-weights = \"capped\" needs max-examples-per-client > 0 (the cap on a client's weight)")

    def _validate_rule_composition(self) -> None:
        """Refuse a robust rule where it cannot do what it is chosen for (docs/trust.md says why)."""
        rule = Aggregation(self.aggregation)
        if self.byzantine_clients and not rule.selects_replies:
            raise ConfigError(f"byzantine-clients is read only by krum, multikrum and bulyan, not {self.aggregation!r}")
        if self.krum_keep and rule is not Aggregation.MULTIKRUM:
            raise ConfigError(f"krum-keep is read only by multikrum, not {self.aggregation!r}")
        if rule.selects_replies and METHODS[self.method].by_domain:
            raise ConfigError(f"aggregation {self.aggregation!r} picks replies within each aggregation group, and "
                              f"method {self.method!r} aggregates per domain: how many replies a domain's group gets "
                              "depends on who is sampled, so its minimum cannot be guaranteed; use fedmedian or "
                              "fedtrimmedavg, or a global method")
        if rule is Aggregation.BULYAN and self.byzantine_clients == 0:
            raise ConfigError("bulyan with byzantine-clients = 0 is the plain mean; set byzantine-clients >= 1")
        if rule is Aggregation.FEDTRIMMEDAVG and self.trim_beta == 0:
            raise ConfigError("fedtrimmedavg with trim-beta = 0 is the plain mean; set trim-beta in (0, 0.5)")
        needed = rule.min_replies(self.byzantine_clients, self.trim_beta)
        if self.min_train_nodes < needed:
            raise ConfigError(f"aggregation {self.aggregation!r} needs at least {needed} replies a round here "
                              f"(byzantine-clients {self.byzantine_clients}, trim-beta {self.trim_beta}); "
                              f"min-train-nodes is {self.min_train_nodes}")
        if self.krum_keep > self.min_train_nodes - self.byzantine_clients:
            raise ConfigError(f"krum-keep {self.krum_keep} would keep a byzantine client in a round of min-train-nodes "
                              f"({self.min_train_nodes}) replies; at most min-train-nodes - byzantine-clients")

    def _validate_privacy(self) -> None:
        """Ranges of the dp-* keys; with dp on, only the compositions where the noise protects each user."""
        for name in ("dp_noise_multiplier", "dp_user_budget", "dp_clipped_count_stddev"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key(name)} must be >= 0, got {getattr(self, name)!r}")
        for name in ("dp_clipping_norm", "dp_clip_norm_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_key(name)} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp-delta must be in (0, 1), got {self.dp_delta!r}")
        if not 0 <= self.dp_target_quantile <= 1:
            raise ConfigError(f"dp-target-quantile must be in [0, 1], got {self.dp_target_quantile!r}")
        mode = DpMode(self.dp)
        if not mode.on:
            if self.dp_user_budget:
                raise ConfigError("dp-user-budget needs dp on: with dp = \"off\" no epsilon is spent")
            return
        if self.checkpoint_every > 1:
            raise ConfigError(f"dp with checkpoint-every = {self.checkpoint_every}: a resumed run runs the rounds "
                              "since its last checkpoint again and the ledger forgets their releases, so the "
                              "epsilon it reports would be less than was spent; use checkpoint-every = 1")
        self._validate_private_composition()
        if mode.adaptive:
            self._validate_adaptive_noise()

    def _validate_private_composition(self) -> None:
        """Refuse, with the reason, a method, rule or weighting whose aggregate the noise would not cover."""
        method_ = METHODS[self.method]
        if not method_.sends_arrays:
            raise ConfigError(f"dp with method {self.method!r}: no update leaves the device, there is nothing to protect")
        if method_.by_domain:
            raise ConfigError(f"dp with method {self.method!r}: a per-domain method releases two aggregates of each "
                              "update a round (the global one and its domain's), and a domain's few replies would "
                              "need noise scaled to those few; use a global method (fedavg, fedavg-ft, dual, ditto, "
                              "fedsa, fedavg-knn, dual-knn)")
        if not Aggregation(self.aggregation).is_mean:
            raise ConfigError(f"dp with aggregation {self.aggregation!r}: the noise is scaled to one clipped update's "
                              "share of a mean (dp-clipping-norm / replies); a server optimizer transforms the mean "
                              "before the noise and a robust rule is no mean: use fedavg or fedprox")
        if ExampleWeights(self.example_weights) is not ExampleWeights.UNIFORM:
            raise ConfigError("dp needs example-weights = \"uniform\": in a weighted mean a user's weight can exceed "
                              "1 / replies, and their clipped update then moves the aggregate by more than the noise "
                              "is scaled to")
        if self.dp_user_budget and self.dp_noise_multiplier == 0:
            raise ConfigError("dp-user-budget with dp-noise-multiplier = 0: a round without noise spends an infinite "
                              "epsilon, so no user could take part at all")

    def _validate_adaptive_noise(self) -> None:
        """Flower's adaptive clipping takes part of the noise for the clipped count: it needs enough left over."""
        count_stddev = self.dp_clipped_count_stddev or self.min_train_nodes / 20  # Flower's default: replies / 20
        if self.dp_noise_multiplier >= 2 * count_stddev:
            raise ConfigError(f"dp = \"server-adaptive\" needs dp-noise-multiplier < 2 x dp-clipped-count-stddev "
                              f"({count_stddev:g}; 0 means min-train-nodes / 20): Flower splits the noise between the "
                              "update and the count of clipped updates (Andrew et al.); raise dp-clipped-count-stddev")

    def _validate_secure_aggregation(self) -> None:
        """Ranges of the secagg-* keys; with secure aggregation on, only what works on the sum alone (docs/trust.md)."""
        if self.secagg_num_shares < 3:  # Flower's SecAggPlusWorkflow: an integer number of shares must exceed 2
            raise ConfigError(f"secagg-num-shares must be >= 3, got {self.secagg_num_shares}")
        if not 2 <= self.secagg_reconstruction_threshold < self.secagg_num_shares:
            raise ConfigError(f"secagg-reconstruction-threshold must be in [2, secagg-num-shares), got "
                              f"{self.secagg_reconstruction_threshold} with secagg-num-shares {self.secagg_num_shares}")
        if not self.secagg_clipping_range > 0:
            raise ConfigError(f"secagg-clipping-range must be > 0, got {self.secagg_clipping_range!r}")
        if not 0 < self.secagg_quantization_range < SECAGG_MODULUS_RANGE:
            raise ConfigError(f"secagg-quantization-range must be in (0, {SECAGG_MODULUS_RANGE}) (Flower's modulus "
                              f"range), got {self.secagg_quantization_range}")
        if not self.secure_aggregation:
            return
        if refusals := self._secure_aggregation_refusals():
            raise ConfigError("secure-aggregation cannot be combined with: " + "; ".join(refusals))
        if self.min_train_nodes < 3:
            raise ConfigError(f"secure-aggregation needs min-train-nodes >= 3, got {self.min_train_nodes}: with two "
                              "clients each learns the other's update from the average (minus its own)")
        if self.secagg_reconstruction_threshold > self.min_train_nodes:
            raise ConfigError(f"secagg-reconstruction-threshold {self.secagg_reconstruction_threshold} is over "
                              f"min-train-nodes {self.min_train_nodes}: a round of that many clients could never "
                              "gather enough key shares")

    def _secure_aggregation_refusals(self) -> list[str]:
        """Why each asked-for feature cannot work when the server sees only the sum (empty: none)."""
        method_ = METHODS[self.method]
        refusals = []
        if not method_.sends_arrays:
            refusals.append(f"method {self.method!r} sends no update: there is nothing to aggregate")
        if method_.by_domain:
            refusals.append(f"method {self.method!r} aggregates per domain: it would need one SecAgg+ instance per "
                            "domain, and a domain with one or two clients in a round would reveal their updates; "
                            "use a global method")
        if not Aggregation(self.aggregation).is_mean:
            refusals.append(f"aggregation {self.aggregation!r}: a robust rule needs each client's update and a server "
                            "optimizer on the secure average is not built; use fedavg or fedprox")
        if self.max_update_norm or self.norm_bound_relative:
            refusals.append("max-update-norm and norm-bound-relative measure each update on the server, which never "
                            "sees one; a bound on the update belongs on the device")
        if ExampleWeights(self.example_weights) is ExampleWeights.CLAIMED:
            refusals.append("example-weights = \"claimed\" is unbounded, and SecAgg+ quantizes each weight as a "
                            "share of a maximum: use \"capped\" (max-examples-per-client is the maximum) or "
                            "\"uniform\"")
        if DpMode(self.dp).on:
            refusals.append("dp is not built on the secure path (its clipping, noise and accountant work on the "
                            "plain updates); turn one of them off")
        if self.resume_run:
            refusals.append("resume-run is not built on the secure path")
        return refusals

    @property
    def codecs(self) -> Codecs:
        """How adapters travel: ``update-codec`` up, ``downlink-codec`` down, with ``topk-fraction``."""
        return Codecs(UpdateCodec(self.update_codec), UpdateCodec(self.downlink_codec), self.topk_fraction)

    @property
    def available_nodes(self) -> int:
        """Nodes a round waits for before sampling (``min-available-nodes``, or ``min-train-nodes`` when 0)."""
        return self.min_available_nodes or self.min_train_nodes

    @property
    def personal_lr(self) -> float:
        """The personal adapter's learning rate (``personal-learning-rate``, or ``learning-rate`` when 0)."""
        return self.personal_learning_rate or self.learning_rate

    @property
    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    @property
    def excluded_plays(self) -> list[str]:
        """Plays kept out of the federation (e.g. the public text a compressed base was healed on)."""
        return [name.strip() for name in self.exclude_plays.split(",") if name.strip()]

    @property
    def evaluate_rounds(self) -> set[int]:
        """Rounds after which every node scores the global adapter; always the last one."""
        every = set(range(self.evaluate_every, self.num_server_rounds + 1, self.evaluate_every)) if self.evaluate_every else set()
        return every | {self.num_server_rounds}

    def as_run_config(self) -> dict[str, Any]:
        """The dash-keyed mapping Flower uses (for ``--run-config`` and the ledger)."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, raw: Any, kind: type) -> Any:
    """Flower gives TOML types; accept ints for floats, and numeric strings from node configs."""
    try:
        if kind is bool:
            # A typo such as "ture" must not quietly mean false.
            words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            if isinstance(raw, str) and raw.strip().lower() in words:
                return words[raw.strip().lower()]
            if isinstance(raw, (bool, int)) and raw in (0, 1):
                return bool(raw)
            raise ValueError("not a boolean (true or false)")
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError("not an integer")
            return int(raw)
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("not finite")
            return value
        return str(raw)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"Run-config key {key!r} expects {kind.__name__}, got {raw!r} ({error})") from error

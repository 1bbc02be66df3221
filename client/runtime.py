"""What a client process keeps between messages: the base with its adapter, and the user's data.

In simulation one Ray actor serves many virtual clients, and in deployment each message starts a
fresh process, so everything here is cached per process and keyed by what determines it. The model
lives on the device the ``device`` key names (shared/device.py); training and scoring follow it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

import torch
from peft import set_peft_model_state_dict

from client.personal import user_folder
from shared.adapters import adapter_state, attach_adapter, base_lora_config
from shared.base_model import BaseModelError, load_model, load_tokenizer, weights_hash
from shared.config import ConfigError, FederationConfig, fedgraft_home
from shared.device import resolve_device
from shared.methods import PERSONAL, SHARED
from shared.ranks import device_alpha
from shared.data import DataError, UserData, load_hf_user, load_jsonl_user, select_users, shakespeare_users
from shared.data.users import split_texts, user_seed
from shared.training import TokenBlocks, tokenize_blocks


@dataclass(frozen=True)
class AdapterSession:
    """The frozen base with a ``shared`` and a ``personal`` LoRA adapter, reused across messages.

    One process serves many users in simulation, so every message starts from ``initial`` (the
    seeded initial tensors of both adapters) before loading what belongs to its user.
    """

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    base_hash: str
    initial: dict[str, dict[str, torch.Tensor]]

    def reset(self) -> None:
        """Forget the previous user: both adapters back to their initial tensors."""
        for adapter, state in self.initial.items():
            set_peft_model_state_dict(self.model, state, adapter_name=adapter)

    def use(self, active: list[str], trainable: list[str]) -> None:
        """Make ``active`` adapters take part in the forward pass and only ``trainable`` ones learn."""
        self.model.base_model.set_adapter(active)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad = "lora_" in name and any(f".{adapter}." in name for adapter in trainable)

    def parameters_of(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        """The adapter's parameters keyed by name with the adapter name removed."""
        return {name.replace(f".{adapter}.", "."): parameter for name, parameter in self.model.named_parameters()
                if "lora_" in name and f".{adapter}." in name}


def device_config(config: FederationConfig, node_config: Mapping[str, Any]) -> FederationConfig:
    """The run config as this device applies it: its own copy of the base (node-config ``base-model``),
    its own ``device`` (node-config ``device``: auto, cpu, cuda) and the LoRA rank it can afford
    (node-config ``lora-r``, at most the run's; shared/ranks.py).

    The server names the base by its own path; a device downloaded it elsewhere. The content hash
    check in ``require_base`` guarantees both are the same weights. DeviceUnavailable when the
    device asks for CUDA and has none: checked here, before anything is loaded.
    """
    own: dict[str, Any] = {name: str(node_config[key]) for key, name in (("base-model", "base_model"), ("device", "device"))
                           if node_config.get(key)}
    if "lora-r" in node_config:
        own |= device_rank(config, node_config["lora-r"])
    if own:
        config = dataclasses.replace(config, **own)
        config.validate()
    resolve_device(config.device)
    return config


def device_rank(config: FederationConfig, declared: Any) -> dict[str, Any]:
    """The LoRA fields of a device at node-config ``lora-r``: its rank, and an alpha keeping the server's scaling."""
    whole = isinstance(declared, int) and not isinstance(declared, bool)
    rank = int(declared) if whole or str(declared).isdigit() else 0
    if not 0 < rank <= config.lora_r:
        raise ConfigError(f"node-config lora-r {declared!r} must be a whole number in [1, {config.lora_r}]: the server "
                          f"keeps the global adapter at the run's lora-r {config.lora_r}, and a device can train at "
                          "most that rank")
    if config.secure_aggregation and rank != config.lora_r:  # SecAgg+ sums equally long vectors: no padding inside it
        raise ConfigError(f"node-config lora-r {rank} with secure-aggregation: every device must train the run's "
                          f"lora-r {config.lora_r}, since SecAgg+ sums masked vectors of one length")
    return {"lora_r": rank, "lora_alpha": device_alpha(config.lora_alpha, rank, config.lora_r)}


@lru_cache(maxsize=1)
def adapter_session(config: FederationConfig) -> AdapterSession:
    # A fresh copy of the base per session: peft injects adapters into the model it wraps.
    base = load_model(config.base_model, config.base_dtype)
    if config.activation_checkpointing:
        base.activation_checkpointing_enable()  # non-reentrant
    tokenizer, base_hash = load_tokenizer(config.base_model), weights_hash(base)
    model = attach_adapter(base, base_lora_config(config), seed=config.seed, adapter_name=SHARED,
                           extra_adapters=(PERSONAL,))
    model.to(resolve_device(config.device))
    initial = {adapter: adapter_state(model, adapter) for adapter in (SHARED, PERSONAL)}  # on the CPU
    return AdapterSession(model, tokenizer, base_hash, initial)


def state_folder(node_config: Mapping[str, Any], config: FederationConfig, user: UserData) -> Path:
    """Where this user's private adapters live on the device."""
    root = node_config.get("state-dir") or config.state_dir
    root = Path(str(root)) if root else fedgraft_home() / "devices"
    return user_folder(root, user.user_id)


def require_base(announced_hash: str | None, local_hash: str) -> None:
    """Refuse to train on a base other than the one the server announced."""
    if not announced_hash:
        raise BaseModelError("the server did not announce a base-model hash; refusing to train blindly")
    if announced_hash != local_hash:
        raise BaseModelError(
            f"base model mismatch: the server announced {announced_hash[:12]}..., this device has "
            f"{local_hash[:12]}...; download the announced base before joining this run"
        )


@lru_cache(maxsize=4)
def _federation_users(config: FederationConfig, count: int) -> tuple[UserData, ...]:
    users = shakespeare_users(min_speeches=config.min_speeches, split=config.split, test_fraction=config.test_fraction,
                              seed=config.seed, exclude_plays=config.excluded_plays)
    return tuple(select_users(users, count, seed=config.seed))


# The node-config keys that name where a node's user comes from; a node names exactly one.
DATA_SOURCES = ("data-path", "hf-dataset", "user", "num-partitions")


def user_for_node(node_config: Mapping[str, Any], config: FederationConfig) -> UserData:
    """This node's user: its own JSONL file, a hub dataset's partition, a Shakespeare character, or a simulation partition."""
    named = [key for key in DATA_SOURCES if key in node_config]
    if len(named) > 1:
        raise ConfigError(f"node-config names {len(named)} data sources ({', '.join(named)}); a node has exactly one")
    if "data-path" in node_config:
        return load_jsonl_user(str(node_config["data-path"]), user_id=node_config.get("user-id") or None,
                               domain=node_config.get("domain") or None, split=config.split,
                               test_fraction=config.test_fraction, seed=config.seed)
    if "hf-dataset" in node_config:
        return _hub_user(node_config, config)
    if "user" in node_config:
        wanted = str(node_config["user"])
        users = shakespeare_users(min_speeches=2, split=config.split, test_fraction=config.test_fraction, seed=config.seed)
        for user in users:
            if user.user_id == wanted:
                return user
        raise ConfigError(f"node-config user {wanted!r} is not a Shakespeare character (form: 'macbeth/LADY MACBETH')")
    if "partition-id" in node_config and "num-partitions" in node_config:
        partition, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
        return _federation_users(config, count)[partition]
    raise ConfigError("node-config needs 'data-path' (a JSONL file), 'hf-dataset' with 'partition-id' (a hub dataset), "
                      "'user' (a Shakespeare character) or 'partition-id' and 'num-partitions'")


def _hub_user(node_config: Mapping[str, Any], config: FederationConfig) -> UserData:
    """User ``partition-id`` of a hub dataset cut by Flower Datasets' NaturalIdPartitioner (the hub or its cache)."""
    dataset = str(node_config["hf-dataset"])
    try:
        return load_hf_user(dataset, int(node_config.get("partition-id", 0)),
                            partition_by=str(node_config.get("hf-partition-by", "user")),
                            text_field=str(node_config.get("hf-text-field", "text")),
                            domain_field=node_config.get("hf-domain-field") or None, split=config.split,
                            test_fraction=config.test_fraction, seed=config.seed)
    except ConnectionError as error:  # what `datasets` raises when neither the hub nor a cached copy answers
        raise DataError(f"node-config hf-dataset {dataset!r}: the Hugging Face Hub is not reachable from this device "
                        f"and no copy is cached ({error}); connect it once, or bring the data as JSONL "
                        "(node-config data-path)") from error


_blocks_cache: dict[tuple[str, int, int], tuple[TokenBlocks, TokenBlocks]] = {}


def scored_texts(user: UserData, config: FederationConfig) -> tuple[list[str], list[str]]:
    """(texts to train on, texts to score on) under ``score-split``.

    ``validation`` splits the user's training texts again (same mode and fraction as ``split``, a seed of
    its own) so that hyper-parameters are chosen without the test texts ever being read.
    """
    if config.score_split == "test":
        return user.train, user.test
    if len(user.train) < 2:
        raise DataError(f"user {user.user_id!r} has {len(user.train)} training text(s); score-split='validation' "
                        "needs at least 2 to set some aside")
    return split_texts(user.train, config.test_fraction, config.split, user_seed(config.seed + 1, user.user_id))


def user_blocks(user: UserData, tokenizer: PreTrainedTokenizerBase, config: FederationConfig) -> tuple[TokenBlocks, TokenBlocks]:
    """(training blocks, held-out blocks) of a user, the held-out ones capped at max-eval-blocks.

    Held out means the test texts, or with ``score-split = "validation"`` part of the training texts.
    """
    key = (user.user_id, id(tokenizer), hash(config))
    if key not in _blocks_cache:
        train_texts, scored = scored_texts(user, config)
        train = tokenize_blocks(tokenizer, train_texts, config.seq_len)
        test = tokenize_blocks(tokenizer, scored, config.seq_len)
        if len(test) > config.max_eval_blocks:
            test = test.select(list(range(config.max_eval_blocks)))
        _blocks_cache[key] = (train, test)
    return _blocks_cache[key]

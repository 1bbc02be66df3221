"""Simulated Byzantine clients: a Flower client mod that corrupts the train replies of a seeded fraction of nodes.

For measuring a defence (docs/trust.md), not for deployment: run config ``attack`` picks what the
attackers do to their honest reply, ``attack-fraction`` how many nodes attack and ``attack-scale``
how hard. With ``attack = "none"`` (the default) the mod passes every message straight through.

| attack             | the reply's shared tensors / num-examples                                    |
|--------------------|------------------------------------------------------------------------------|
| `scale`            | received + s * (update - received)                                           |
| `sign-flip`        | received - s * (update - received)                                           |
| `gaussian`         | received + Gaussian noise of standard deviation s * the update's RMS change  |
| `inflate-examples` | tensors untouched; num-examples * s                                          |

s is ``attack-scale``; "received" is what the server sent the node this round. Which nodes attack is
seeded by run-config ``seed``: in simulation exactly round(fraction * num-partitions) partitions, in
a deployment each node by a draw on its node id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from shared.config import FederationConfig


def attacking_partitions(num_partitions: int, fraction: float, seed: int) -> set[int]:
    """The partitions that attack: a seeded choice of round(fraction * num_partitions) of them (halves round up)."""
    count = min(num_partitions, math.floor(fraction * num_partitions + 0.5))
    order = np.random.default_rng([seed, num_partitions]).permutation(num_partitions)
    return {int(partition) for partition in order[:count]}


def is_attacker(node_config: Mapping[str, object], node_id: int, fraction: float, seed: int) -> bool:
    """Whether this node attacks: by partition in simulation, by a seeded draw on its node id elsewhere."""
    if "partition-id" in node_config and "num-partitions" in node_config:
        partitions = attacking_partitions(int(node_config["num-partitions"]), fraction, seed)
        return int(node_config["partition-id"]) in partitions
    return bool(np.random.default_rng([seed, node_id]).random() < fraction)


def corrupt(received: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], attack: str, scale: float,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The attacker's tensors from its honest ``update`` of ``received`` (see the module's table); dtypes kept."""
    deltas = {key: np.asarray(value, np.float64) - np.asarray(received[key], np.float64) for key, value in update.items()}
    if attack == "scale":
        deltas = {key: scale * delta for key, delta in deltas.items()}
    elif attack == "sign-flip":
        deltas = {key: -scale * delta for key, delta in deltas.items()}
    elif attack == "gaussian":
        size = sum(delta.size for delta in deltas.values())
        rms = math.sqrt(sum(float(np.vdot(delta, delta)) for delta in deltas.values()) / size) if size else 0.0
        deltas = {key: rng.normal(0.0, scale * rms, delta.shape) for key, delta in deltas.items()}
    else:
        raise ValueError(f"attack {attack!r} does not change tensors")
    return {key: (np.asarray(received[key], np.float64) + delta).astype(update[key].dtype) for key, delta in deltas.items()}


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: an attacking node's train reply is corrupted as run config ``attack`` says."""
    is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN  # "train" or "train.<action>"
    if context.run_config.get("attack", "none") == "none" or not is_train:
        return call_next(msg, context)
    config = FederationConfig.from_run_config(context.run_config)
    if not is_attacker(context.node_config, context.node_id, config.attack_fraction, config.seed):
        return call_next(msg, context)
    received = {key: array.numpy() for key, array in msg.content["arrays"].items()}  # before training can touch it
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if config.attack == "inflate-examples":
        metrics = reply.content["metrics"]
        metrics["num-examples"] = int(metrics["num-examples"] * config.attack_scale)
        return reply
    update = {key: array.numpy() for key, array in reply.content["arrays"].items()}
    round_ = int(msg.content["config"].get("server-round", 0))
    rng = np.random.default_rng([config.seed, context.node_id, round_])
    corrupted = corrupt(received, update, config.attack, config.attack_scale, rng)
    reply.content["arrays"] = ArrayRecord({key: Array(value) for key, value in corrupted.items()})
    return reply

"""Coded payloads on the device: a Flower client mod that decodes what the server sends and encodes the reply.

Run config ``downlink-codec`` and ``update-codec`` (shared/codec.py, docs/communication.md). The mod
sits outside the attack harness and Flower's ``fixedclipping_mod``: they and the train function
still see float32 adapters, and only what crosses the wire is coded. Under a lossy
``update-codec`` the reply carries the shared adapter's change from what the device decoded.

Top-k's error feedback keeps its residual on the device, in the user's state folder (client/personal.py)::

    <state-dir>/<user>/residual.safetensors   what earlier codes dropped, tagged with base hash and codec

so it survives a restart; a residual saved under another base, codec or fraction is not used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from safetensors import safe_open
from safetensors.numpy import save_file

from client.runtime import adapter_session, device_config, state_folder, user_for_node
from shared.adapters import expected_shapes
from shared.codec import Codecs, ErrorFeedback, decode, encode, wire_key
from shared.config import FederationConfig
from shared.methods import SHARED, method
from shared.ranks import rank_axis, shapes_at_rank, truncate, truncate_record

RESIDUAL = "residual.safetensors"


def residual_tags(codecs: Codecs, base_hash: str) -> dict[str, str]:
    """What a saved residual must match to be used: the base, the codec and its fraction."""
    return {"base-hash": base_hash, "update-codec": codecs.up.value, "topk-fraction": repr(codecs.topk_fraction)}


def load_residual(folder: Path, tags: dict[str, str]) -> dict[str, np.ndarray]:
    """The residual saved in ``folder`` under these ``tags``; empty when there is none (or another run's)."""
    path = folder / RESIDUAL
    if not path.is_file():
        return {}
    with safe_open(path, framework="np") as saved:
        if saved.metadata() != tags:
            return {}
        return {key: saved.get_tensor(key) for key in saved.keys()}


def save_residual(folder: Path, residual: dict[str, np.ndarray], tags: dict[str, str]) -> None:
    """Write the residual atomically: a crash mid-write leaves the previous one."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{RESIDUAL}.partial"
    save_file({key: np.ascontiguousarray(value) for key, value in residual.items()}, partial, metadata=tags)
    os.replace(partial, folder / RESIDUAL)


def codec_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: decode the incoming adapter, and encode a train reply's (with error feedback for top-k)."""
    config = device_config(FederationConfig.from_run_config(context.run_config), context.node_config)
    if config.codecs.plain or "arrays" not in msg.content.array_records:
        return call_next(msg, context)
    msg, received = _decoded(msg, config)
    reply = call_next(msg, context)
    is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN  # "train" or "train.<action>"
    if is_train and not reply.has_error() and not config.codecs.up.lossless:
        returned = {key: array.numpy() for key, array in reply.content["arrays"].items()}
        change = {key: np.asarray(value, np.float32) - received[key] for key, value in returned.items()}
        reply.content["arrays"] = _encoded(change, config, context, str(msg.content["config"].get("base-hash", "")))
    return reply


def _decoded(msg: Message, config: FederationConfig) -> tuple[Message, dict[str, np.ndarray]]:
    """The message the inner mods see (its adapter decoded, in a new message) and that adapter's tensors."""
    if config.codecs.down.lossless:  # the adapter itself: the train function checks it (and cuts it to its rank)
        return msg, {key: array.numpy() for key, array in truncate_record(msg.content["arrays"], config.lora_r).items()}
    shapes = expected_shapes(adapter_session(config).model, SHARED, keep=method(config.method).shared_key)
    received = truncate(decode(msg.content["arrays"], shapes_at_rank(shapes, _sent_rank(msg.content["arrays"], shapes, config)),
                               config.codecs.down), config.lora_r)
    content = RecordDict(dict(msg.content.items()))  # what arrived stays as it came
    content["arrays"] = ArrayRecord({key: Array(value) for key, value in received.items()})
    return Message(metadata=msg.metadata, content=content), received


def _sent_rank(arrays: ArrayRecord, shapes: dict[str, tuple[int, ...]], config: FederationConfig) -> int:
    """The rank of the coded adapter that arrived: this device's, or the run's before the server knows the device's.

    Read from a LoRA matrix's declared shape only; decoding then checks every array against it.
    """
    first = config.codecs.down.parts[0]  # a downlink code's first array has its tensor's shape
    for key in shapes:
        axis, name = rank_axis(key), wire_key(key, first)
        if axis is not None and name in arrays.keys() and len(arrays[name].shape) == 2:
            return int(arrays[name].shape[axis])
    return config.lora_r


def _encoded(change: dict[str, np.ndarray], config: FederationConfig, context: Context, base_hash: str) -> ArrayRecord:
    """The change as ``update-codec`` sends it; top-k adds the saved residual first and saves the new one."""
    codecs = config.codecs
    if not codecs.up.sparse:
        return encode(change, codecs.up, codecs.topk_fraction)
    folder = state_folder(context.node_config, config, user_for_node(context.node_config, config))
    tags = residual_tags(codecs, base_hash)
    feedback = ErrorFeedback(load_residual(folder, tags))
    payload = feedback.encode(change, codecs.up, codecs.topk_fraction)
    if feedback.residual:  # a method that shares nothing has none
        save_residual(folder, feedback.residual, tags)
    return payload

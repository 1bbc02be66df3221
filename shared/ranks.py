"""Heterogeneous LoRA ranks: each device trains the rank it can afford, the server keeps the run's.

The server's adapter has the run's rank R (run config ``lora-r``); a device may declare a lower rank
r (node config ``lora-r``; above R is refused). This follows HetLoRA (Cho et al., 2024,
"Heterogeneous LoRA for federated fine-tuning of on-device foundation models",
https://arxiv.org/abs/2401.06432):

- **truncation**: a rank-r device works with the first r rank components of the global adapter, the
  first r rows of each ``lora_A`` and the first r columns of each ``lora_B`` (``truncate``);
- **zero-padding**: its reply is padded back to rank R (``pad``); the server pads with what it sent,
  so the components the device never had show no change;
- **aggregation, per-slice average**: rank component k of the new adapter is the weighted average
  over the devices that have component k only, their weights normalised over those devices
  (``fill_missing``). HetLoRA's own rule, sparsity-weighted aggregation, averages the padded
  updates over every device with weights proportional to each update's norm: a component only the
  rank-8 devices train is then pulled towards "no change" by every rank-2 device each round, and a
  device buys weight by sending a large update, which the poisoning defence's example-weight policy
  exists to prevent (docs/trust.md). The per-slice average keeps each component the weighted
  average of those that trained it and leaves the weights to that policy. HetLoRA's rank
  self-pruning is not done: a device keeps the rank it declares.

``fill_missing`` writes that average into each reply's components it lacks, so any of Flower's rules
aggregating the filled replies by their weights gives exactly the per-slice average (FedAvg), or
steps from it (FedAdam, FedAvgM ...): aggregation stays Flower's.

peft scales B A by ``lora_alpha / r``. A rank-r device uses ``lora_alpha x r / R``
(``device_alpha``), so its scaling is the server's ``lora_alpha / R`` and its truncated adapter's
B A x scaling is exactly the server's adapter restricted to those r components.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

# (marker in a peft state-dict key, the axis that holds the rank): A is (r, in), B is (out, r)
RANK_AXES = ((".lora_A.", 0), (".lora_B.", 1), (".lora_embedding_A", 0), (".lora_embedding_B", 1))


def rank_axis(key: str) -> int | None:
    """The axis of this adapter tensor that has one entry per rank component; None for a tensor without one."""
    for marker, axis in RANK_AXES:
        if marker in key:
            return axis
    return None


def adapter_rank(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The rank of an adapter given its tensors' shapes; None when it has no LoRA matrix.

    ValueError when its matrices disagree (no single rank).
    """
    ranks = {tuple(shape)[axis] for key, shape in shapes.items() if (axis := rank_axis(key)) is not None}
    if len(ranks) > 1:
        raise ValueError(f"the adapter's LoRA matrices have different ranks: {sorted(ranks)}")
    return ranks.pop() if ranks else None


def shapes_at_rank(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes the same adapter has at ``rank``."""
    result = {}
    for key, shape in shapes.items():
        shape, axis = list(shape), rank_axis(key)
        if axis is not None:
            shape[axis] = rank
        result[key] = tuple(shape)
    return result


def truncate(tensors: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` components of each LoRA matrix (a copy); other tensors as they are.

    ValueError when a matrix has fewer than ``rank`` components.
    """
    result = {}
    for key, value in tensors.items():
        value, axis = np.asarray(value), rank_axis(key)
        if axis is not None:
            if value.shape[axis] < rank:
                raise ValueError(f"{key}: rank {value.shape[axis]}, below the {rank} asked for")
            value = value[:rank] if axis == 0 else value[:, :rank]
        result[key] = np.ascontiguousarray(value)
    return result


def truncate_record(arrays: ArrayRecord, rank: int) -> ArrayRecord:
    """A received adapter cut to ``rank`` where its LoRA matrices have more components; the rest as it came.

    Only well-formed matrices (two axes, more than ``rank`` components) are cut, by their declared
    shape: anything else is left for the strict check that follows to refuse.
    """
    result = ArrayRecord()
    for key, array in arrays.items():
        axis = rank_axis(key)
        if axis is not None and len(array.shape) == 2 and array.shape[axis] > rank:
            array = Array(truncate({key: array.numpy()}, rank)[key])
        result[key] = array
    return result


def pad(tensors: Mapping[str, np.ndarray], full: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Low-rank ``tensors`` back at ``full``'s rank: their components first, then ``full``'s own beyond them."""
    result = {}
    for key, value in full.items():
        padded = np.array(value, dtype=np.float32, copy=True)
        low, axis = np.asarray(tensors[key], np.float32), rank_axis(key)
        if axis is None:
            padded = low.copy()
        elif axis == 0:
            padded[:low.shape[0]] = low
        else:
            padded[:, :low.shape[1]] = low
        result[key] = padded
    return result


def rank_mask(key: str, shape: tuple[int, ...], rank: int) -> np.ndarray:
    """True where a rank-``rank`` device has the entry of a full-rank tensor ``key`` of ``shape``."""
    axis = rank_axis(key)
    mask = np.ones(shape, dtype=bool)
    if axis == 0:
        mask[rank:] = False
    elif axis == 1:
        mask[:, rank:] = False
    return mask


def fill_missing(replies: Sequence[Mapping[str, np.ndarray]], ranks: Sequence[int], weights: Sequence[float],
                 current: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each full-rank (padded) reply with the components its device lacks set to the per-slice average.

    Component k's average is over the replies whose rank is above k, weighted by ``weights``
    normalised over those replies; a component no reply has keeps ``current``'s value. Averaging
    the filled replies by ``weights`` then gives, for every component, exactly that per-slice average.
    """
    filled: list[dict[str, np.ndarray]] = [dict(reply) for reply in replies]
    for key, now in current.items():
        shape = np.shape(now)
        masks = [rank_mask(key, shape, rank) for rank in ranks]
        have = sum(weight * mask for weight, mask in zip(weights, masks, strict=True))
        total = sum(weight * mask * np.asarray(reply[key], np.float64)
                    for weight, mask, reply in zip(weights, masks, replies, strict=True))
        with np.errstate(invalid="ignore", divide="ignore"):
            average = np.where(have > 0, total / np.where(have > 0, have, 1), np.asarray(now, np.float64))
        for reply, mask in zip(filled, masks, strict=True):
            reply[key] = np.where(mask, reply[key], average).astype(np.float32)
    return filled


def device_alpha(lora_alpha: float, rank: int, full_rank: int) -> float:
    """The ``lora_alpha`` a rank-``rank`` device uses so that peft's alpha / r equals the server's alpha / R."""
    return lora_alpha * rank / full_rank

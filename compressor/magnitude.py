"""Unstructured magnitude pruning: zero the smallest weights and keep them zero through healing.

The zeros live in dense tensors: memory and disk are unchanged (``measure.sparse_nbytes`` estimates
what a sparse format would store). The masks are returned so that healing can re-apply them after
every optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from compressor.layers import block_linear, decoder_layers
from compressor.lowrank import LowRankLinear
from compressor.recipe import PRUNE_SCOPES, RecipeError

Masks = list[tuple[nn.Parameter, torch.Tensor]]


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, modules: Sequence[str], scope: str) -> Masks:
    """Zero the smallest-|w| weights of the named projections in place; return (weight, keep mask) pairs.

    ``scope``: "global" ranks all targeted weights together (projections that matter less lose more),
    "layer" prunes each weight matrix to ``sparsity`` separately. A weight shared by several blocks is
    ranked and masked once.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"Unknown pruning scope {scope!r}; choose one of {PRUNE_SCOPES}")
    weights: dict[int, nn.Parameter] = {}
    for layer in decoder_layers(model):
        for name in modules:
            linear = block_linear(layer, name)
            if isinstance(linear, LowRankLinear):
                raise RecipeError(f"magnitude.modules: {name} is factorized by lowrank; prune other projections")
            weights.setdefault(id(linear.weight), linear.weight)
    params = list(weights.values())
    if scope == "global":
        magnitudes = torch.cat([p.detach().abs().flatten().float() for p in params])
        count = int(sparsity * magnitudes.numel())
        threshold = torch.kthvalue(magnitudes, count).values if count else None
        masks = [(p.detach().abs().float() > threshold) if threshold is not None else torch.ones_like(p, dtype=torch.bool)
                 for p in params]
    else:
        masks = []
        for p in params:
            flat = p.detach().abs().flatten().float()
            count = int(sparsity * flat.numel())
            masks.append(p.detach().abs().float() > torch.kthvalue(flat, count).values if count
                         else torch.ones_like(p, dtype=torch.bool))
    for p, mask in zip(params, masks):
        p.mul_(mask)
    return list(zip(params, masks))


def apply_masks(masks: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Zero again what the masks pruned (after an optimizer step moved it)."""
    with torch.no_grad():
        for param, mask in masks:
            param.mul_(mask)


def linear_sparsity(model: nn.Module, modules: Sequence[str]) -> float:
    """The share of zeros among the named projections' weights (each shared tensor once)."""
    seen: dict[int, torch.Tensor] = {}
    for layer in decoder_layers(model):
        for name in modules:
            linear = block_linear(layer, name)
            if hasattr(linear, "weight"):
                seen.setdefault(id(linear.weight), linear.weight)
    total = sum(p.numel() for p in seen.values())
    return sum(int((p == 0).sum()) for p in seen.values()) / max(total, 1)

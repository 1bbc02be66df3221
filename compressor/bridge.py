"""The layer bridge: a linear map across each run of dropped blocks, folded into the block before it.

Dropping blocks leaves a kept block reading an earlier block's output where it used to read its
predecessor's. A least-squares map fitted on calibration text brings the earlier output close to what
the full model gave, and folded into a weight the model stays a plain Llama (the idea of ReplaceMe,
Shopkhoev et al. 2025). What it buys is measured in docs/compression.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from compressor.layers import decoder_layers


@torch.no_grad()
def bridge_gaps(model: PreTrainedModel, keep_indices: Sequence[int], calibration: torch.Tensor,
                ridge: float = 1e-3) -> list[dict[str, Any]]:
    """Fit, across each run of blocks about to be dropped, a linear map folded into the block before it.

    For kept blocks a < b with the blocks between them dropped, block b will read block a's output
    ``h_mid + m`` (m the MLP's output) where the full model gave it ``y``, the output of block b - 1.
    A least-squares T (hidden x hidden, ridge-regularised) with ``h_mid + m T ~= y`` on the
    calibration tokens is folded into block a's ``down_proj`` (W <- T^T W). Call on the full model,
    before ``drop_layers``. Returns per gap the relative residual before/after.
    """
    layers = decoder_layers(model)
    gaps = [(a, b) for a, b in zip(keep_indices, keep_indices[1:]) if b > a + 1]
    if not gaps:
        return []
    outputs: dict[int, list[torch.Tensor]] = {a: [] for a, _ in gaps}
    handles = [layers[a].mlp.register_forward_hook(lambda module, args, out, a=a: outputs[a].append(out[:, 1:].detach()))
               for a, _ in gaps]
    hidden: dict[int, list[torch.Tensor]] = {i: [] for a, b in gaps for i in (a + 1, b)}
    try:
        for batch in calibration.split(8):
            states = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
            for i in hidden:  # the first position (an attention sink, with outsized activations) is left out
                hidden[i].append(states[i][:, 1:].detach())
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for a, b in gaps:
        mlp_out = torch.cat(outputs[a]).flatten(0, 1).double()
        block_out = torch.cat(hidden[a + 1]).flatten(0, 1).double()
        target = torch.cat(hidden[b]).flatten(0, 1).double()
        residual = target - (block_out - mlp_out)
        gram = mlp_out.T @ mlp_out
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        transform = torch.linalg.solve(gram, mlp_out.T @ residual)
        down = layers[a].mlp.down_proj.weight
        down.copy_((transform.T @ down.double()).to(down.dtype))
        after = residual - mlp_out @ transform
        results.append({"after_block": a, "before_block": b,
                        "relative_error_before": round(((target - block_out).norm() / target.norm()).item(), 4),
                        "relative_error_after": round((after.norm() / target.norm()).item(), 4)})
    return results

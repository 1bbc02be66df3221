"""Low-rank factorization of linear layers by truncated SVD: W (out x in) ~= B (out x r) @ A (r x in).

In memory a factorized projection is a ``LowRankLinear`` holding A and B: r * (in + out) parameters and
multiply-adds per token instead of in * out. That saves something only when r < in * out / (in + out),
e.g. r < 419 for SmolLM2's 576 x 1536 MLP projections.

On disk, decided trade-off: a ``LowRankLinear`` writes the *dense product* B @ A under the ``nn.Linear``
names (``weight``, ``bias``). A Llama config has no way to say "this projection is factored", and any
factored on-disk layout would need custom model code (``trust_remote_code`` or a registered class),
which plain ``AutoModelForCausalLM.from_pretrained`` does not have. (An ``nn.Sequential`` would be
worse: its keys, ``gate_proj.0.weight``, are unknown to a Llama and would be silently re-initialised.)
So:

- ``save_pretrained`` writes a standard Llama checkpoint of the *same size as the original*;
  plain ``from_pretrained`` loads it as dense layers computing the same function (up to rounding).
  Low rank therefore saves memory and compute, never disk; report it that way.
- ``factorize_model(loaded, rank=r)`` on the reloaded model recovers the factors: the saved weight
  has rank <= r, so its rank-r SVD reproduces it.
- peft cannot put LoRA on a ``LowRankLinear``; target other projections, or replace it by ``densify_linear``.
- Factorize after head/neuron pruning, which edits ``nn.Linear`` weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from compressor.layers import MLP_LINEARS, block_linear, decoder_layers, linear_path


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total sum of squares."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    kept = torch.cumsum(singular_values.double() ** 2, 0) / (singular_values.double() ** 2).sum()
    # The tolerance keeps energy=1.0 from asking for one more value than exists through rounding.
    return min(int((kept < energy - 1e-9).sum().item()) + 1, len(singular_values))


def svd_factors(
    weight: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-r approximation of ``weight``; r from ``rank`` or ``energy``.

    The singular values are split evenly (sqrt into each factor) so both factors have the same scale,
    which keeps gradients balanced if the factors are trained.
    """
    if (rank is None) == (energy is None):
        raise ValueError("Give exactly one of rank or energy")
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    rank = rank_for_energy(s, energy) if rank is None else rank
    if not 1 <= rank <= len(s):
        raise ValueError(f"rank must be between 1 and {len(s)}, got {rank}")
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


class LowRankLinear(nn.Module):
    """y = (x A^T) B^T + bias: a rank-limited ``nn.Linear`` whose state dict is the dense ``weight``."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.first = nn.Parameter(first)  # A: (rank, in_features)
        self.second = nn.Parameter(second)  # B: (out_features, rank)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.rank, self.in_features = first.shape
        self.out_features = second.shape[0]
        # Standard names on disk (see module docstring); public torch hooks, no private overrides.
        self.register_state_dict_post_hook(_save_dense)
        self.register_load_state_dict_pre_hook(_load_dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.first), self.second, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this layer multiplies by."""
        return self.second @ self.first

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _save_dense(module: LowRankLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    del state_dict[prefix + "first"], state_dict[prefix + "second"]
    state_dict[prefix + "weight"] = module.dense_weight().detach()


def _load_dense(module: LowRankLinear, state_dict: dict, prefix: str, *args) -> None:
    """Accept a dense ``weight`` (as saved) by re-factorizing it at this layer's rank."""
    if prefix + "weight" in state_dict:
        weight = state_dict.pop(prefix + "weight")
        state_dict[prefix + "first"], state_dict[prefix + "second"] = svd_factors(weight, rank=module.rank)


def factorize_linear(linear: nn.Linear, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
    """A ``LowRankLinear`` approximating ``linear`` (same dtype, device and requires_grad)."""
    first, second = svd_factors(linear.weight, rank=rank, energy=energy)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    factored = LowRankLinear(first, second, bias)
    return factored.requires_grad_(linear.weight.requires_grad)


def factorize_model(
    model: nn.Module,
    modules: Sequence[str] = MLP_LINEARS,
    rank: int | None = None,
    energy: float | None = None,
) -> nn.Module:
    """Replace the named projections of every block by truncated-SVD ``LowRankLinear`` layers, in place.

    With ``energy`` each matrix gets its own rank. Factorizing a ``LowRankLinear`` again re-truncates it.
    """
    for layer in decoder_layers(model):
        for name in modules:
            linear = block_linear(layer, name)
            if isinstance(linear, LowRankLinear):
                linear = densify_linear(linear)
            layer.set_submodule(linear_path(name), factorize_linear(linear, rank=rank, energy=energy))
    return model


def densify_linear(factored: LowRankLinear) -> nn.Linear:
    """The ``nn.Linear`` computing the same function as ``factored``."""
    first = factored.first
    linear = nn.Linear(factored.in_features, factored.out_features, bias=factored.bias is not None)
    linear.to(device=first.device, dtype=first.dtype)
    with torch.no_grad():
        linear.weight.copy_(factored.dense_weight())
        if factored.bias is not None:
            linear.bias.copy_(factored.bias)
    return linear.requires_grad_(first.requires_grad)

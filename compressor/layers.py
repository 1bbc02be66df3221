"""Structural compression of a Llama-architecture model: fewer blocks, KV heads or MLP neurons.

Every function here edits a ``LlamaForCausalLM`` in place and keeps it a standard transformers model:
shapes are changed by swapping tensors, never module classes, and the config is updated so that
``save_pretrained`` followed by a plain ``AutoModelForCausalLM.from_pretrained`` rebuilds the same model.
Apply them to the base model *before* adding LoRA adapters.

- ``select_layers`` / ``drop_layers``: remove whole decoder blocks (the cheapest large saving).
- ``prune_heads``: remove whole KV groups (a key/value head and the query heads that read it).
- ``prune_mlp_neurons``: remove intermediate neurons of the gated MLP.

Unstructured (magnitude) pruning is in ``compressor.magnitude``. How each choice of blocks, heads and
neurons measured on the default teacher is in docs/compression.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama",)
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION_LINEARS + MLP_LINEARS
LAYER_SELECTIONS = ("ends", "even", "first", "importance")


class UnsupportedModelError(ValueError):
    """The model is not a Llama-architecture causal LM that these functions know how to edit."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-architecture causal LM, or a clear error for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # A peft wrapper forwards `config` to the base, so check the class too.
    if not isinstance(model, PreTrainedModel) or model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"Compression supports Llama-architecture causal LMs (model_type in {SUPPORTED_MODEL_TYPES}); "
            f"got {type(model).__name__} with model_type {model_type!r}. Apply it to the base model, "
            "before wrapping it with peft."
        )
    return model.model.layers


def linear_path(name: str) -> str:
    """Where a projection named e.g. "q_proj" or "down_proj" lives inside a decoder block."""
    if name not in LINEAR_NAMES:
        raise ValueError(f"Unknown projection {name!r}; choose from {LINEAR_NAMES}")
    return ("self_attn." if name in ATTENTION_LINEARS else "mlp.") + name


def block_linear(layer: nn.Module, name: str) -> nn.Module:
    """A decoder block's projection by its short name, e.g. "q_proj" or "down_proj"."""
    return layer.get_submodule(linear_path(name))


# --- Choosing and dropping whole blocks -------------------------------------------------------------


def select_layers(
    num_layers: int, keep: int, how: str = "ends", scores: Sequence[float] | None = None
) -> list[int]:
    """Indices of the ``keep`` blocks to keep, in order.

    ``how``: "ends" keeps the first ceil(keep/2) and last floor(keep/2) blocks; "even" spaces them
    evenly, first and last included; "first" keeps a prefix; "importance" keeps the ``keep`` highest
    ``scores`` (see ``layer_importance``).
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be between 1 and {num_layers}, got {keep}")
    if how == "ends":
        head = math.ceil(keep / 2)
        return list(range(head)) + list(range(num_layers - (keep - head), num_layers))
    if how == "even":
        if keep == 1:
            return [0]
        step = (num_layers - 1) / (keep - 1)
        return [math.floor(i * step + 0.5) for i in range(keep)]  # round half up, unlike round()
    if how == "first":
        return list(range(keep))
    if how == "importance":
        if scores is None or len(scores) != num_layers:
            raise ValueError("how='importance' needs one score per layer (see layer_importance)")
        return select_layers_by_importance(scores, keep)
    raise ValueError(f"Unknown layer selection {how!r}; choose one of {LAYER_SELECTIONS}")


def select_layers_by_importance(scores: Sequence[float], keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, in layer order (ties go to the earlier layer)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Per block, 1 - mean cosine similarity between the block's input and output hidden states.

    This is ShortGPT's "block influence": a block whose output points the same way as its input only
    rescales the residual stream and is the cheapest to remove (score near 0). The mean is over every
    token of ``batches`` (input id tensors of shape (batch, length), without padding).
    """
    layers = decoder_layers(model)
    totals = [0.0] * len(layers)

    def recorder(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            similarity = nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            totals[index] += (1 - similarity).sum().item()

        return hook

    handles = [layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = _run_hooked(model, handles, batches)
    if tokens == 0:
        raise ValueError("layer_importance needs at least one batch of tokens")
    return [total / tokens for total in totals]


def _run_hooked(model: nn.Module, handles: list, batches: Iterable[torch.Tensor]) -> int:
    """Run the batches with the hooks attached (removed afterwards, even on error); tokens seen."""
    tokens = 0
    try:
        for input_ids in batches:
            model(input_ids=input_ids, use_cache=False)
            tokens += input_ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return tokens


def drop_layers(model: nn.Module, keep_indices: Sequence[int]) -> nn.Module:
    """Keep only the given decoder blocks (in the given order) and update the config to match."""
    layers = decoder_layers(model)
    if not keep_indices or len(set(keep_indices)) != len(keep_indices):
        raise ValueError(f"keep_indices must be non-empty and without repeats, got {list(keep_indices)}")
    if not all(0 <= i < len(layers) for i in keep_indices):
        raise ValueError(f"keep_indices must lie in [0, {len(layers)}), got {list(keep_indices)}")
    model.model.layers = nn.ModuleList(layers[i] for i in keep_indices)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    config = model.config
    config.num_hidden_layers = len(keep_indices)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep_indices]
    return model


# --- Structured pruning inside blocks -----------------------------------------------------------------


def _keep_slices(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0) or input columns (dim 1) of ``linear`` in place.

    Not transformers' ``prune_linear_layer``: that returns a new fp32 layer with requires_grad=True,
    which would silently un-freeze and up-cast a bf16 frozen base.
    """
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach().index_select(dim, index).clone(), weight.requires_grad)
    if linear.bias is not None and dim == 0:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest scores, in increasing index order (keeps the original layout)."""
    return torch.topk(scores.float(), keep).indices.sort().values


def _count_to_keep(total: int, keep: int | None, keep_ratio: float | None, what: str) -> int:
    if (keep is None) == (keep_ratio is None):
        raise ValueError(f"Give exactly one of the number of {what} to keep or a keep ratio")
    if keep is None:
        keep = max(1, round(keep_ratio * total))
    if not 1 <= keep <= total:
        raise ValueError(f"Can keep between 1 and {total} {what}, not {keep}")
    return keep


def kv_group_scores(model: nn.Module) -> list[torch.Tensor]:
    """Per block, one score per KV group: ||v_proj rows of the group|| * ||o_proj columns it feeds||.

    A group is a key/value head plus the query heads that share it; its output reaches the residual
    stream only through v_proj then o_proj. Needs no data, but ignores how large the group's
    activations are: prefer ``kv_group_activation_scores``.
    """
    config = model.config
    kv_heads = config.num_key_value_heads
    scores = []
    for layer in decoder_layers(model):
        attention = layer.self_attn
        value = attention.v_proj.weight.detach().float().reshape(kv_heads, -1)
        output = attention.o_proj.weight.detach().float().reshape(config.hidden_size, kv_heads, -1)
        scores.append(value.norm(dim=1) * output.norm(dim=(0, 2)))
    return scores


@torch.no_grad()
def _mean_input_magnitudes(model: nn.Module, batches: Iterable[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Per block, the mean |x_j| over every token of each input channel j of the named projection."""
    layers = decoder_layers(model)
    sums: list[torch.Tensor | float] = [0.0] * len(layers)

    def recorder(index: int):
        def hook(module, args):
            sums[index] = sums[index] + args[0].detach().float().abs().flatten(0, -2).sum(0)

        return hook

    handles = [block_linear(layer, name).register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    tokens = _run_hooked(model, handles, batches)
    if tokens == 0:
        raise ValueError("Activation scores need at least one batch of tokens")
    return [total / tokens for total in sums]


def kv_group_activation_scores(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per block, one score per KV group: sum over its o_proj inputs j of mean|x_j| * ||o_proj column j||.

    Activation-aware (as Wanda scores weights): how much the group actually writes to the residual
    stream on ``batches`` (input ids, unpadded).
    """
    heads_input = _mean_input_magnitudes(model, batches, "o_proj")
    kv_heads = model.config.num_key_value_heads
    return [
        (magnitude * layer.self_attn.o_proj.weight.detach().float().norm(dim=0)).view(kv_heads, -1).sum(1)
        for magnitude, layer in zip(heads_input, decoder_layers(model))
    ]


def prune_heads(
    model: nn.Module,
    keep_kv_heads: int | None = None,
    keep_ratio: float | None = None,
    scores: Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """Keep the ``keep_kv_heads`` (or ``keep_ratio`` of the) most important KV groups in every block.

    With grouped-query attention a key/value head serves several query heads, so pruning removes whole
    groups: the model keeps its query-per-KV ratio and stays a valid Llama. A Llama config has one head
    count for all blocks, so every block keeps the same number of groups (the best ones for that block).
    ``scores``: per block, one score per KV group; ``kv_group_activation_scores`` is much better than
    the data-free default, ``kv_group_scores``.
    """
    layers = decoder_layers(model)
    config = model.config
    kv_heads = config.num_key_value_heads
    queries_per_group = config.num_attention_heads // kv_heads
    head_dim = layers[0].self_attn.head_dim
    keep = _count_to_keep(kv_heads, keep_kv_heads, keep_ratio, "KV heads")
    scores = kv_group_scores(model) if scores is None else scores
    offsets = torch.arange(head_dim)
    for layer, layer_scores in zip(layers, scores, strict=True):
        groups = _top_indices(torch.as_tensor(layer_scores), keep)
        kv_rows = (groups[:, None] * head_dim + offsets).flatten()
        query_heads = (groups[:, None] * queries_per_group + torch.arange(queries_per_group)).flatten()
        query_rows = (query_heads[:, None] * head_dim + offsets).flatten()
        attention = layer.self_attn
        _keep_slices(attention.q_proj, query_rows, dim=0)
        _keep_slices(attention.k_proj, kv_rows, dim=0)
        _keep_slices(attention.v_proj, kv_rows, dim=0)
        _keep_slices(attention.o_proj, query_rows, dim=1)
    config.num_attention_heads = keep * queries_per_group
    config.num_key_value_heads = keep
    config.head_dim = head_dim  # explicit: no longer hidden_size // num_attention_heads
    return model


def mlp_neuron_scores(model: nn.Module) -> list[torch.Tensor]:
    """Per block, one score per intermediate neuron: ||gate row|| * ||up row|| * ||down column||.

    Needs no data, but ignores how large each neuron's activations are: prefer ``mlp_activation_scores``.
    """
    scores = []
    for layer in decoder_layers(model):
        mlp = layer.mlp
        gate, up, down = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        scores.append(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
    return scores


def mlp_activation_scores(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per block, one score per neuron: its mean |activation| on ``batches`` * ||down_proj column||.

    Activation-aware, as ``kv_group_activation_scores``: weight norms alone ignore how large each
    neuron's activations actually are.
    """
    neurons = _mean_input_magnitudes(model, batches, "down_proj")
    return [
        magnitude * layer.mlp.down_proj.weight.detach().float().norm(dim=0)
        for magnitude, layer in zip(neurons, decoder_layers(model))
    ]


def prune_mlp_neurons(
    model: nn.Module, keep_ratio: float, scores: Sequence[torch.Tensor] | None = None
) -> nn.Module:
    """Keep the ``keep_ratio`` most important intermediate neurons of every block's MLP.

    The same count in every block, as a Llama config has a single ``intermediate_size``.
    ``scores``: per block, one score per neuron; ``mlp_activation_scores`` is much better than the
    data-free default, ``mlp_neuron_scores``.
    """
    layers = decoder_layers(model)
    config = model.config
    keep = _count_to_keep(config.intermediate_size, None, keep_ratio, "MLP neurons")
    scores = mlp_neuron_scores(model) if scores is None else scores
    for layer, layer_scores in zip(layers, scores, strict=True):
        neurons = _top_indices(torch.as_tensor(layer_scores), keep)
        mlp = layer.mlp
        _keep_slices(mlp.gate_proj, neurons, dim=0)
        _keep_slices(mlp.up_proj, neurons, dim=0)
        _keep_slices(mlp.down_proj, neurons, dim=1)
        mlp.intermediate_size = keep
    config.intermediate_size = keep
    return model

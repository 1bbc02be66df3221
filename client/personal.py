"""A user's private adapter state on the device: saved in peft's format, never sent anywhere.

Layout under the device's state folder (node-config or run-config ``state-dir``)::

    <state-dir>/<user>/<adapter>/adapter_config.json        peft's own files: plain
    <state-dir>/<user>/<adapter>/adapter_model.safetensors  PeftModel.from_pretrained loads them
    <state-dir>/<user>/<adapter>/fedgraft.json              base hash, method, round, time
    <state-dir>/<user>/cache/                               a retrieval method's kNN cache (shared/retrieval.py)
    <state-dir>/<user>/residual.safetensors                 top-k's error-feedback residual (client/codec.py)

Flower keeps a SuperNode's ``Context.state`` in memory only, so state that must survive a restart
lives here. An adapter trained on another base is stale: loading it raises StalePersonalAdapter.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

PEFT_WEIGHTS = "adapter_model.safetensors"
TAG_FILE = "fedgraft.json"
CACHE = "cache"


class StalePersonalAdapter(RuntimeError):
    """A saved personal adapter belongs to a different base model."""


def user_folder(state_dir: Path, user_id: str) -> Path:
    """A filesystem-safe folder per user ("macbeth/LADY MACBETH" -> "macbeth__LADY_MACBETH")."""
    return Path(state_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", user_id.replace("/", "__"))


def save_personal(model: PeftModel, adapter: str, folder: Path, base_hash: str, **tags: object) -> Path:
    """Save one adapter of the model in peft's format, atomically, tagged with the base hash."""
    target = folder / adapter
    partial = folder / f".{adapter}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, selected_adapters=[adapter])
    # peft writes a non-default adapter into a sub-folder named after it; flatten to one folder
    written = partial / adapter if (partial / adapter / PEFT_WEIGHTS).is_file() else partial
    (written / TAG_FILE).write_text(json.dumps({"base_hash": base_hash, "saved_at": time.time(), **tags}))
    old = folder / f".{adapter}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    written.rename(target)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return target


def load_personal(model: PeftModel, adapter: str, folder: Path, base_hash: str) -> bool:
    """Load a saved adapter into the model's adapter of that name; False when none is saved."""
    target = folder / adapter
    if not (target / PEFT_WEIGHTS).is_file():
        return False
    tag = json.loads((target / TAG_FILE).read_text()) if (target / TAG_FILE).is_file() else {}
    if tag.get("base_hash") != base_hash:
        raise StalePersonalAdapter(
            f"the personal adapter in {target} was trained on base {str(tag.get('base_hash'))[:12]}..., "
            f"not on the announced base {base_hash[:12]}...; move it away (or delete it) to start afresh"
        )
    state = load_file(target / PEFT_WEIGHTS)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    if result.unexpected_keys:
        raise StalePersonalAdapter(f"the personal adapter in {target} does not fit this adapter configuration "
                                   f"(unexpected keys such as {result.unexpected_keys[0]})")
    return True


def copy_adapter(model: PeftModel, source: str, target: str) -> None:
    """Copy every LoRA tensor of one adapter into another of the same configuration."""
    with torch.no_grad():
        for module in model.modules():
            for layer_name in ("lora_A", "lora_B"):
                layers = getattr(module, layer_name, None)
                if isinstance(layers, torch.nn.ModuleDict) and source in layers and target in layers:
                    layers[target].weight.copy_(layers[source].weight)

"""Plug an adapter trained on an emulator base into its teacher (Offsite-Tuning, Xiao et al. 2023).

An emulator keeps some of its teacher's decoder blocks exactly (``shared.base_files.EmulatorLayout``)
and its adapters sit only on those. Such an adapter is the teacher's adapter once its block indices
are renamed: emulator block ``i`` is teacher block ``layout.teacher_layers[i]``. The result is a plain
peft folder that ``PeftModel.from_pretrained(teacher, folder)`` loads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from peft import LoraConfig, PeftConfig
from safetensors.torch import load_file, save_file

from shared.adapters import LAYERS_PATTERN
from shared.base_files import EmulatorLayout

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names
BLOCK = re.compile(r"\.layers\.(\d+)\.")  # a decoder block's index in a peft key

Tensor = TypeVar("Tensor")  # torch tensors or numpy arrays: only the keys change


class NotPluggable(ValueError):
    """The adapter does not sit only on the emulator blocks that are the teacher's own."""


def teacher_adapter(tensors: Mapping[str, Tensor], lora: LoraConfig, layout: EmulatorLayout,
                    teacher: str) -> tuple[dict[str, Tensor], LoraConfig]:
    """The same adapter keyed and configured for the teacher: ``teacher`` names it as the base."""
    blocks = {key: _block(key) for key in tensors}
    configured = lora.layers_to_transform
    configured = [configured] if isinstance(configured, int) else configured
    layers = sorted(set(configured or blocks.values()))
    foreign = sorted((set(layers) | set(blocks.values())) - set(layout.adapter_layers))
    if foreign:
        raise NotPluggable(f"the adapter is on emulator blocks {foreign}, which are not the teacher's own "
                           f"(those are {list(layout.adapter_layers)}): it cannot run on the teacher")
    renamed = {_rename(key, layout.teacher_index(blocks[key])): tensor for key, tensor in tensors.items()}
    config = dataclasses.replace(lora, base_model_name_or_path=teacher,
                                 layers_to_transform=[layout.teacher_index(i) for i in layers],
                                 layers_pattern=lora.layers_pattern or LAYERS_PATTERN)
    return renamed, config


def plug_into_teacher(adapter_folder: Path, output: Path, layout: EmulatorLayout, teacher: str) -> Path:
    """Write the peft folder ``adapter_folder`` (trained on the emulator) as a peft folder for the teacher."""
    lora = PeftConfig.from_pretrained(str(adapter_folder))
    if not isinstance(lora, LoraConfig):
        raise NotPluggable(f"{adapter_folder} holds a {type(lora).__name__}, not a LoRA adapter")
    tensors, config = teacher_adapter(load_file(Path(adapter_folder) / ADAPTER_WEIGHTS), lora, layout, teacher)
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(output))
    return output


def _block(key: str) -> int:
    match = BLOCK.search(key)
    if match is None:  # an embedding or head adapter: the emulator's may not be the teacher's (vocabulary trim)
        raise NotPluggable(f"adapter tensor {key} is not in a decoder block: only block adapters run on the teacher")
    return int(match.group(1))


def _rename(key: str, teacher_block: int) -> str:
    return BLOCK.sub(f".layers.{teacher_block}.", key, count=1)


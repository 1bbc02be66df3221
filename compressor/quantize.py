"""Lower-precision storage of the frozen base model: ``cast_base`` to bf16 under fp32 LoRA adapters.

A bf16 frozen base trains as well as an fp32 one in half the memory (measurements, and why there is
no int8 base: docs/compression.md).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn


def cast_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters to ``dtype`` in place; a peft model's adapters stay fp32.

    Only parameters: buffers such as the rotary ``inv_freq`` stay fp32, as ``from_pretrained(dtype=...)``
    leaves them (rounded to bf16 they would blur positions). Parameters are converted through ``.data``
    so tied embeddings and shared blocks stay the same objects, hence still tied.
    """
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    if isinstance(model, PeftModel):
        # peft's own rule for adapters on a low-precision base: bf16/fp16 adapter weights -> fp32.
        for adapter_name in model.peft_config:
            cast_adapter_dtype(model, adapter_name)
    return model

"""Lower-precision storage of the frozen base model.

``cast_base`` is what works here: a bf16 frozen base under fp32 LoRA adapters trains as well as an
fp32 base and, measured on this 2-core CPU with SmolLM2-135M, 2.2x faster, with half the memory.

``int8_weight_only`` is deliberately not implemented; it raises and says why (see its docstring).
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


def int8_weight_only(model: nn.Module) -> nn.Module:
    """Not available in this environment: raises ``NotImplementedError`` explaining why.

    What was checked: ``torch.ao.quantization.quantize_dynamic`` replaces ``nn.Linear`` by quantized
    modules that peft refuses to wrap with LoRA (and that ``from_pretrained`` cannot load); the libraries
    transformers and peft support for an int8 base under LoRA (torchao via ``TorchAoConfig``,
    bitsandbytes, optimum-quanto) are not project dependencies; and int8 weight-only matmuls measured
    no gain over fp32 at SmolLM2-135M's size on this CPU. torchao 0.18 was tried on the default base:
    ``TorchAoConfig(Int8WeightOnlyConfig())`` loads, and LoRA trains on it through peft's
    ``TorchaoLoraLinear``, but the round peaked at 656 MiB against 560 for the bf16 base (quantized
    after the load) with steps about 20% slower, so it is not worth a dependency (docs/compression.md).
    """
    raise NotImplementedError(
        "int8 weight-only quantization is not available: torch.ao dynamic quantization produces modules "
        "peft cannot put LoRA on and from_pretrained cannot load, and torchao / bitsandbytes / "
        "optimum-quanto (what transformers and peft support for an int8 base) are not installed. It also "
        "measured no speed-up at SmolLM2-135M's size on CPU. Use cast_base(model, torch.bfloat16) instead: "
        "half the memory and 2.2x faster LoRA training, with fp32 adapters."
    )

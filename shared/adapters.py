"""LoRA adapters: building them with peft, moving only their tensors, and checking what arrives.

Only adapter tensors ever travel (``get_peft_model_state_dict``), as Flower ``ArrayRecord``s, which
serialise to raw bytes plus dtype and shape: nothing received is ever unpickled. A reply coded by
run config ``update-codec`` is decoded here as strictly as a plain one (``receive_update``; the
codecs are shared/codec.py's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from shared.base_files import EmulatorLayout
from shared.base_model import base_layout
from shared.codec import AdapterUpdateError, Codecs, apply_change, decode  # AdapterUpdateError: imported from here
from shared.config import FederationConfig

# where peft finds a block's index in a module's name (``model.layers.<i>.self_attn.q_proj``)
LAYERS_PATTERN = "layers"


def lora_config(config: FederationConfig, layout: EmulatorLayout | None = None, **extra: Any) -> LoraConfig:
    """The peft LoRA configuration the run config asks for (``extra``: further LoraConfig fields).

    On an emulator base (``layout``), LoRA goes only on the blocks that are the teacher's own: only
    there does what it learns mean the same to the teacher.
    """
    if layout is not None:
        extra = {"layers_to_transform": list(layout.adapter_layers), "layers_pattern": LAYERS_PATTERN, **extra}
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
        **extra,
    )


def base_lora_config(config: FederationConfig) -> LoraConfig:
    """The LoRA configuration of a run on its base: what the server and every client attach alike."""
    return lora_config(config, base_layout(config.base_model))


def attach_adapter(base: PreTrainedModel, lora: LoraConfig, seed: int = 0, adapter_name: str = "default",
                   extra_adapters: tuple[str, ...] = ()) -> PeftModel:
    """Wrap a frozen base with fresh LoRA adapters (fp32 even on a bf16 base), seeded."""
    torch.manual_seed(seed)
    try:
        model = get_peft_model(base, lora, adapter_name=adapter_name)
        for name in extra_adapters:
            model.add_adapter(name, lora)
    except ValueError as error:  # peft names missing target modules; add what the model has
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"{error}. Linear modules in this base: {linear_names}") from error
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # fp32 adapter on a bf16 base: small steps would round away in bf16
    return model


def adapter_state(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors only, keyed as peft saves them."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in state.items()}


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors as a Flower ArrayRecord (numpy arrays; no pickling)."""
    return ArrayRecord({name: tensor.float() for name, tensor in state.items()})


def array_nbytes(arrays: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord, as sent over the wire (tensor data only)."""
    return sum(len(array.data) for array in arrays.values())


def check_update(arrays: ArrayRecord, reference: Mapping[str, tuple[int, ...]], max_bytes: int) -> dict[str, np.ndarray]:
    """Validate an incoming adapter update against the expected keys and shapes; return its arrays.

    ``reference`` maps each expected key to its shape. Raises AdapterUpdateError naming the first
    problem: size over ``max_bytes``, missing or unexpected keys, a wrong shape or dtype, NaN or inf.
    """
    check_size(arrays, max_bytes)
    missing = sorted(set(reference) - set(arrays.keys()))
    unexpected = sorted(set(arrays.keys()) - set(reference))
    if missing or unexpected:
        raise AdapterUpdateError(f"update keys differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                 f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    result: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        try:
            values = array.numpy()  # np.load(allow_pickle=False): object arrays are refused
        except (TypeError, ValueError) as error:
            raise AdapterUpdateError(f"{name}: not a plain numpy array ({error})") from error
        if values.dtype.kind != "f":
            raise AdapterUpdateError(f"{name}: dtype {values.dtype} is not a float type")
        if tuple(values.shape) != tuple(reference[name]):
            raise AdapterUpdateError(f"{name}: shape {tuple(values.shape)}, expected {tuple(reference[name])}")
        if not np.isfinite(values).all():
            raise AdapterUpdateError(f"{name}: contains NaN or inf")
        result[name] = values
    return result


def check_size(arrays: ArrayRecord, max_bytes: int) -> None:
    """Refuse a payload over ``max_bytes`` on the wire, before anything in it is read."""
    size = array_nbytes(arrays)
    if size > max_bytes:
        raise AdapterUpdateError(f"update is {size} bytes, over the limit of {max_bytes} bytes")


def receive_update(arrays: ArrayRecord, sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                   codecs: Codecs, max_bytes: int) -> dict[str, np.ndarray]:
    """The adapter a train reply stands for, checked as strictly whatever its codec (float32 tensors).

    ``sent``: the adapter the server meant for the node (its keys and shapes are the reference);
    ``received``: what the node decoded from it (the same unless ``downlink-codec`` is lossy). A
    coded reply carries the node's change; a float32 one the trained adapter, whose change is taken
    from ``received``. Either way the change is added to ``sent``, so a lossy downlink never enters
    the server's adapters.
    """
    shapes = {key: tuple(np.shape(value)) for key, value in sent.items()}
    if codecs.up.lossless:
        returned = check_update(arrays, shapes, max_bytes)
        change = {key: np.asarray(value, np.float32) - np.asarray(received[key], np.float32)
                  for key, value in returned.items()}
    else:
        check_size(arrays, max_bytes)
        change = decode(arrays, shapes, codecs.up, codecs.topk_fraction)
    return apply_change(sent, change)


def expected_shapes(model: PeftModel, adapter_name: str = "default",
                    keep: Callable[[str], bool] = lambda key: True) -> dict[str, tuple[int, ...]]:
    """Keys and shapes an update for this adapter must have (only keys ``keep`` accepts)."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {name: tuple(tensor.shape) for name, tensor in state.items() if keep(name)}


def load_arrays(model: PeftModel, arrays: ArrayRecord, max_bytes: int = 1 << 30, adapter_name: str = "default",
                keep: Callable[[str], bool] = lambda key: True) -> None:
    """Check an ArrayRecord of adapter tensors and load it into one adapter of the model.

    With ``keep``, the update holds only the accepted keys (e.g. FedSA's A matrices) and the
    adapter's other tensors are left as they are.
    """
    values = check_update(arrays, expected_shapes(model, adapter_name, keep), max_bytes)
    state = {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in values.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise AdapterUpdateError(f"adapter keys not in the model: {result.unexpected_keys[:3]}")


def save_adapter(model: PeftModel, folder: Path) -> Path:
    """Save in peft's format: ``PeftModel.from_pretrained(base, folder)`` loads it."""
    model.save_pretrained(folder)
    return folder

"""Where models compute: the ``device`` run-config key resolved on this machine, and bf16 autocast on a GPU.

``auto`` is CUDA when this machine has a device torch can use, else the CPU. The key is resolved where
a model trains or scores (a client, ``client.use``, the compression build, the simulation runner
before it starts Flower), never on the server, which only averages adapters: a CPU-only server may
coordinate GPU clients. Training and evaluation follow the device their model is on.

torch is imported inside the functions: ``shared.config`` names the choices, and the operator's tools
import it without needing torch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Device(Enum):
    """The ``device`` run-config key."""

    AUTO = "auto"  # CUDA when available, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


DEVICES = tuple(choice.value for choice in Device)


class DeviceUnavailable(ValueError):
    """The device asked for is not on this machine."""


def resolve_device(choice: Device | str) -> torch.device:
    """The torch device ``choice`` means on this machine; DeviceUnavailable for ``cuda`` without CUDA."""
    import torch

    choice = Device(choice)
    if choice is Device.CPU:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice is Device.CUDA:
        raise DeviceUnavailable(f"device = \"cuda\", but torch {torch.__version__} finds no CUDA device on this "
                                f"machine (CUDA build: {torch.version.cuda or 'none, a CPU-only torch'}); "
                                "use device = \"auto\" or \"cpu\"")
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on (the one its inputs must be moved to)."""
    return next(model.parameters()).device


def gpu_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` is a GPU that computes in bfloat16 natively (Ampere or later)."""
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on a GPU that supports it; elsewhere nothing (a CPU keeps its float32 arithmetic)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if gpu_bfloat16(device) else nullcontext()

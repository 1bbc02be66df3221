"""Measuring what a compression bought: parameters, bytes on disk, a sparse format's size, peak memory.

Perplexity is scored by ``compressor.evaluate`` (client text) and ``shared.training.evaluate`` (blocks).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.base_files import WEIGHT_FILE_SUFFIXES
from shared.memory import peak_rss_bytes

INDEX_BYTES = 4  # int32 column indices and row pointers in CSR


def parameter_count(model: nn.Module, unique: bool = True) -> int:
    """Number of parameters; ``unique`` counts a tensor once however many modules use it.

    With ``unique=False`` tied embeddings and shared blocks are counted at every place they are used.
    """
    params = model.parameters() if unique else (p for _, p in model.named_parameters(remove_duplicate=False))
    return sum(p.numel() for p in params)


def storage_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a saved model folder (not config or tokenizer files)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.suffix in WEIGHT_FILE_SUFFIXES)


def _sparse_tensor_nbytes(tensor: torch.Tensor, layout: str) -> int:
    nonzero = int(torch.count_nonzero(tensor).item())
    values = nonzero * tensor.element_size()
    if layout == "bitmask":
        return math.ceil(tensor.numel() / 8) + values
    if layout == "csr":
        rows = tensor.shape[0] if tensor.dim() > 1 else 1
        return values + nonzero * INDEX_BYTES + (rows + 1) * INDEX_BYTES
    raise ValueError(f"Unknown sparse layout {layout!r}; choose 'bitmask' or 'csr'")


def sparse_nbytes(model: nn.Module, layout: str = "bitmask") -> int:
    """Estimated bytes of the model's parameters if zeros were not stored.

    Each unique tensor counts as the cheaper of dense and ``layout``: "bitmask" (one bit per entry plus
    the non-zero values) or "csr" (values, int32 column indices, int32 row pointers). An estimate of a
    format nothing here writes: ``save_pretrained`` stores dense tensors, zeros included.
    """
    return sum(
        min(p.numel() * p.element_size(), _sparse_tensor_nbytes(p.detach(), layout)) for p in model.parameters()
    )


def _run_measured(target: Callable[..., Any], args: tuple) -> tuple[Any, int]:
    result = target(*args)
    return result, peak_rss_bytes()


def peak_rss_subprocess(target: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """Run ``target(*args)`` in a fresh spawned process: (its result, that process's peak RSS in bytes).

    A fresh process so that the peak is this workload's, not an earlier one's in the caller (RSS peaks
    never go down). It includes the interpreter and the imports of ``target``'s module (torch alone is a
    few hundred MB): compare with a trivial target from the same module for the workload's own share.
    ``target`` must be a module-level function and args and result picklable.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_measured, target, args).result()

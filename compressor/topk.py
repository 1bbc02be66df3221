"""The teacher's top-k logits per public block, computed once and kept on disk across builds.

Distillation from cached top-k logits (``heal.kd_topk``) needs the teacher's k largest logits at
every position of every healing block; the store fills them as healing first meets each block and
saves them, keyed by whatever decides them (see ``topk_store_path``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shared.device import model_device


def topk_store_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    """The store's file under ``cache_dir``, named by a hash of what decides its contents."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / "teacher-topk" / f"{digest}.safetensors"


class TopKStore:
    """The teacher's top-k logits per public block, filled on first use and kept on disk across builds.

    Keyed by the teacher, the vocabulary, the blocks and k: any recipe healing on the same public
    blocks with the same (trimmed) teacher reuses them, so the teacher runs once per block, ever.
    """

    def __init__(self, path: Path | None, blocks: torch.Tensor, k: int):
        self.path, self.k = path, k
        self.blocks = blocks
        count, length = blocks.shape
        self.values = torch.zeros(count, length, k, dtype=torch.bfloat16)
        self.indices = torch.zeros(count, length, k, dtype=torch.int32)
        self.filled = torch.zeros(count, dtype=torch.bool)
        self.loaded = 0
        if path is not None and path.is_file():
            stored = load_file(str(path))
            if torch.equal(stored["blocks"], blocks):
                self.values, self.indices, self.filled = stored["values"], stored["indices"], stored["filled"]
                self.loaded = int(self.filled.sum())
        self.computed = 0

    @torch.no_grad()
    def get(self, teacher: nn.Module, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k (values, ids) of the blocks at ``index``, running the teacher on those not yet stored."""
        missing = index[~self.filled[index]]
        if len(missing):
            logits = teacher(input_ids=self.blocks[missing].to(model_device(teacher)), use_cache=False).logits
            values, indices = logits.float().topk(self.k, dim=-1)
            self.values[missing] = values.to("cpu", self.values.dtype)  # the store stays on the CPU, saved as is
            self.indices[missing] = indices.to("cpu", torch.int32)
            self.filled[missing] = True
            self.computed += len(missing)
        return self.values[index].float(), self.indices[index]

    def save(self) -> None:
        """Write the store to its file (next to it first, then renamed), if it computed anything new."""
        if self.path is None or self.computed == 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + f".{os.getpid()}.partial")
        save_file({"blocks": self.blocks, "values": self.values, "indices": self.indices, "filled": self.filled},
                  str(partial))
        partial.replace(self.path)

"""A kNN-LM cache over a user's own speeches: personalization by retrieval, on the device, with no training.

Khandelwal et al., "Generalization through Memorization: Nearest Neighbor Language Models" (ICLR 2020).
The datastore's keys are what the output layer reads (the last hidden state) at every predicted
position of the user's training blocks, its values the tokens that followed. Scoring mixes the
model's next-token distribution with one read off the nearest keys:

    p(w) = (1 - weight) * p_model(w) + weight * p_knn(w)
    p_knn(w) = sum over the k nearest keys whose value is w of softmax_i(-d_i / temperature)

with d the squared L2 distance. A character's names, forms of address and turns of phrase are in their
own speeches; the cache brings them back without a gradient step, and it never leaves the device.

The setting (weight, temperature, k) is chosen per user on blocks held out of the datastore, from a
grid that includes weight 0: on those blocks the cache never scores worse than the model alone.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.device import autocast, model_device
from shared.lm_loss import IGNORE_INDEX
from shared.training import TokenBlocks, in_order

# The grid a user's setting is chosen from. Temperatures are multiples of the median distance from a
# validation position to its nearest key, so the grid fits any hidden size and norm.
WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6)
TEMPERATURE_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
NEIGHBOURS = (8, 32, 128)
QUERY_CHUNK = 512  # query positions whose distances to every key are alive at a time
KEYS_FILE, SETTING_FILE = "datastore.safetensors", "cache.json"


@dataclass(frozen=True)
class CacheSetting:
    """How the cache is mixed in: ``weight`` 0 is the model alone."""

    weight: float
    temperature: float
    neighbours: int


@dataclass(frozen=True)
class Datastore:
    """Keys (hidden states, float32 ``[N, d]``) and the token that followed each (``[N]``)."""

    keys: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        return self.values.shape[0]

    @classmethod
    def of(cls, *parts: "Positions") -> "Datastore":
        """The cache of these positions: their hidden states as keys, their targets as values."""
        return cls(torch.cat([p.hidden for p in parts]), torch.cat([p.targets for p in parts]))

    def save(self, folder: Path, setting: CacheSetting, **tags: object) -> Path:
        """Keys in float16 and the setting, atomically: a crash mid-save never leaves a half folder."""
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({"keys": self.keys.half().contiguous(), "values": self.values.int().contiguous()}, partial / KEYS_FILE)
        (partial / SETTING_FILE).write_text(json.dumps({"setting": asdict(setting), **tags}))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        return folder

    @classmethod
    def load(cls, folder: Path) -> tuple["Datastore", CacheSetting, dict]:
        """The datastore, its setting and its tags; FileNotFoundError when the folder holds none."""
        if not (folder / KEYS_FILE).is_file() or not (folder / SETTING_FILE).is_file():
            raise FileNotFoundError(f"no kNN cache in {folder} (expected {KEYS_FILE} and {SETTING_FILE})")
        tensors = load_file(folder / KEYS_FILE)
        tags = json.loads((folder / SETTING_FILE).read_text())
        return cls(tensors["keys"].float(), tensors["values"].long()), CacheSetting(**tags.pop("setting")), tags


@dataclass(frozen=True)
class Positions:
    """Every predicted position of some blocks: its query (hidden state), target and the model's scores."""

    hidden: torch.Tensor  # [P, d] float32
    targets: torch.Tensor  # [P]
    model_log_probs: torch.Tensor  # [P] log p_model(target)


@contextmanager
def _capture_head_input(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record what the output layer reads on each forward pass (a peft model's base head included)."""
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _forward(model: torch.nn.Module, batch: TokenBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [P, d], log-softmax logits [P, V], targets [P]) at the batch's predicted positions, on the CPU.

    The model runs where it is (shared/device.py); the cache stays on the CPU, where it is saved.
    """
    device = model_device(model)
    batch = batch.to(device)
    with _capture_head_input(model) as seen, autocast(device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    hidden, targets = seen[-1][:, :-1], batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return (hidden[mask].float().cpu(), torch.log_softmax(logits[:, :-1][mask].float(), dim=-1).cpu(),
            targets[mask].cpu())


@torch.no_grad()
def collect(model: torch.nn.Module, blocks: TokenBlocks, batch_size: int = 8) -> Positions:
    """Queries, targets and the model's log-probability of each target over all blocks (eval mode)."""
    model.eval()
    hidden, targets, scores = [], [], []
    for batch in in_order(blocks, batch_size):
        h, log_probs, t = _forward(model, batch)
        hidden.append(h)
        targets.append(t)
        scores.append(log_probs.gather(1, t[:, None]).squeeze(1))
    return Positions(torch.cat(hidden), torch.cat(targets), torch.cat(scores))


def build_datastore(model: torch.nn.Module, blocks: TokenBlocks, batch_size: int = 8) -> Datastore:
    """The cache of these blocks under this model: one key per predicted position."""
    return Datastore.of(collect(model, blocks, batch_size))


def nearest(queries: torch.Tensor, store: Datastore, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distances, values) of each query's ``k`` nearest keys, nearest first (``k`` capped at the store)."""
    k = min(k, len(store))
    distances, values = [], []
    key_norms = (store.keys**2).sum(1)
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        # |q - k|^2 = |q|^2 - 2 q.k + |k|^2, clamped: rounding can make it slightly negative
        squared = ((chunk**2).sum(1, keepdim=True) - 2 * chunk @ store.keys.T + key_norms).clamp_min(0)
        d, index = squared.topk(k, dim=1, largest=False)
        distances.append(d)
        values.append(store.values[index])
    return torch.cat(distances), torch.cat(values)


def knn_log_probs(distances: torch.Tensor, values: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_knn(target) per query from its neighbours; -inf where no neighbour holds the target."""
    weights = torch.log_softmax(-distances / temperature, dim=1)
    return torch.where(values == targets[:, None], weights, -math.inf).logsumexp(dim=1)


def mix(model_log_probs: torch.Tensor, cache_log_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """log((1 - weight) p_model + weight p_knn), elementwise; weight 0 returns the model's own."""
    if weight <= 0:
        return model_log_probs
    return torch.logaddexp(model_log_probs + math.log1p(-weight), cache_log_probs + math.log(weight))


def choose_setting(fit: Positions, validation: Positions) -> tuple[CacheSetting, float]:
    """The grid's setting with the lowest mean loss on ``validation`` under a datastore of ``fit``; and that loss."""
    distances, values = nearest(validation.hidden, Datastore.of(fit), max(NEIGHBOURS))
    scale = float(distances[:, 0].median().clamp_min(1e-6))
    best, best_loss = CacheSetting(0.0, scale, min(NEIGHBOURS)), float(-validation.model_log_probs.mean())
    for k, multiple in product(NEIGHBOURS, TEMPERATURE_SCALES):
        cache = knn_log_probs(distances[:, :k], values[:, :k], validation.targets, scale * multiple)
        for weight in WEIGHTS[1:]:
            loss = float(-mix(validation.model_log_probs, cache, weight).mean())
            if loss < best_loss:
                best, best_loss = CacheSetting(weight, scale * multiple, k), loss
    return best, best_loss


@torch.no_grad()
def evaluate_with_cache(model: torch.nn.Module, store: Datastore, blocks: TokenBlocks, setting: CacheSetting,
                        batch_size: int = 8) -> dict[str, float]:
    """``shared.training.evaluate``'s scores (loss, perplexity, accuracy, tokens) of the model mixed with the cache."""
    model.eval()
    total_loss, tokens, correct = 0.0, 0, 0
    for batch in in_order(blocks, batch_size):
        hidden, log_probs, targets = _forward(model, batch)
        distances, values = nearest(hidden, store, setting.neighbours)
        cache = knn_log_probs(distances, values, targets, setting.temperature)
        total_loss -= float(mix(log_probs.gather(1, targets[:, None]).squeeze(1), cache, setting.weight).sum())
        # the argmax of the mixed distribution: the cache adds its weights on the neighbours' tokens
        mixed = (1 - setting.weight) * log_probs.exp()
        mixed.scatter_add_(1, values, setting.weight * torch.softmax(-distances / setting.temperature, dim=1))
        correct += int((mixed.argmax(1) == targets).sum())
        tokens += targets.shape[0]
    mean_loss = total_loss / max(tokens, 1)
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0)), "accuracy": correct / max(tokens, 1),
            "tokens": float(tokens)}

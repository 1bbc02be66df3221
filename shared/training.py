"""Tokenizing speeches into blocks, the local training loop, and held-out evaluation.

A plain loop (nanoGPT style) rather than ``transformers.Trainer``: a client round is a few dozen
steps, and the Trainer's set-up would cost more than the steps.

Training and evaluation run on the device the model is on (``shared.device``: the ``device``
run-config key decides where the model is loaded): blocks are kept on the CPU and each batch is
moved there; on a GPU with bf16 the forward passes run under bf16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from shared.device import autocast, model_device
from shared.lm_loss import IGNORE_INDEX, next_token_loss


@dataclass(frozen=True)
class TokenBlocks:
    """Fixed-length blocks of a token stream; padding positions carry label IGNORE_INDEX."""

    input_ids: torch.Tensor  # [blocks, seq_len]
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens that are predicted (the first of each block has no context and is not)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @classmethod
    def unpadded(cls, input_ids: torch.Tensor) -> "TokenBlocks":
        """Full blocks of token ids ``[blocks, seq_len]``: every position attended and predicted."""
        return cls(input_ids, torch.ones_like(input_ids), input_ids)

    def select(self, indices: torch.Tensor | list[int]) -> "TokenBlocks":
        return TokenBlocks(self.input_ids[indices], self.attention_mask[indices], self.labels[indices])

    def to(self, device: torch.device) -> "TokenBlocks":
        """The blocks on ``device`` (themselves when already there)."""
        return TokenBlocks(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def tokenize_blocks(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int) -> TokenBlocks:
    """Each text followed by EOS, concatenated in order, cut into blocks of ``seq_len`` tokens."""
    if not texts:
        raise ValueError("no texts to tokenize")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    num_blocks = math.ceil(len(stream) / seq_len)
    pad = num_blocks * seq_len - len(stream)
    input_ids = torch.tensor(stream + [eos] * pad).view(num_blocks, seq_len)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    if pad:
        attention_mask.view(-1)[-pad:] = 0
        labels.view(-1)[-pad:] = IGNORE_INDEX
    return TokenBlocks(input_ids, attention_mask, labels)


def batch_indices(count: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices into ``count`` items, reshuffled each epoch (seeded).

    An epoch's tail shorter than a batch is dropped (a fresh permutation starts), unless the whole
    epoch is shorter than one batch.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order) and position > 0:
            order, position = torch.randperm(count, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


def batches(blocks: TokenBlocks, batch_size: int, steps: int, seed: int) -> Iterator[TokenBlocks]:
    """``steps`` batches of blocks drawn by ``batch_indices``."""
    for indices in batch_indices(len(blocks), batch_size, steps, seed):
        yield blocks.select(indices)


def hold_out(blocks: TokenBlocks, fraction: float, seed: int = 0) -> tuple[TokenBlocks, TokenBlocks | None]:
    """(fit, validation): a seeded random ``fraction`` of the blocks set aside, at least one on each side.

    Returns ``(blocks, None)`` when ``fraction`` is 0 or there are fewer than two blocks.
    """
    if fraction <= 0 or len(blocks) < 2:
        return blocks, None
    held = min(max(round(len(blocks) * fraction), 1), len(blocks) - 1)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks.select(order[held:].sort().values), blocks.select(order[:held].sort().values)


class BestCheckpoint:
    """The trainable parameters at the step with the lowest validation loss seen so far."""

    def __init__(self, model: torch.nn.Module, parameters: list[torch.nn.Parameter], validation: TokenBlocks,
                 batch_size: int):
        self.model, self.parameters, self.validation, self.batch_size = model, parameters, validation, batch_size
        self.loss, self.step, self.state = math.inf, 0, [p.detach().clone() for p in parameters]

    def consider(self, step: int) -> None:
        loss = evaluate(self.model, self.validation, self.batch_size)["loss"]
        self.model.train()
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.state = [p.detach().clone() for p in self.parameters]

    def restore(self) -> None:
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, self.state):
                parameter.copy_(saved)


def train_adapter(
    model: torch.nn.Module,
    blocks: TokenBlocks,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    penalty: Callable[[], torch.Tensor] | None = None,
    validation: TokenBlocks | None = None,
    validate_every: int = 1,
    micro_batch_size: int | None = None,
) -> dict[str, float]:
    """Train the model's trainable (adapter) parameters with AdamW; returns mean loss and steps.

    ``seed`` fixes every random draw of the run: the batch order and dropout. Dropout draws from
    torch's global generator, whose position would otherwise depend on everything the process did
    before (a resumed run's fresh processes, clients spread over actors differently): it is seeded
    here inside a fork, so the caller's generator is left as it was.

    ``penalty`` adds a regulariser to each step's loss (FedProx's and Ditto's proximal terms); the
    reported loss is the language-model loss alone.

    ``micro_batch_size`` caps the blocks of one forward/backward pass: a step accumulates the
    gradients of its batch's micro-batches, each loss summed over its tokens and divided by the whole
    batch's token count (transformers' ``num_items_in_batch``), so the update is the whole batch's
    in less memory (activations and logits scale with the micro-batch). Default: the whole batch.

    With ``validation`` blocks the parameters are scored on them before the first step, every
    ``validate_every`` steps and after the last, and the best-scoring ones are restored at the end
    (early stopping by checkpoint: a user's few speeches overfit within a few dozen steps). Step 0
    counts, so training never leaves the adapter worse on validation than it found it.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters (is an adapter attached?)")
    if validate_every < 1:
        raise ValueError(f"validate_every must be >= 1, got {validate_every}")
    micro_batch_size = micro_batch_size or batch_size
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _train_steps(model, parameters, blocks, steps, batch_size, learning_rate, seed, penalty, validation,
                            validate_every, micro_batch_size)


def _train_steps(model: torch.nn.Module, parameters: list[torch.nn.Parameter], blocks: TokenBlocks, steps: int,
                 batch_size: int, learning_rate: float, seed: int, penalty: Callable[[], torch.Tensor] | None,
                 validation: TokenBlocks | None, validate_every: int, micro_batch_size: int) -> dict[str, float]:
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    model.train()
    best = BestCheckpoint(model, parameters, validation, micro_batch_size) if validation is not None else None
    if best is not None:
        best.consider(0)
    losses = []
    for batch in batches(blocks, batch_size, steps, seed):
        loss = accumulate_gradients(model, batch, micro_batch_size)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {len(losses) + 1}")
        if penalty is not None:
            penalty().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if best is not None and (len(losses) % validate_every == 0 or len(losses) == steps):
            best.consider(len(losses))
    model.eval()
    stats = {"train-loss": sum(losses) / len(losses), "train-steps": float(len(losses))}
    if best is not None:
        best.restore()
        stats.update({"best-step": float(best.step), "validation-loss": best.loss})
    return stats


def accumulate_gradients(model: torch.nn.Module, batch: TokenBlocks, micro_batch_size: int) -> float:
    """Backpropagate the batch's mean next-token loss in micro-batches; returns that loss.

    A non-finite micro-batch loss stops before its backward pass, so no NaN reaches the gradients.
    """
    device = model_device(model)
    tokens = torch.tensor(max(batch.num_tokens, 1), device=device)
    total = 0.0
    for start in range(0, len(batch), micro_batch_size):
        micro = batch.select(list(range(start, min(start + micro_batch_size, len(batch))))).to(device)
        with autocast(device):
            loss = next_token_loss(model, micro.input_ids, micro.attention_mask, micro.labels, tokens)
        if not torch.isfinite(loss):
            return loss.item()
        loss.backward()
        total += loss.item()
    return total


def proximal_penalty(parameters: dict[str, torch.nn.Parameter], anchor: dict[str, torch.Tensor],
                     strength: float) -> Callable[[], torch.Tensor]:
    """(strength / 2) * ||parameters - anchor||^2 over matching names (FedProx, Ditto)."""
    pairs = [(parameters[name], anchor[name].detach()) for name in parameters]

    def penalty() -> torch.Tensor:
        return 0.5 * strength * sum(((p - a) ** 2).sum() for p, a in pairs)

    return penalty


def in_order(blocks: TokenBlocks, batch_size: int) -> Iterator[TokenBlocks]:
    """The blocks in their order, ``batch_size`` at a time (the last batch may be smaller)."""
    for start in range(0, len(blocks), batch_size):
        yield blocks.select(list(range(start, min(start + batch_size, len(blocks)))))


@torch.no_grad()
def next_token_sums(model: torch.nn.Module, batches: Iterable[TokenBlocks]) -> tuple[float, int, int]:
    """(summed next-token loss, predicted tokens, correct argmax predictions) over the batches.

    The model is put in eval mode. Positions labelled IGNORE_INDEX (padding) count in none of the three.
    """
    model.eval()
    device = model_device(model)
    total_loss, total_tokens, correct = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits.float()
        targets = batch.labels[:, 1:]
        predictions = logits[:, :-1]
        mask = targets != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(
            predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += int(mask.sum())
        correct += int(((predictions.argmax(-1) == targets) & mask).sum())
    return total_loss, total_tokens, correct


def evaluate(model: torch.nn.Module, blocks: TokenBlocks, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean next-token loss, perplexity and accuracy over all blocks (model left in eval mode)."""
    total_loss, total_tokens, correct = next_token_sums(model, in_order(blocks, batch_size))
    mean_loss = total_loss / max(total_tokens, 1)
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0)), "accuracy": correct / max(total_tokens, 1),
            "tokens": float(total_tokens)}

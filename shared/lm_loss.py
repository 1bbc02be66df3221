"""A causal LM's next-token loss without the logits of a whole sequence in memory at once.

At a micro-batch of one 128-token block the output head's logits and their gradients (positions x
vocabulary, in float32 for the loss) are the largest tensors of a client step. ``next_token_loss``
computes the same loss and gradient a few positions at a time, the idea of Liger Kernel's fused
linear cross-entropy (Hsu et al. 2024) and Apple's Cut Cross-Entropy (Wijmans et al. 2024), here
in plain torch: the gradient with respect to the hidden states is worked out in the forward pass,
chunk by chunk, so nothing of the size of the logits is kept for the backward pass.

Only for heads that are a bias-free ``nn.Linear`` applied directly to the decoder's last hidden
state (the Llama family's ``lm_head``); anything else (a LoRA-wrapped head, logit soft-capping or
scaling in the model's forward) takes the model's own loss, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

IGNORE_INDEX = -100
CHUNK_POSITIONS = 32  # positions per chunk: chunk x vocabulary float32 logits are alive at a time

# Model types whose ``ForCausalLM.forward`` is ``lm_head(norm(decoder(x)))`` and the standard loss.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                    num_items_in_batch: torch.Tensor, chunk_positions: int = CHUNK_POSITIONS) -> torch.Tensor:
    """Summed next-token cross-entropy over ``labels`` (shifted inside) divided by ``num_items_in_batch``.

    The same value and gradients as ``model(..., labels=labels, num_items_in_batch=...).loss``;
    ``model`` is a transformers causal LM or a peft model around one.
    """
    split = _decoder_and_head(model)
    if split is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     num_items_in_batch=num_items_in_batch).loss
    decoder, head = split
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    summed = ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), head.weight, targets.flatten(), chunk_positions)
    return summed / num_items_in_batch


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(the decoder stack, the plain linear head) of a supported causal LM, else None."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(causal_lm, PreTrainedModel) or causal_lm.config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = causal_lm.get_output_embeddings()
    decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if type(head) is not nn.Linear or head.bias is not None or decoder is None:
        return None
    return decoder, head


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over positions of CE(targets, hidden @ weight.T), ``chunk`` positions at a time.

    With p = softmax(logits), d/dlogits = p - onehot(target) at each position with a target (zero
    elsewhere); so d/dhidden = (p - onehot) @ weight and d/dweight = (p - onehot).T @ hidden, both
    accumulated in the forward pass. The logits are computed in the hidden states' dtype (autocast's,
    under autocast) and scored in float32, as transformers' loss does after its upcast.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        device = hidden.device.type
        # Under autocast the matmuls run in its dtype, as the head would; the weight is cast once,
        # not once per chunk as autocast would do.
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        scored = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for gradcheck
        with torch.autocast(device, enabled=False):
            hidden_c, weight_c = hidden.to(compute), weight.to(compute)
            grad_hidden = torch.empty_like(hidden_c)
            grad_weight = torch.zeros(weight.shape, dtype=scored, device=hidden.device) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=scored, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = (hidden_c[rows] @ weight_c.t()).to(scored)
                counted = targets[rows] != IGNORE_INDEX
                picked = targets[rows].clamp(min=0).unsqueeze(1)
                log_normaliser = torch.logsumexp(logits, dim=1, keepdim=True)
                total += ((log_normaliser - logits.gather(1, picked)).squeeze(1) * counted).sum()
                grad_logits = logits.sub_(log_normaliser).exp_()  # softmax, in place of the logits
                grad_logits.scatter_add_(1, picked, torch.full_like(log_normaliser, -1.0))
                grad_logits.mul_(counted.unsqueeze(1))
                grad_hidden[rows] = grad_logits.to(compute) @ weight_c
                if grad_weight is not None:
                    grad_weight += grad_logits.t() @ hidden_c[rows].to(scored)
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight, None, None

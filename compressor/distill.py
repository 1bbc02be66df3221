"""Knowledge distillation losses from a teacher LM to a compressed student (the teacher's top-k logits
are cached by ``compressor.topk``).

Conventions shared by every loss here:

- Logits are (..., vocab) and labels (...) *aligned*: the logits at position t are scored against
  ``labels[t]``. For causal LM batches shift first: ``logits[:, :-1]`` against ``input_ids[:, 1:]``.
- Positions whose label is ``ignore_index`` (padding, prompt tokens) count in neither term.
- Each term is a mean over the counted positions; the KL divergence is summed over the vocabulary at
  each position (the true KL between two next-token distributions), then averaged over positions.
- Computed in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _kl_per_position(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """sum_v p_t(v) * (log p_t(v) - log p_s(v)) over the last dim, with 0 * log 0 = 0.

    Not ``F.kl_div``: it returns NaN where the teacher gives a token zero probability (a -inf logit,
    e.g. a masked-out vocabulary entry).
    """
    teacher_probs = teacher_log_probs.exp()
    terms = teacher_probs * (teacher_log_probs - student_log_probs)
    return torch.where(teacher_probs > 0, terms, 0.0).sum(-1)


def _blend(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """(1 - alpha) * mean CE + alpha * T^2 * mean KL over the positions with a label."""
    mask = labels != ignore_index
    ce = F.cross_entropy(
        student_logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index, reduction="none"
    ).view_as(labels)
    return (1 - alpha) * _masked_mean(ce, mask) + alpha * temperature**2 * _masked_mean(kl, mask)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int = -100,
) -> torch.Tensor:
    """L = (1 - a) * CE(y, s) + a * T^2 * KL(softmax(t / T) || softmax(s / T)) (see module docstring).

    The T^2 factor keeps the soft term's gradients on the same scale whatever T (Hinton et al., 2015).
    """
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return _blend(student_logits, labels, _kl_per_position(teacher, student), alpha, temperature, ignore_index)


def distillation_loss_topk(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``distillation_loss`` with the teacher known only by its top-k logits at each position.

    The teacher distribution is softmax(top-k logits / T) renormalised over those k tokens (zero
    elsewhere); the student's is its full-vocabulary softmax(s / T). The KL between them is
    sum over the k tokens of p_t * (log p_t - log p_s), so the student is also pushed to move its mass
    off tokens outside the teacher's top k. With k = vocab it equals ``distillation_loss``.

    Computed by ``_TopKDistillation``, which works out the gradient in the forward pass: the same
    loss and gradient as autograd through ``_blend``, in far fewer passes over the logits.
    """
    return _TopKDistillation.apply(student_logits, topk_values, topk_indices, labels, alpha, temperature,
                                   ignore_index)


class _TopKDistillation(torch.autograd.Function):
    """The top-k distillation loss with its gradient in closed form.

    With p = softmax(s), p_T = softmax(s / T) and q the renormalised top-k teacher (zero elsewhere),
    d/ds [(1 - a) * CE(y, s) + a * T^2 * KL(q || p_T)] = (1 - a) * (p - onehot(y)) + a * T * (p_T - q),
    averaged over the positions with a label. Autograd through log_softmax, gather and the blend
    makes about a dozen passes over the (positions, vocabulary) logits, this about half as many: at
    healing's vocabulary sizes those passes are a large share of a student step.
    """

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                labels: torch.Tensor, alpha: float, temperature: float, ignore_index: int) -> torch.Tensor:
        mask = labels != ignore_index
        count = mask.sum().clamp(min=1)
        targets = labels.clamp(min=0).unsqueeze(-1)
        indices = topk_indices.long()
        logits = student_logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        tempered = log_probs if temperature == 1 else F.log_softmax(logits / temperature, dim=-1)
        teacher_log_probs = F.log_softmax(topk_values.float() / temperature, dim=-1)
        ce = -log_probs.gather(-1, targets).squeeze(-1)
        kl = _kl_per_position(teacher_log_probs, tempered.gather(-1, indices))
        loss = (1 - alpha) * _masked_mean(ce, mask) + alpha * temperature**2 * _masked_mean(kl, mask)

        # The gradient, built in place over the softmax: (1 - a) p + a T p_T, less the targets' mass.
        teacher_probs = teacher_log_probs.exp()
        if temperature == 1:
            grad = log_probs.exp_()
        else:
            grad = log_probs.exp_().mul_(1 - alpha).add_(tempered.exp_(), alpha=alpha * temperature)
        grad.scatter_add_(-1, targets, torch.full_like(ce, -(1 - alpha)).unsqueeze(-1))
        grad.scatter_add_(-1, indices, teacher_probs * -(alpha * temperature))
        grad.mul_((mask / count).unsqueeze(-1))
        ctx.save_for_backward(grad.to(student_logits.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layer_map: Mapping[int, int],
) -> torch.Tensor:
    """Mean over ``layer_map`` {student index: teacher index} of the MSE between hidden states.

    Indices into ``output_hidden_states=True`` tuples: 0 is the embeddings, i the output of block i - 1.
    The hidden sizes must match (true after layer dropping or head/neuron pruning).
    """
    losses = [F.mse_loss(student_hidden[s].float(), teacher_hidden[t].float()) for s, t in layer_map.items()]
    return torch.stack(losses).mean()


def hidden_layer_map(keep_indices: Sequence[int]) -> dict[int, int]:
    """The layer map matching each kept block's output to the same block's output in the teacher."""
    return {0: 0} | {i + 1: kept + 1 for i, kept in enumerate(keep_indices)}


def relative_hidden_error(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ||s - t||^2 / ||t||^2 between (..., hidden) states.

    Relative per position, not an MSE: the teacher's first position (its attention sink) carries a
    hidden state tens of times larger than the others', and an MSE would be mostly that position.
    """
    teacher = teacher_hidden.float()
    error = (student_hidden.float() - teacher).pow(2).sum(-1)
    return (error / teacher.pow(2).sum(-1).clamp(min=1e-12)).mean()

"""Healing: training every weight of the compressed student on the public text, optionally from the teacher.

Per step the loss is cross-entropy before ``heal.kd_start``, then knowledge distillation from the
(vocabulary-trimmed) teacher, live or from its cached top-k logits, optionally with hidden-state
matching. The learning rate warms up, then decays by a cosine over the steps or the time budget,
whichever runs out first; magnitude-pruning masks are re-applied after every step. It runs on the
device the student is on (the build's ``--device``), each batch moved there from the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from compressor.distill import distillation_loss, distillation_loss_topk, hidden_state_loss
from compressor.magnitude import apply_masks
from compressor.progress import Progress
from compressor.recipe import Recipe
from compressor.topk import TopKStore
from shared.device import gpu_bfloat16, model_device
from shared.lm_loss import IGNORE_INDEX, next_token_loss
from shared.training import batch_indices


def scheduled_learning_rate(recipe: Recipe, step: int, elapsed: float, time_budget_s: float | None) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over steps *or* time, whichever runs out first."""
    heal = recipe.heal
    if step < heal.warmup_steps:
        return heal.learning_rate * (step + 1) / (heal.warmup_steps + 1)
    progress = (step - heal.warmup_steps) / max(heal.steps - heal.warmup_steps, 1)
    if time_budget_s:
        progress = max(progress, elapsed / time_budget_s)
    progress = min(progress, 1.0)
    floor = heal.min_lr_ratio
    return heal.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


HEALING_ATTENTION = "fedgraft_fp32_sdpa"
HEALING_LOSS_CHUNK = 256  # positions per chunk of the cross-entropy: chunk x vocabulary float32 logits at a time


def fp32_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """torch's SDPA on float32 copies of q, k, v, outside autocast; the output in the caller's dtype.

    Under bf16 autocast the student's projections are bf16, and on CPU the bf16 SDPA backward is
    the slower one: in float32 a healing step is faster and its attention more precise.
    """
    with torch.autocast(query.device.type, enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                 **kwargs)
    return output.to(query.dtype), weights


AttentionInterface.register(HEALING_ATTENTION, fp32_sdpa_attention)
AttentionMaskInterface.register(HEALING_ATTENTION, sdpa_mask)


def heal(
    student: PreTrainedModel,
    train_blocks: torch.Tensor,
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
    layer_map: dict[int, int] | None = None,
    masks: Sequence[tuple[nn.Parameter, torch.Tensor]] = (),
    topk_store: TopKStore | None = None,
    progress: Progress | None = None,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Train every student parameter on ``train_blocks`` as ``recipe.heal`` says; returns statistics.

    Stops after ``heal.steps`` steps or ``time_budget_s`` seconds (default ``heal.time_budget_s``);
    the learning rate decays over whichever runs out first.

    ``teacher`` must share the student's vocabulary (the vocabulary-trimmed teacher) and is needed
    when the recipe distills; ``layer_map`` maps student to teacher hidden states for hidden matching.
    """
    settings = recipe.heal
    budget = settings.time_budget_s if time_budget_s is None else time_budget_s
    with healing_attention(student):
        return _heal_steps(student, train_blocks, recipe, budget, teacher, layer_map, masks, topk_store, progress)


@contextmanager
def healing_attention(student: PreTrainedModel) -> Iterator[None]:
    """Train ``student`` with ``HEALING_ATTENTION``; the saved model keeps the attention it came with."""
    attention = student.config._attn_implementation
    student.set_attn_implementation(HEALING_ATTENTION)
    try:
        yield
    finally:
        student.set_attn_implementation(attention)


def _heal_steps(student: PreTrainedModel, train_blocks: torch.Tensor, recipe: Recipe, budget: float | None,
                teacher: PreTrainedModel | None, layer_map: dict[int, int] | None,
                masks: Sequence[tuple[nn.Parameter, torch.Tensor]], topk_store: TopKStore | None,
                progress: Progress | None) -> dict[str, Any]:
    settings = recipe.heal
    student.requires_grad_(True)
    if settings.freeze_embeddings:
        for embedding in (student.get_input_embeddings(), student.get_output_embeddings()):
            if embedding is not None:
                embedding.weight.requires_grad_(False)
    student.train()
    parameters = [p for p in student.parameters() if p.requires_grad]
    # fused: the same AdamW update in one kernel per step instead of a loop over the parameters.
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=True)
    kd_from = math.ceil(settings.kd_start * settings.steps)
    distilling = settings.kd_alpha > 0 and teacher is not None
    matching = settings.hidden_weight > 0 and teacher is not None
    progress = progress or Progress(False)
    device = model_device(student)
    masks = [(parameter, mask.to(device)) for parameter, mask in masks]
    autocast = bfloat16_autocast(settings.autocast, device)
    task = progress.task("healing", settings.steps)
    losses: list[float] = []
    kd_steps, teacher_seconds, stopped_by = 0, 0.0, "steps"
    start = time.perf_counter()
    sampler = batch_indices(len(train_blocks), settings.batch_size, settings.steps, recipe.seed)
    for step, index in enumerate(sampler):
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed > budget:
            stopped_by = "time_budget"
            break
        batch = train_blocks[index].to(device)
        for group in optimizer.param_groups:
            group["lr"] = scheduled_learning_rate(recipe, step, elapsed, budget)
        use_teacher = step >= kd_from and (distilling or matching)
        teacher_start = time.perf_counter()
        teacher_out = topk = None
        if use_teacher:
            if topk_store is not None and not matching:
                topk = tuple(part.to(device) for part in topk_store.get(teacher, index))
            else:
                with torch.no_grad():  # autocast would re-cast the weights every pass: see teacher_dtype
                    teacher_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=matching)
        teacher_seconds += time.perf_counter() - teacher_start
        labels = batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if not use_teacher:
                # Cross-entropy alone: the head and the loss in chunks, gradient in closed form (no
                # autograd pass over the batch's float32 logits).
                loss = next_token_loss(student, batch, None, batch, torch.tensor(labels.numel(), device=device),
                                       chunk_positions=HEALING_LOSS_CHUNK)
            else:
                out = student(input_ids=batch, use_cache=False, output_hidden_states=matching)
                logits = out.logits[:, :-1]
        if use_teacher and distilling:
            if topk is not None:
                # Every position, the last one unlabelled: slicing the logits would copy them.
                next_tokens = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
                loss = distillation_loss_topk(out.logits, *topk, next_tokens, settings.kd_alpha,
                                              settings.kd_temperature, IGNORE_INDEX)
            else:
                loss = distillation_loss(logits, teacher_out.logits[:, :-1], labels, settings.kd_alpha,
                                         settings.kd_temperature)
            kd_steps += 1
        elif use_teacher:  # hidden-state matching alone
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        if use_teacher and matching:
            loss = loss + settings.hidden_weight * hidden_state_loss(out.hidden_states, teacher_out.hidden_states,
                                                                     layer_map or {})
        optimizer_step(loss, parameters, optimizer, step, "healing loss")
        if masks:
            apply_masks(masks)
        losses.append(loss.item())
        progress.advance(task, info=f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    student.requires_grad_(False)
    student.eval()
    stats = loop_stats(recipe, losses, time.perf_counter() - start, budget, teacher_seconds, stopped_by, kd_steps,
                       train_blocks.shape[1])
    return {**stats, "bf16_autocast": autocast}


def bfloat16_autocast(wanted: bool, device: torch.device = torch.device("cpu")) -> bool:
    """Whether to run the student under bf16 autocast: when the recipe asks and ``device`` multiplies bf16 natively.

    On the CPU that takes AVX-512 BF16 or AMX: without them torch emulates bf16 matrix products at a
    small fraction of float32's speed, and a time-budgeted healing would end after a handful of
    steps. On a GPU, bf16 support (Ampere or later).
    """
    if not wanted:
        return False
    if device.type == "cuda":
        return gpu_bfloat16(device)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def optimizer_step(loss: torch.Tensor, parameters: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
                   step: int, what: str) -> None:
    """One clipped update from ``loss``; FloatingPointError (naming ``what`` and the step) if it is not finite."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} became {loss.item()} at step {step + 1}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def loop_stats(recipe: Recipe, losses: Sequence[float], seconds: float, budget: float | None, teacher_seconds: float,
               stopped_by: str, kd_steps: int, seq_len: int) -> dict[str, Any]:
    """The statistics a training loop over the public blocks reports (one loss per step done)."""
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {
        "steps_planned": recipe.heal.steps,
        "steps_done": len(losses),
        "kd_steps": kd_steps,
        "stopped_by": stopped_by,
        "seconds": round(seconds, 1),
        "time_budget_s": None if budget is None else round(budget, 1),
        "teacher_seconds": round(teacher_seconds, 1),
        "seconds_per_step": round(seconds / max(len(losses), 1), 3),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last10pct": round(sum(tail) / len(tail), 4) if tail else None,
        "tokens_seen": len(losses) * recipe.heal.batch_size * seq_len,
    }

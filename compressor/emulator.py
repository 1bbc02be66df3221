"""The emulator base (Offsite-Tuning, Xiao et al. 2023; FedBiOT, Wu et al. 2024): its blocks, and the middle's distillation.

An emulator keeps its teacher's first and last blocks exactly (adapters trained there later plug into
the teacher) and compresses the blocks between them. Here: which teacher blocks it keeps
(``emulator_blocks``), its layout for the run time (``emulator_layout``), and the distillation of the
kept middle (``distill_middle``): given the teacher's hidden state entering the middle, the middle
learns to reproduce the teacher's hidden state leaving it, optionally plus the soft-target KD loss on
the output. Everything outside the middle is frozen, so it stays bit-identical to the teacher.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from compressor.distill import distillation_loss, relative_hidden_error
from compressor.heal import bfloat16_autocast, healing_attention, loop_stats, optimizer_step, scheduled_learning_rate
from compressor.layers import decoder_layers, select_layers
from compressor.progress import Progress
from compressor.recipe import EmulatorSection, Recipe
from shared.base_files import EmulatorLayout
from shared.device import model_device
from shared.training import batch_indices

EVAL_BATCH = 8


@dataclass(frozen=True)
class Middle:
    """The compressed middle of an emulator: its blocks, and the teacher block whose output its own stands for."""

    start: int  # the emulator's first middle block
    stop: int  # one past its last middle block
    teacher_exit: int  # the teacher block whose output the emulator's last middle block must reproduce

    @classmethod
    def of(cls, section: EmulatorSection, teacher_layers: int, kept: int) -> Middle:
        """The middle of an emulator of ``kept`` blocks built from a teacher of ``teacher_layers``."""
        return cls(section.first_blocks, kept - section.last_blocks, teacher_layers - section.last_blocks - 1)


def emulator_blocks(num_layers: int, section: EmulatorSection, keep: int | None, how: str,
                    scores: Sequence[float] | None = None) -> list[int]:
    """The teacher blocks an emulator keeps: the edges, and ``keep`` middle blocks chosen by ``how``.

    ``keep`` None keeps every middle block; ``scores`` (one per teacher block) serve ``how="importance"``.
    Raises ValueError when the edges leave no middle block or ``keep`` exceeds the middle.
    """
    middle = list(range(section.first_blocks, num_layers - section.last_blocks))
    if not middle:
        raise ValueError(f"{section.first_blocks} first + {section.last_blocks} last blocks leave no middle block "
                         f"of the teacher's {num_layers}")
    if keep is not None and keep > len(middle):
        raise ValueError(f"keep is {keep}, but the middle has {len(middle)} blocks ({middle[0]}-{middle[-1]})")
    if keep is not None:
        middle_scores = [scores[i] for i in middle] if scores is not None else None
        middle = [middle[i] for i in select_layers(len(middle), keep, how, middle_scores)]
    return list(range(section.first_blocks)) + middle + list(range(num_layers - section.last_blocks, num_layers))


def emulator_layout(recipe: Recipe, teacher_layers: Sequence[int]) -> EmulatorLayout:
    """The layout the run time reads: every kept teacher block, and the edge blocks adapters go on."""
    section, count = recipe.emulator, len(teacher_layers)
    adapters = list(range(section.first_blocks)) + list(range(count - section.last_blocks, count))
    return EmulatorLayout(recipe.teacher, tuple(teacher_layers), tuple(adapters))


# --- hidden states at the middle's exit ---------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the state it needs is computed."""


def exit_state(model: PreTrainedModel, block: int, input_ids: torch.Tensor,
               with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output of decoder ``block``, the logits or None) of ``model`` on ``input_ids``.

    Without logits the forward pass stops after ``block``: the blocks after it and the head (at
    SmolLM2's vocabulary as costly as several blocks) are never run.
    """
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        if not with_logits:
            raise _Stop

    handle = decoder_layers(model)[block].register_forward_hook(hook)
    try:
        logits = model(input_ids=input_ids.to(model_device(model)), use_cache=False).logits
    except _Stop:
        logits = None
    finally:
        handle.remove()
    return captured[0], logits


class ExitStates:
    """The teacher's hidden states at the middle's exit, per training block, computed once when first needed.

    Held in bfloat16: half the memory, and its rounding is far below the error being distilled.
    """

    def __init__(self, teacher: PreTrainedModel, block: int, blocks: torch.Tensor):
        self.teacher, self.block, self.blocks = teacher, block, blocks
        self.states = torch.empty(*blocks.shape, teacher.config.hidden_size, dtype=torch.bfloat16)
        self.done = torch.zeros(len(blocks), dtype=torch.bool)

    @torch.no_grad()
    def get(self, index: torch.Tensor) -> torch.Tensor:
        missing = index[~self.done[index]]
        if len(missing):
            state = exit_state(self.teacher, self.block, self.blocks[missing])[0]
            self.states[missing] = state.to("cpu", torch.bfloat16)  # kept on the CPU, whatever the teacher is on
            self.done[missing] = True
        return self.states[index]


@torch.no_grad()
def middle_error(student: PreTrainedModel, teacher: PreTrainedModel, middle: Middle, blocks: torch.Tensor) -> float:
    """The relative error of the student's hidden state leaving the middle, against the teacher's, on ``blocks``."""
    errors = [relative_hidden_error(exit_state(student, middle.stop - 1, batch)[0],
                                    exit_state(teacher, middle.teacher_exit, batch)[0]).item() * len(batch)
              for batch in blocks.split(EVAL_BATCH)]
    return sum(errors) / len(blocks)


# --- the distillation ---------------------------------------------------------------------------------


def distill_middle(student: PreTrainedModel, teacher: PreTrainedModel, train_blocks: torch.Tensor, recipe: Recipe,
                   middle: Middle, time_budget_s: float | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Train the student's middle blocks only, as ``recipe.heal`` says (steps, batch, schedule, budget).

    Loss per step: ``relative_hidden_error`` between the student's and the teacher's hidden states
    leaving the middle; the student's first blocks are the teacher's, so both middles read the same
    state. With ``heal.kd_alpha`` > 0, plus kd_alpha x T^2 x KL(teacher || student) on the output
    (live teacher); without it the teacher's states are computed once per block (``ExitStates``).
    ``teacher`` shares the student's vocabulary. Returns ``heal``'s statistics.
    """
    settings = recipe.heal
    budget = settings.time_budget_s if time_budget_s is None else time_budget_s
    student.requires_grad_(False)
    trained = [p for layer in decoder_layers(student)[middle.start:middle.stop] for p in layer.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=True)
    distilling = settings.kd_alpha > 0
    cached = None if distilling else ExitStates(teacher, middle.teacher_exit, train_blocks)
    progress = progress or Progress(False)
    device = model_device(student)
    autocast = bfloat16_autocast(settings.autocast, device)
    task = progress.task("distilling the middle", settings.steps)
    losses: list[float] = []
    teacher_seconds, stopped_by = 0.0, "steps"
    start = time.perf_counter()
    student.train()
    with healing_attention(student):
        for step, index in enumerate(batch_indices(len(train_blocks), settings.batch_size, settings.steps, recipe.seed)):
            elapsed = time.perf_counter() - start
            if budget is not None and elapsed > budget:
                stopped_by = "time_budget"
                break
            for group in optimizer.param_groups:
                group["lr"] = scheduled_learning_rate(recipe, step, elapsed, budget)
            batch = train_blocks[index].to(device)
            teacher_start = time.perf_counter()
            if distilling:
                with torch.no_grad():
                    target, teacher_logits = exit_state(teacher, middle.teacher_exit, batch, with_logits=True)
            else:
                target = cached.get(index).to(device)
            teacher_seconds += time.perf_counter() - teacher_start
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                hidden, logits = exit_state(student, middle.stop - 1, batch, with_logits=distilling)
            loss = relative_hidden_error(hidden, target)
            if distilling:  # alpha 1: the soft term alone, T^2 x KL
                loss = loss + settings.kd_alpha * distillation_loss(logits[:, :-1], teacher_logits[:, :-1],
                                                                    batch[:, 1:], 1.0, settings.kd_temperature)
            optimizer_step(loss, trained, optimizer, step, "the middle's distillation loss")
            losses.append(loss.item())
            progress.advance(task, info=f"loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    student.requires_grad_(False)
    student.eval()
    stats = loop_stats(recipe, losses, time.perf_counter() - start, budget, teacher_seconds, stopped_by,
                       kd_steps=len(losses) if distilling else 0, seq_len=train_blocks.shape[1])
    return {**stats, "bf16_autocast": autocast}

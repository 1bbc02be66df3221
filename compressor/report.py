"""The compression report: what a compressed base is, next to its teacher, as JSON and Markdown.

``build_compressed_base`` writes ``compression.json`` (every number) and ``compression.md`` (the same,
for people) into the model folder. ``python -m compressor report FOLDER`` prints it again.

JSON fields (all measured during the build, teacher and student in the same run):

- ``teacher`` / ``student``: parameters (unique tensors; the student's counted on the folder reloaded
  with plain ``from_pretrained``), ``storage_bytes`` (weight files), shape (layers, vocab_size,
  attention/kv heads, intermediate_size), ``weights_hash``; the student also has ``dtype`` and
  ``parameters_in_memory`` (before saving: smaller than ``parameters`` only with sharing or low rank,
  whose savings do not survive a plain load).
- ``eval``: held-out client text (``speeches`` test speeches of the federation's users, in
  ``documents`` scored whole; the teacher's score may come from the disk cache). For the teacher,
  the student before healing and the saved student: ``nll`` (total, nats), ``tokens`` (own),
  ``teacher_tokens``, ``ppl_per_teacher_token`` = exp(nll / teacher tokens), the fair comparison
  across tokenizers, and ``ppl_per_own_token``.
- ``ratios``: teacher / student parameters and storage, student / teacher perplexity per teacher token.
- ``techniques``: one entry per technique applied, with what it did (kept ids and the client-token
  inflation of the trimmed tokenizer, kept blocks (an emulator's: its teacher and adapter layers),
  heads, neurons, ranks, groups, measured sparsity).
- ``heal``: steps planned and done, why it stopped, seconds, losses, public held-out loss before/after,
  top-k cache use; for an emulator also ``middle_error_before``/``_after``, the middle's relative
  error against the teacher's hidden state leaving it on the public held-out blocks.
- ``timings`` (seconds per stage), ``build_seconds``, ``machine`` (nproc, RAM, torch, load average),
  ``recipe`` (every setting), ``key``, ``public_plays``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.base_files import REPORT_JSON

REPORT_MD = "compression.md"


def load_report(folder: str | Path) -> dict[str, Any]:
    """The JSON report of a compressed base folder."""
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a folder built by build_compressed_base")
    return json.loads(path.read_text())


def _millions(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.2f}M"


def _megabytes(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.1f} MB"


def _ratio(value: float | None, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, teacher, student, ratio) rows of the main comparison."""
    teacher, student, evaluation, ratios = report["teacher"], report["student"], report["eval"], report["ratios"]
    rows = [
        ("parameters (unique, as loaded)", _millions(teacher["parameters"]), _millions(student["parameters"]),
         f"{ratios['parameters']:.2f}x fewer"),
    ]
    if student.get("parameters_in_memory") and student["parameters_in_memory"] != student["parameters"]:
        rows.append(("parameters in memory (sharing / low rank)", _millions(teacher["parameters"]),
                     _millions(student["parameters_in_memory"]), f"{ratios['parameters_in_memory']:.2f}x fewer"))
    rows += [
        ("weights on disk", _megabytes(teacher.get("storage_bytes")), _megabytes(student["storage_bytes"]),
         f"{ratios['storage']:.2f}x smaller" if ratios.get("storage") else "-"),
        ("dtype on disk", "float32", student.get("dtype", "-"), ""),
        ("layers", str(teacher["layers"]), str(student["layers"]), ""),
        ("vocabulary", str(teacher["vocab_size"]), str(student["vocab_size"]), ""),
        ("attention heads / KV heads", f"{teacher['attention_heads']} / {teacher['kv_heads']}",
         f"{student['attention_heads']} / {student['kv_heads']}", ""),
        ("MLP width", str(teacher["intermediate_size"]), str(student["intermediate_size"]), ""),
        ("perplexity per teacher token (client text)", f"{evaluation['teacher']['ppl_per_teacher_token']:.2f}",
         f"{evaluation['student']['ppl_per_teacher_token']:.2f}", f"{ratios['perplexity']:.3f}x"),
        ("perplexity per own token (client text)", f"{evaluation['teacher']['ppl_per_own_token']:.2f}",
         f"{evaluation['student']['ppl_per_own_token']:.2f}", ""),
        ("tokens of the client test text", str(evaluation["teacher"]["tokens"]), str(evaluation["student"]["tokens"]),
         _ratio(evaluation["student"]["tokens"] / evaluation["teacher"]["tokens"])),
    ]
    return rows


def _technique_line(entry: dict[str, Any]) -> str:
    kind = entry["technique"]
    if kind == "vocab":
        return (f"**vocabulary trimmed** to the public text: {entry['teacher_vocab']} -> {entry['kept_ids']} ids "
                f"({entry['used_ids']} used by the public plays, the rest BPE alphabet, merge ancestors and "
                f"special tokens). The client text ({entry['client_texts']} speeches of the other plays) needs "
                f"{entry['client_token_inflation']:.3f}x the teacher's tokens ({entry['client_tokens_teacher']} -> "
                f"{entry['client_tokens_student']}).")
    if kind in ("layers", "emulator"):
        line = f"**blocks kept** ({entry['how']}): {entry['kept']}."
        if kind == "emulator":
            line = (f"**emulator** of the teacher: its blocks {entry['teacher_layers']}, of which emulator blocks "
                    f"{entry['adapter_layers']} are the teacher's own, frozen and bit-identical (adapters go there); "
                    f"the middle chosen by {entry['how']!r}.")
        for bridge in entry.get("bridges") or []:
            line += (f" Linear bridge folded into block {bridge['after_block']} for the gap before block "
                     f"{bridge['before_block']}: relative error of the hidden state {bridge['relative_error_before']}"
                     f" -> {bridge['relative_error_after']}.")
        return line
    if kind == "heads":
        before, after = entry["kv_heads"]
        return f"**KV groups** per block: {before} -> {after} ({entry['scores']} scores)."
    if kind == "mlp":
        before, after = entry["intermediate_size"]
        return f"**MLP neurons** per block: {before} -> {after} ({entry['scores']} scores)."
    if kind == "lowrank":
        return (f"**low rank** on {', '.join(entry['modules'])}, ranks {entry['ranks']}: "
                f"{_millions(entry['parameters_dense'])} -> {_millions(entry['parameters_factored'])} parameters in "
                f"memory while factored. {entry['note']}.")
    if kind == "sharing":
        return (f"**shared blocks** {entry['groups']} (init {entry['init']}): "
                f"{_millions(entry['parameters_unshared'])} -> {_millions(entry['parameters_shared'])} parameters "
                f"in memory. {entry['note']}.")
    if kind == "magnitude":
        return (f"**magnitude pruning** ({entry['scope']}) of {', '.join(entry['modules'])}: measured sparsity "
                f"{entry['sparsity_measured']:.1%}. {entry['note']}: {_megabytes(entry['sparse_bytes_estimate'])}.")
    return f"**{kind}**: {json.dumps(entry)}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    recipe = report["recipe"]
    lines = [
        f"# Compression report: {report['recipe_name']}",
        "",
        f"Teacher `{report['teacher']['spec']}` compressed by recipe `{report['recipe_name']}` "
        f"(key `{report['key']}`), built in {report['build_seconds']:.0f} s on {report['machine']['nproc']} CPUs "
        f"(load average {report['machine']['load_average'][0]} at start; torch {report['machine']['torch']}).",
        "",
        f"Public (server-side) text: {', '.join(report['public_plays']) or 'none'}; the federation must exclude "
        "these plays. Perplexities are on held-out client text: "
        f"{report['eval']['speeches']} test speeches of the users (min {report['eval']['min_speeches']} speeches) "
        f"of the other plays, joined per user by EOS into {report['eval']['documents']} documents, each scored "
        "whole; *per teacher token* divides the total NLL by the teacher's token count for the same text, so a "
        "tokenizer that splits text into more pieces gains nothing.",
        "",
        "| | teacher | student | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {teacher} | {student} | {ratio} |" for name, teacher, student, ratio in summary_rows(report)]
    lines += ["", "## Techniques", ""]
    lines += [f"- {_technique_line(entry)}" for entry in report["techniques"]] or ["- none"]
    lines.append(f"- **dtype** on disk: {report['student']['dtype']}.")
    heal = report.get("heal")
    lines += ["", "## Healing", ""]
    if heal:
        settings = recipe["heal"]
        loss = "cross-entropy"
        if settings["kd_alpha"] > 0:
            teacher_kind = f"top-{settings['kd_topk']} cached teacher logits" if settings["kd_topk"] else "live teacher"
            loss = (f"cross-entropy, then from {settings['kd_start']:.0%} of the steps (1-a)*CE + a*T^2*KL with "
                    f"a={settings['kd_alpha']}, T={settings['kd_temperature']} ({teacher_kind})")
        if settings["hidden_weight"] > 0:
            loss += f", plus hidden-state MSE x{settings['hidden_weight']}"
        if "middle_error_before" in heal:
            loss = "the middle alone, to the teacher's hidden state leaving it (relative squared error per position)"
            if settings["kd_alpha"] > 0:
                loss += f", plus {settings['kd_alpha']} x T^2 x KL on the output (T={settings['kd_temperature']})"
        before = report["eval"].get("student_before_heal", {}).get("ppl_per_teacher_token")
        lines += [
            f"- loss: {loss}; batch {settings['batch_size']} x {settings['seq_len']} tokens, lr "
            f"{settings['learning_rate']}, autocast bf16 {settings['autocast']}",
            f"- {heal['steps_done']} of {heal['steps_planned']} steps ({heal['kd_steps']} distilling) in "
            f"{heal['seconds']} s on {heal.get('device', 'cpu')} ({heal['seconds_per_step']} s/step, teacher "
            f"{heal['teacher_seconds']} s); "
            f"stopped by {heal['stopped_by'].replace('_', ' ')}; {heal['tokens_seen']} tokens seen",
            f"- train loss {heal['train_loss_first']} (first step) -> {heal['train_loss_last10pct']} (last 10%); "
            f"public held-out loss ({heal['public_val_blocks']} blocks) {heal['public_val_loss_before']} -> "
            f"{heal['public_val_loss_after']}",
        ]
        if before is not None:
            lines.append(f"- client perplexity per teacher token before healing {before:.2f}, after "
                         f"{report['eval']['student']['ppl_per_teacher_token']:.2f}")
        if "middle_error_before" in heal:
            lines.append(f"- the middle's relative error against the teacher's hidden state leaving it (public "
                         f"held-out blocks): {heal['middle_error_before']} -> {heal['middle_error_after']}")
        if heal.get("topk_cache"):
            cache = heal["topk_cache"]
            lines.append(f"- top-{cache['k']} teacher logits: {cache['blocks_loaded']} blocks from the disk cache, "
                         f"{cache['blocks_computed']} computed now")
    else:
        lines.append("- none (the student is saved as compressed)")
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report["timings"].items()]
    lines += [f"| **total** | {report['build_seconds']:.1f} |", "", "## Recipe", "", "```json",
              json.dumps(recipe, indent=2), "```", ""]
    return "\n".join(lines)


def print_report(folder: str | Path) -> None:
    """Print a compressed base's report with rich."""
    from rich.console import Console
    from rich.markdown import Markdown

    report = load_report(folder)
    Console().print(Markdown(render_markdown(report)))

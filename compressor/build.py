"""One call from a teacher LM and a recipe to a cached, compressed Hugging Face base model.

``build_compressed_base(recipe)`` runs ``STEPS`` in order, each optional by the recipe:

1. load the teacher and measure it on held-out *client* text (for the report);
2. trim the vocabulary to the ids the *public* text uses (``vocab.trim``);
3. drop decoder blocks (``layers``; "importance" scores the blocks on public text first); for an
   emulator (``[emulator]``) the teacher's first and last blocks are kept and only the middle thinned;
4. prune KV head groups, then MLP neurons (``heads``, ``mlp``; activation scores on public text);
5. factorize projections by truncated SVD (``lowrank``; trained as factors, saved dense);
6. share block weights (``sharing``; trained shared, saved untied);
7. zero the smallest weights (``magnitude``; the zeros are kept through healing);
8. heal on the public text (``heal``, see ``compressor.heal``); an emulator's middle is distilled
   instead, everything else frozen (``compressor.emulator``). This, the build's costly step, runs on
   the build's device (``device``: the GPU when there is one, by default); the others on the CPU;
9. save in the recipe's dtype (an emulator also writes its layout, ``emulator.json``), reload with
   plain ``from_pretrained`` and measure what was saved.

Each step reads and updates one ``Build`` and returns what it adds to the report.

The result is ``<cache>/compressed/<key>/`` (``compressor.cache``): ``config.json``,
``model.safetensors``, the tokenizer files, ``recipe.toml`` and the compression report
(``compression.json``, ``compression.md``). It is built in ``<key>.partial`` and renamed when
complete, under a lock, so a crash or a concurrent build never leaves a folder that looks finished.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from compressor.bridge import bridge_gaps
from compressor.cache import PIPELINE_VERSION, as_recipe, compressed_folder, record_build, shipped_recipe
from compressor.distill import hidden_layer_map
from compressor.emulator import Middle, distill_middle, emulator_blocks, emulator_layout, middle_error
from compressor.evaluate import TextScore, score_documents, teacher_score_cached
from compressor.heal import heal
from compressor.layers import (
    decoder_layers,
    drop_layers,
    kv_group_activation_scores,
    layer_importance,
    mlp_activation_scores,
    prune_heads,
    prune_mlp_neurons,
    select_layers,
)
from compressor.lowrank import LowRankLinear, factorize_model
from compressor.magnitude import Masks, apply_masks, linear_sparsity, magnitude_masks
from compressor.measure import parameter_count, sparse_nbytes, storage_bytes
from compressor.progress import Progress, quiet_transformers, stage
from compressor.quantize import cast_base
from compressor.recipe import Recipe, RecipeError, load_recipe
from compressor.report import REPORT_JSON, REPORT_MD, render_markdown
from compressor.sharing import share_layers
from compressor.texts import client_eval_documents, client_pool, count_tokens, encode_documents, public_texts, token_blocks
from compressor.topk import TopKStore, topk_store_path
from compressor.vocab import trim_vocabulary, used_token_ids, word_form_ids
from shared.base_files import compressed_recipe, default_cache_dir, is_built, is_recipe_name
from shared.base_model import DTYPES, load_model, load_tokenizer, materialize_base, weights_hash
from shared.device import Device, resolve_device
from shared.training import TokenBlocks, evaluate

RECIPE_FILE = "recipe.toml"
CALIBRATION_BATCH = 4


def build_compressed_base(
    recipe: Recipe | str | Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    force: bool = False,
    device: Device = Device.AUTO,
) -> Path:
    """The compressed base folder for ``recipe`` (a Recipe or a TOML path; the shipped default if None).

    Returned at once if already built under ``cache_dir`` (``default_cache_dir()`` by default), else
    built into ``<key>.partial`` and renamed (see the module docstring). ``force`` rebuilds. Either
    way the folder is recorded as its recipe file's build, where ``shared.base_model`` finds it.
    ``device`` is where healing runs (DeviceUnavailable for ``cuda`` without one); it is not part of
    the cache key: a base built on either is the recipe's base.
    """
    where = resolve_device(device)  # before anything, cached or not: a wrong --device is an error either way
    recipe = as_recipe(recipe)
    folder = compressed_folder(recipe, cache_dir)
    if not is_built(folder) or force:
        _build_under_lock(recipe, folder, Path(cache_dir or default_cache_dir()), progress, force, where)
    record_build(recipe, folder, cache_dir)
    return folder


def prepare_base(spec: str, device: Device = Device.AUTO) -> tuple[Path | str, list[str]]:
    """(folder or hub id the federation loads, plays the base was healed on) for a base spec.

    A compressed spec (``compressed[:recipe.toml]``, ``compressed:<shipped recipe name>``,
    ``emulator``) is built once (healing on ``device``), then cached; any other is
    resolved by ``shared.base_model``. Callers keep the returned plays out of the federation: the
    base has already seen them.
    """
    recipe = compressed_recipe(spec)
    if recipe is None:
        return materialize_base(spec), []
    loaded = load_recipe(shipped_recipe(recipe) if is_recipe_name(recipe) else recipe or None)
    return build_compressed_base(loaded, device=device), list(loaded.public_plays)


def _build_under_lock(recipe: Recipe, folder: Path, cache_dir: Path, progress: bool, force: bool,
                      device: torch.device) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same key waits, then finds it built
        if is_built(folder) and not force:
            return
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed build
        with Progress(progress) as reporter, quiet_transformers():
            build = Build(recipe, folder.name, partial, cache_dir, reporter, device)
            for step in STEPS:
                build.add(step(build))
            build.write_report()
            if folder.exists():
                shutil.rmtree(folder)
            partial.rename(folder)
            reporter.log(f"[bold green]compressed base ready:[/] {folder}")


# --- the state the steps share ---------------------------------------------------------------------


@dataclass
class Build:
    """One build in progress: the recipe, the models and texts so far, and the report being written."""

    recipe: Recipe
    key: str
    out: Path
    cache_dir: Path
    progress: Progress
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where healing runs
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    teacher: PreTrainedModel | None = None  # the (vocabulary-trimmed) teacher, kept only to distill
    teacher_tokenizer: PreTrainedTokenizerBase | None = None
    student: PreTrainedModel | None = None
    student_tokenizer: PreTrainedTokenizerBase | None = None
    public: list[str] = field(default_factory=list)  # the public plays the vocabulary comes from
    public_rest: list[str] = field(default_factory=list)  # the other public plays
    client: list[list[str]] = field(default_factory=list)  # the client documents measured
    teacher_eval_tokens: int = 0
    teacher_score: TextScore | None = None
    blocks: torch.Tensor | None = None  # public blocks, in the student's ids once trimmed
    train_blocks: torch.Tensor | None = None
    public_val: torch.Tensor | None = None
    calibration: torch.Tensor | None = None
    keep_indices: list[int] = field(default_factory=list)
    masks: Masks = field(default_factory=list)
    in_memory_params: int = 0

    def stage(self, name: str, message: str) -> AbstractContextManager[None]:
        """Time a stage of the build under ``timings[name]``, announcing it with ``message``."""
        return stage(self.timings, name, self.progress, message)

    def bad(self, key: str, message: str) -> RecipeError:
        """A recipe error naming the recipe's file and ``key``."""
        return RecipeError(f"{self.recipe.source or 'recipe'}: {key}: {message}")

    def calibration_batches(self) -> list[torch.Tensor]:
        """The calibration blocks in batches, for activation and importance scores."""
        return list(self.calibration.split(CALIBRATION_BATCH))

    def add(self, entries: dict[str, Any]) -> None:
        """Merge a step's report entries: a technique is appended, a table updated, anything else set."""
        if "technique" in entries:
            self.report.setdefault("techniques", []).append(entries)
            return
        for name, value in entries.items():
            if isinstance(value, dict) and isinstance(self.report.get(name), dict):
                self.report[name].update(value)
            else:
                self.report[name] = value

    def write_report(self) -> None:
        """Complete the report with the build's totals and write it as JSON and Markdown."""
        report = self.report
        report.setdefault("techniques", [])
        report["public_plays"] = list(self.recipe.public_plays)
        report["timings"] = self.timings
        report["build_seconds"] = round(time.perf_counter() - self.start, 1)
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        report["recipe"] = self.recipe.to_dict()
        report["recipe_source"] = self.recipe.source
        (self.out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (self.out / REPORT_MD).write_text(render_markdown(report))
        self.progress.log(f"{report['teacher']['parameters'] / 1e6:.1f}M -> {report['student']['parameters'] / 1e6:.1f}M "
                          f"parameters ({report['ratios']['parameters']}x fewer); perplexity per teacher token "
                          f"{report['eval']['teacher']['ppl_per_teacher_token']:.2f} -> "
                          f"{report['eval']['student']['ppl_per_teacher_token']:.2f} "
                          f"({report['ratios']['perplexity']}x); built in {report['build_seconds']} s")


# --- the steps -------------------------------------------------------------------------------------


def begin_report(build: Build) -> dict[str, Any]:
    torch.manual_seed(build.recipe.seed)
    return {"key": build.key, "recipe_name": build.recipe.name, "pipeline_version": PIPELINE_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": _machine()}


def load_teacher(build: Build) -> dict[str, Any]:
    spec = build.recipe.teacher
    with build.stage("load_teacher", f"loading teacher {spec!r}"):
        source = materialize_base(spec)  # GGUF converted once into the shared cache
        build.teacher, build.teacher_tokenizer = load_model(spec), load_tokenizer(spec)
        teacher = {"spec": spec, "source": str(source), "parameters": parameter_count(build.teacher),
                   "storage_bytes": storage_bytes(source) if Path(str(source)).is_dir() else None,
                   "weights_hash": weights_hash(build.teacher), **_model_shape(build.teacher)}
    return {"teacher": teacher}


def score_teacher(build: Build) -> dict[str, Any]:
    recipe = build.recipe
    with build.stage("text", f"reading public plays {list(recipe.public_plays)} and client test text"):
        build.public = public_texts(recipe, recipe.vocab_plays)
        build.public_rest = public_texts(recipe, [p for p in recipe.public_plays if p not in recipe.vocab_plays])
        build.client = client_eval_documents(recipe)
        build.teacher_eval_tokens = sum(len(ids) - 1 for ids in encode_documents(build.teacher_tokenizer, build.client))
    speeches = sum(len(document) for document in build.client)
    with build.stage("eval_teacher", f"teacher perplexity on {speeches} client test speeches"):
        build.teacher_score, cached = teacher_score_cached(build.teacher, build.teacher_tokenizer, build.client,
                                                           build.report["teacher"]["weights_hash"], build.cache_dir)
    # Public blocks in the teacher's ids. The trimmed tokenizer reproduces the teacher's tokenization
    # of any text whose tokens were all kept, so these are the student's blocks after renumbering.
    if build.public:
        build.blocks = token_blocks(build.teacher_tokenizer, build.public, recipe.heal.seq_len)
    build.student_tokenizer = build.teacher_tokenizer
    return {"eval": {"speeches": speeches, "documents": len(build.client), "min_speeches": recipe.eval.min_speeches,
                     "seed": recipe.eval.seed, "teacher_tokens": build.teacher_eval_tokens,
                     "teacher_score_from_cache": cached, "teacher": build.teacher_score.as_dict()}}


def trim_vocab(build: Build) -> dict[str, Any]:
    recipe, tokenizer = build.recipe, build.teacher_tokenizer
    if not recipe.vocab.trim:
        return {}
    with build.stage("vocab", "trimming the vocabulary to the public text's tokens"):
        used = used_token_ids(tokenizer, build.public)
        word_forms = word_form_ids(tokenizer, build.public, recipe.vocab.word_forms) - used
        lowest = set(range(min(recipe.vocab.lowest_ids, len(tokenizer)))) - used - word_forms
        build.teacher, build.student_tokenizer, kept = trim_vocabulary(build.teacher, tokenizer, used | word_forms | lowest)
        _renumber_blocks(build, kept)
        client_all = client_pool(recipe)
        before_tokens = count_tokens(tokenizer, client_all)
        after_tokens = count_tokens(build.student_tokenizer, client_all)
    teacher_vocab = build.report["teacher"]["vocab_size"]
    build.progress.log(f"vocabulary {teacher_vocab} -> {len(kept)} ids; client text needs "
                       f"{after_tokens / before_tokens:.3f}x the tokens")
    return {"technique": "vocab", "plays": list(recipe.vocab_plays), "used_ids": len(used),
            "word_forms": list(recipe.vocab.word_forms), "word_form_ids": len(word_forms),
            "lowest_ids": recipe.vocab.lowest_ids, "lowest_ids_added": len(lowest), "kept_ids": len(kept),
            "teacher_vocab": teacher_vocab, "client_texts": len(client_all), "client_tokens_teacher": before_tokens,
            "client_tokens_student": after_tokens, "client_token_inflation": round(after_tokens / before_tokens, 4)}


def _renumber_blocks(build: Build, kept: list[int]) -> None:
    """The public blocks in the trimmed vocabulary's ids."""
    blocks = build.blocks
    size = max(max(kept), int(blocks.max()) if blocks is not None else 0) + 1
    old_to_new = torch.full((size,), -1, dtype=torch.long)
    old_to_new[torch.tensor(kept)] = torch.arange(len(kept))
    if blocks is not None:
        build.blocks = old_to_new[blocks]
        if (build.blocks < 0).any():
            raise RuntimeError("the trimmed vocabulary lost a token of the vocabulary's public text")


def split_public_blocks(build: Build) -> dict[str, Any]:
    """Held-out, training and calibration blocks of the public text, and the student to compress.

    From here ``build.teacher`` is the (trimmed) teacher: the same function on the kept ids.
    """
    recipe, settings = build.recipe, build.recipe.heal
    if build.public_rest:  # public plays outside the vocabulary's: the trimmed tokenizer spells them
        rest = token_blocks(build.student_tokenizer, build.public_rest, settings.seq_len)
        build.blocks = rest if build.blocks is None else torch.cat([build.blocks, rest])
    if build.blocks is not None:
        generator = torch.Generator().manual_seed(recipe.seed)
        shuffled = build.blocks[torch.randperm(len(build.blocks), generator=generator)]
        held = min(settings.eval_blocks, max(len(shuffled) // 5, 1))
        build.public_val, build.train_blocks = shuffled[:held], shuffled[held:]
        if len(build.train_blocks) == 0:
            build.train_blocks = build.public_val
        build.calibration = build.train_blocks[: recipe.calibration_blocks]
    if settings.uses_teacher or (recipe.emulator.enabled and settings.steps > 0):
        build.student = copy.deepcopy(build.teacher)
        if settings.teacher_dtype != "float32":
            cast_base(build.teacher, DTYPES[settings.teacher_dtype])
    else:  # the student is built from the teacher in place: no second copy in memory
        build.student, build.teacher = build.teacher, None
    build.keep_indices = list(range(len(decoder_layers(build.student))))
    return {}


def drop_blocks(build: Build) -> dict[str, Any]:
    layers, student = build.recipe.layers, build.student
    if build.recipe.emulator.enabled:
        return _emulator_blocks(build)
    if layers.keep is None:
        return {}
    num_layers = len(build.keep_indices)
    if layers.keep > num_layers:
        raise build.bad("layers.keep", f"{layers.keep}, but the teacher has {num_layers} blocks")
    with build.stage("layers", f"keeping {layers.keep} of {num_layers} blocks ({layers.how})"):
        scores = layer_importance(student, build.calibration_batches()) if layers.how == "importance" else None
        build.keep_indices = select_layers(num_layers, layers.keep, layers.how, scores)
        bridges = bridge_gaps(student, build.keep_indices, build.calibration) if layers.bridge else None
        drop_layers(student, build.keep_indices)
    return {"technique": "layers", "how": layers.how, "kept": build.keep_indices,
            "scores": [round(s, 4) for s in scores] if scores else None, "bridges": bridges}


def _emulator_blocks(build: Build) -> dict[str, Any]:
    """An emulator's blocks: the teacher's edges, and ``layers.keep`` of the middle blocks."""
    layers, section, student = build.recipe.layers, build.recipe.emulator, build.student
    num_layers = len(build.keep_indices)
    with build.stage("layers", f"emulator: {section.first_blocks} + {section.last_blocks} of the teacher's "
                     f"{num_layers} blocks kept exactly, the middle compressed"):
        scores = (layer_importance(student, build.calibration_batches())
                  if layers.how == "importance" and layers.keep is not None else None)
        try:
            build.keep_indices = emulator_blocks(num_layers, section, layers.keep, layers.how, scores)
        except ValueError as error:
            raise build.bad("emulator", str(error)) from None
        gaps = [a for a, b in zip(build.keep_indices, build.keep_indices[1:]) if b > a + 1]
        if layers.bridge and gaps and gaps[0] < section.first_blocks:
            raise build.bad("layers.bridge", f"the bridge would change edge block {gaps[0]}: keep the first middle "
                            f"block (block {section.first_blocks}), e.g. with layers.how = \"even\"")
        bridges = bridge_gaps(student, build.keep_indices, build.calibration) if layers.bridge else None
        drop_layers(student, build.keep_indices)
    layout = emulator_layout(build.recipe, build.keep_indices)
    return {"technique": "emulator", "how": layers.how, "kept": build.keep_indices,
            "teacher_layers": list(layout.teacher_layers), "adapter_layers": list(layout.adapter_layers),
            "scores": [round(s, 4) for s in scores] if scores else None, "bridges": bridges}


def prune_kv_heads(build: Build) -> dict[str, Any]:
    heads, student = build.recipe.heads, build.student
    if heads.keep_kv_heads is None:
        return {}
    kv_heads = student.config.num_key_value_heads
    if heads.keep_kv_heads > kv_heads:
        raise build.bad("heads.keep_kv_heads", f"{heads.keep_kv_heads}, but the teacher has {kv_heads}")
    with build.stage("heads", f"keeping {heads.keep_kv_heads} of {kv_heads} KV groups per block"):
        scores = (kv_group_activation_scores(student, build.calibration_batches())
                  if heads.scores == "activation" else None)
        prune_heads(student, keep_kv_heads=heads.keep_kv_heads, scores=scores)
    return {"technique": "heads", "kv_heads": [kv_heads, heads.keep_kv_heads], "scores": heads.scores}


def prune_mlp(build: Build) -> dict[str, Any]:
    mlp, student = build.recipe.mlp, build.student
    if mlp.keep_ratio is None:
        return {}
    before = student.config.intermediate_size
    with build.stage("mlp", f"keeping {mlp.keep_ratio:.0%} of the MLP neurons"):
        scores = mlp_activation_scores(student, build.calibration_batches()) if mlp.scores == "activation" else None
        prune_mlp_neurons(student, mlp.keep_ratio, scores=scores)
    return {"technique": "mlp", "intermediate_size": [before, student.config.intermediate_size], "scores": mlp.scores}


def factorize(build: Build) -> dict[str, Any]:
    lowrank, student = build.recipe.lowrank, build.student
    if not lowrank.enabled:
        return {}
    dense = parameter_count(student)
    with build.stage("lowrank", "factorizing projections by truncated SVD"):
        factorize_model(student, lowrank.modules, rank=lowrank.rank, energy=lowrank.energy)
    ranks = sorted({m.rank for m in student.modules() if isinstance(m, LowRankLinear)})
    return {"technique": "lowrank", "modules": list(lowrank.modules), "ranks": ranks, "parameters_dense": dense,
            "parameters_factored": parameter_count(student),
            "note": "saved as dense weights of rank <= r: no saving on disk or after a plain load"}


def share_blocks(build: Build) -> dict[str, Any]:
    sharing, student = build.recipe.sharing, build.student
    if not sharing.groups:
        return {}
    layers_now = len(decoder_layers(student))
    bad = [i for group in sharing.groups for i in group if i >= layers_now]
    if bad:
        raise build.bad("sharing.groups", f"block indices {bad} do not exist; the student has {layers_now} "
                        "blocks (indices count after layer dropping)")
    before = parameter_count(student)
    groups = [list(g) for g in sharing.groups]
    share_layers(student, groups, init=sharing.init)
    return {"technique": "sharing", "groups": groups, "init": sharing.init, "parameters_unshared": before,
            "parameters_shared": parameter_count(student),
            "note": "saved untied: the saving is in memory only, after share_layers on load"}


def zero_smallest(build: Build) -> dict[str, Any]:
    """The magnitude masks; the technique's entry is written after healing (``magnitude_entry``)."""
    magnitude = build.recipe.magnitude
    if magnitude.sparsity > 0:
        with build.stage("magnitude", f"zeroing {magnitude.sparsity:.0%} of the weights"):
            build.masks = magnitude_masks(build.student, magnitude.sparsity, magnitude.modules, magnitude.scope)
    build.in_memory_params = parameter_count(build.student)
    return {"student_in_memory_parameters": build.in_memory_params}


def heal_student(build: Build) -> dict[str, Any]:
    settings, student = build.recipe.heal, build.student
    if settings.steps == 0:
        build.teacher = None
        return {}
    if build.recipe.emulator.enabled:
        return _distill_emulator(build)
    with build.stage("eval_before_heal", "student perplexity before healing"):
        before = score_documents(student, build.student_tokenizer, build.client, reference_tokens=build.teacher_eval_tokens)
        val_before = _public_loss(student, build.public_val)
    build.progress.log(f"before healing: ppl/teacher-token {before.as_dict()['ppl_per_teacher_token']:.2f} "
                       f"(teacher {build.teacher_score.as_dict()['ppl_per_teacher_token']:.2f})")
    store = _topk_store(build)
    layer_map = hidden_layer_map(build.keep_indices) if settings.hidden_weight > 0 else None
    budget = _heal_budget(build)
    with build.stage("heal", f"healing: up to {settings.steps} steps" + (f" or {budget:.0f} s" if budget is not None else "")
                     + f" on {build.device}"), on_device(build):
        stats = heal(student, build.train_blocks, build.recipe, build.teacher, layer_map, build.masks, store,
                     build.progress, budget)
        if store is not None:
            store.save()
            stats["topk_cache"] = {"blocks_loaded": store.loaded, "blocks_computed": store.computed, "k": store.k}
        stats["device"] = str(build.device)
        stats["public_train_blocks"] = len(build.train_blocks)
        stats["public_val_blocks"] = len(build.public_val)
        stats["public_val_loss_before"] = round(val_before, 4)
        stats["public_val_loss_after"] = round(_public_loss(student, build.public_val), 4)
    build.progress.log(f"healed {stats['steps_done']} steps in {stats['seconds']} s ({stats['stopped_by']}); public "
                       f"loss {stats['public_val_loss_before']} -> {stats['public_val_loss_after']}")
    build.teacher = None
    return {"eval": {"student_before_heal": before.as_dict()}, "heal": stats}


def _distill_emulator(build: Build) -> dict[str, Any]:
    """Train an emulator's middle to reproduce the teacher's hidden state leaving it (``compressor.emulator``)."""
    student, teacher = build.student, build.teacher
    middle = Middle.of(build.recipe.emulator, build.report["teacher"]["layers"], len(build.keep_indices))
    with build.stage("eval_before_heal", "emulator perplexity and middle error before distilling"):
        before = score_documents(student, build.student_tokenizer, build.client, reference_tokens=build.teacher_eval_tokens)
        val_before = _public_loss(student, build.public_val)
        error_before = middle_error(student, teacher, middle, build.public_val)
    build.progress.log(f"before distilling: ppl/teacher-token {before.as_dict()['ppl_per_teacher_token']:.2f}, "
                       f"middle's relative error {error_before:.4f}")
    budget = _heal_budget(build)
    steps = build.recipe.heal.steps
    with build.stage("heal", f"distilling the middle: up to {steps} steps" +
                     (f" or {budget:.0f} s" if budget is not None else "") + f" on {build.device}"), on_device(build):
        stats = distill_middle(student, teacher, build.train_blocks, build.recipe, middle, budget, build.progress)
        stats["device"] = str(build.device)
        stats["public_train_blocks"] = len(build.train_blocks)
        stats["public_val_blocks"] = len(build.public_val)
        stats["public_val_loss_before"] = round(val_before, 4)
        stats["public_val_loss_after"] = round(_public_loss(student, build.public_val), 4)
        stats["middle_error_before"] = round(error_before, 4)
        stats["middle_error_after"] = round(middle_error(student, teacher, middle, build.public_val), 4)
    build.progress.log(f"distilled {stats['steps_done']} steps in {stats['seconds']} s ({stats['stopped_by']}); "
                       f"middle's relative error {stats['middle_error_before']} -> {stats['middle_error_after']}")
    build.teacher = None
    return {"eval": {"student_before_heal": before.as_dict()}, "heal": stats}


@contextmanager
def on_device(build: Build) -> Iterator[None]:
    """The student and the teacher on the build's device inside; both back on the CPU after (saved from there)."""
    for model in (build.student, build.teacher):
        if model is not None:
            model.to(build.device)
    try:
        yield
    finally:
        build.student.to("cpu")
        if build.teacher is not None:
            build.teacher.to("cpu")


def _public_loss(model: PreTrainedModel, blocks: torch.Tensor) -> float:
    return evaluate(model, TokenBlocks.unpadded(blocks))["loss"]


def _topk_store(build: Build) -> TopKStore | None:
    """The teacher's cached top-k logits when the recipe distills from them, else None."""
    settings = build.recipe.heal
    if build.teacher is None or settings.kd_topk == 0 or settings.kd_alpha == 0:
        return None
    path = topk_store_path(build.cache_dir, {
        "teacher": build.report["teacher"]["weights_hash"], "trimmed": parameter_count(build.teacher),
        "dtype": settings.teacher_dtype,
        "vocab": hashlib.sha256(build.student_tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "blocks": hashlib.sha256(build.train_blocks.numpy().tobytes()).hexdigest(), "k": settings.kd_topk,
    })
    return TopKStore(path, build.train_blocks, settings.kd_topk)


def _heal_budget(build: Build) -> float | None:
    """Healing's time budget: the recipe's, within what is left of the whole build's."""
    budget = build.recipe.heal.time_budget_s
    if build.recipe.time_budget_s is None:
        return budget
    # What is left of the build's budget, less a reserve for measuring the saved student (about what
    # measuring it before healing took) and saving it.
    reserve = 1.5 * build.timings["eval_before_heal"] + 15.0
    left = max(build.recipe.time_budget_s - (time.perf_counter() - build.start) - reserve, 0.0)
    return left if budget is None else min(budget, left)


def magnitude_entry(build: Build) -> dict[str, Any]:
    magnitude = build.recipe.magnitude
    if not build.masks:
        return {}
    apply_masks(build.masks)
    return {"technique": "magnitude", "sparsity_requested": magnitude.sparsity,
            "sparsity_measured": round(linear_sparsity(build.student, magnitude.modules), 4),
            "scope": magnitude.scope, "modules": list(magnitude.modules),
            "sparse_bytes_estimate": sparse_nbytes(build.student),
            "note": "zeros stored densely: disk and memory unchanged; sparse_bytes_estimate is "
                    "what a bitmask sparse format would take"}


def save_student(build: Build) -> dict[str, Any]:
    recipe, out = build.recipe, build.out
    with build.stage("save", f"saving ({recipe.output.dtype}) to {out}"):
        if recipe.output.dtype != "float32":
            cast_base(build.student, DTYPES[recipe.output.dtype])
        out.mkdir(parents=True)
        build.student.save_pretrained(out)
        build.student_tokenizer.save_pretrained(out)
        if recipe.emulator.enabled:
            emulator_layout(recipe, build.keep_indices).save(out)
        (out / RECIPE_FILE).write_text(
            f"# recipe {recipe.name!r} as built (key {build.key}); source: {recipe.source}\n" + recipe.to_toml()
        )
    build.student = None
    return {}


def measure_saved(build: Build) -> dict[str, Any]:
    with build.stage("eval_student", "reloading the saved folder and measuring it"):
        loaded = AutoModelForCausalLM.from_pretrained(build.out)
        loaded.eval()
        loaded_tokenizer = AutoTokenizer.from_pretrained(build.out)
        score = score_documents(loaded, loaded_tokenizer, build.client, reference_tokens=build.teacher_eval_tokens)
        student = {"parameters": parameter_count(loaded), "parameters_in_memory": build.in_memory_params,
                   "storage_bytes": storage_bytes(build.out),
                   "dtype": str(next(loaded.parameters()).dtype).replace("torch.", ""),
                   "weights_hash": weights_hash(loaded), **_model_shape(loaded)}
    teacher = build.report["teacher"]
    ratios = {
        "parameters": round(teacher["parameters"] / student["parameters"], 3),
        "parameters_in_memory": round(teacher["parameters"] / build.in_memory_params, 3),
        "storage": round(teacher["storage_bytes"] / student["storage_bytes"], 3) if teacher["storage_bytes"] else None,
        "perplexity": round(score.as_dict()["ppl_per_teacher_token"] / build.teacher_score.as_dict()["ppl_per_teacher_token"], 4),
    }
    return {"student": student, "eval": {"student": score.as_dict()}, "ratios": ratios}


STEPS: tuple[Callable[[Build], dict[str, Any]], ...] = (
    begin_report, load_teacher, score_teacher, trim_vocab, split_public_blocks, drop_blocks, prune_kv_heads, prune_mlp,
    factorize, share_blocks, zero_smallest, heal_student, magnitude_entry, save_student, measure_saved,
)


# --- report helpers ---------------------------------------------------------------------------------


def _model_shape(model: PreTrainedModel) -> dict[str, Any]:
    config = model.config
    return {
        "layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _machine() -> dict[str, Any]:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = None
    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": memory,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
    }

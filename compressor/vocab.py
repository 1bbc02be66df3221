"""Vocabulary trimming: shrink a byte-level BPE language model to the tokens a corpus uses.

SmolLM2's 49152-token vocabulary costs 28M of its 135M parameters (the tied embedding), and a
federation that only ever sees, say, Shakespeare uses a small fraction of it. Trimming keeps the
embedding and output-head rows of the tokens worth keeping, renumbers them ``0..n-1`` (in old-id
order) and rebuilds the tokenizer to match.

What is always kept, whatever the corpus:

- every added/special token, and the ids named by the post-processor and the model config;
- the BPE *alphabet*: every vocabulary token that no merge produces. For a byte-level BPE these are
  the single-byte tokens, so any string still tokenizes (into smaller pieces if need be);
- the *merge ancestors* of every kept token: BPE builds a token through a chain of merges
  (``t+h -> th``, ``th+e -> the``), and each intermediate must stay in the vocabulary for the chain to
  work. Keeping them makes the trimmed tokenizer reproduce the old tokenization exactly on any text
  whose tokens were all kept (each old merge step is still available, and removing merges that never
  fired cannot change which merge has the lowest rank).

The merge table keeps exactly the merges whose two parts and result are kept; every other merge is
removed, so the tokenizer can never produce a dropped token.

Unreachable tokens: a kept token can be impossible to produce (it was unreachable in the original,
which happens in real vocabularies, or ``keep_ids`` named such a token). With
``drop_unreachable=True`` (the default) such tokens are found by encoding each kept token's own
string with the trimmed BPE model: a token arises in some input iff it arises from its own string,
since merges inside its span happen in the same order without neighbours. Those that do not are
dropped (with their merges) until nothing changes; this never changes any tokenization, it only
saves rows. Special tokens and the alphabet are never dropped.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

WORD_FORMS = ("as-is", "lower", "capitalized", "upper")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_FORMS = {"as-is": lambda word: word, "lower": str.lower, "capitalized": str.capitalize, "upper": str.upper}
SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


def used_token_ids(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], batch_size: int = 64) -> set[int]:
    """The ids the tokenizer produces on ``texts`` (special tokens are not added: they are kept anyway)."""
    used: set[int] = set()
    remaining = iter(texts)
    while batch := list(islice(remaining, batch_size)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            used.update(ids)
    return used


def word_form_ids(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], forms: Iterable[str]) -> set[int]:
    """The ids of every word of ``texts`` written in each of ``forms`` (``WORD_FORMS``), alone and after a space.

    A byte-level BPE has one token for "Love" at a line start and another for " love" mid-line; the
    text a vocabulary is taken from shows each word in only some of those spellings.
    """
    unknown = sorted(set(forms) - set(WORD_FORMS))
    if unknown:
        raise ValueError(f"unknown word forms {unknown}: expected some of {list(WORD_FORMS)}")
    words = {word for text in texts for word in _WORD.findall(text)}
    spellings = {_FORMS[form](word) for form in forms for word in words}
    return used_token_ids(tokenizer, sorted(spellings | {" " + spelled for spelled in spellings}))


def trim_vocabulary(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    keep_ids: Iterable[int],
    drop_unreachable: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, list[int]]:
    """A copy of ``model`` and a rebuilt tokenizer restricted to ``keep_ids`` (plus what must stay).

    Returns ``(new_model, new_tokenizer, kept_old_ids)``: new id ``i`` is old id ``kept_old_ids[i]``.
    ``model`` and ``tokenizer`` are left untouched. See the module docstring for what is kept.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = _check_bpe(spec["model"])
    vocab: dict[str, int] = bpe["vocab"]
    merges = [_merge_pair(merge) for merge in bpe["merges"]]
    old_tokens = {token_id: token for token, token_id in vocab.items()}
    old_tokens.update({added["id"]: added["content"] for added in spec["added_tokens"]})
    rows = model.get_input_embeddings().weight.shape[0]

    requested = set(keep_ids)
    unknown = sorted(i for i in requested if i not in old_tokens or i >= rows)
    if unknown:
        raise ValueError(f"keep_ids not in the vocabulary (or beyond the model's {rows} rows): {unknown[:10]}")
    protected = _protected_ids(model, tokenizer, spec, merges) & old_tokens.keys()
    kept = _with_merge_ancestors(requested | protected, vocab, merges)

    while True:
        old_to_new = {old: new for new, old in enumerate(sorted(kept))}
        backend = Tokenizer.from_str(json.dumps(_trimmed_spec(spec, merges, old_to_new)))
        dead = _unreachable(backend, vocab, old_to_new, protected) if drop_unreachable else set()
        if not dead:
            break
        kept -= dead

    kept_old_ids = sorted(kept)
    _check_added_ids(backend, spec, old_to_new)
    new_model = _trimmed_model(model, kept_old_ids, old_to_new)
    return new_model, _wrap_like(tokenizer, backend), kept_old_ids


# --- tokenizer -------------------------------------------------------------------------------------


def _check_bpe(bpe: dict[str, Any]) -> dict[str, Any]:
    if bpe.get("type") != "BPE":
        raise ValueError(f"Only BPE tokenizers can be trimmed, not {bpe.get('type')!r}")
    # With a subword prefix/suffix a merge's result is not simply the concatenation of its parts.
    if bpe.get("continuing_subword_prefix") or bpe.get("end_of_word_suffix"):
        raise ValueError("BPE with continuing_subword_prefix or end_of_word_suffix is not supported")
    return bpe


def _merge_pair(merge: list[str] | str) -> tuple[str, str]:
    """A merge as ``(left, right)``: tokenizers >= 0.20 writes pairs, older files ``"left right"``."""
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    left, right = merge
    return left, right


def _protected_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, spec: dict[str, Any], merges: list[tuple[str, str]]
) -> set[int]:
    """Ids that are kept whatever the corpus: special tokens, the alphabet, ids named anywhere."""
    vocab = spec["model"]["vocab"]
    produced = {left + right for left, right in merges}
    protected = {token_id for token, token_id in vocab.items() if token not in produced}  # the alphabet
    protected |= {added["id"] for added in spec["added_tokens"]}
    protected |= set(tokenizer.all_special_ids)
    protected |= {container[key] for container, key in _post_processor_id_slots(spec["post_processor"])}
    if spec["model"].get("unk_token") in vocab:
        protected.add(vocab[spec["model"]["unk_token"]])
    for config in (model.config, model.generation_config):
        for field in SPECIAL_ID_FIELDS:
            protected.update(_as_list(getattr(config, field, None)))
    return protected


def _with_merge_ancestors(ids: set[int], vocab: dict[str, int], merges: list[tuple[str, str]]) -> set[int]:
    """``ids`` plus the parts of every merge producing one of them, recursively."""
    producers: dict[str, list[tuple[str, str]]] = {}
    for left, right in merges:
        producers.setdefault(left + right, []).append((left, right))
    tokens = {token_id: token for token, token_id in vocab.items()}
    closed = set(ids)
    pending = [tokens[i] for i in ids if i in tokens]  # added tokens outside the BPE vocab have no parts
    while pending:
        for pair in producers.get(pending.pop(), ()):
            for part in pair:
                if vocab[part] not in closed:
                    closed.add(vocab[part])
                    pending.append(part)
    return closed


def _trimmed_spec(spec: dict[str, Any], merges: list[tuple[str, str]], old_to_new: dict[int, int]) -> dict[str, Any]:
    """tokenizer.json content restricted to the kept ids, renumbered by ``old_to_new``."""
    vocab = {token: old_to_new[i] for token, i in spec["model"]["vocab"].items() if i in old_to_new}
    # A merge survives only if it can neither produce nor consume a dropped token.
    kept_merges = [[left, right] for left, right in merges if {left, right, left + right} <= vocab.keys()]
    bpe = {**spec["model"], "vocab": vocab, "merges": kept_merges}
    # Copy the rest deeply (it is small) so the caller's spec stays intact across iterations.
    spec = copy.deepcopy({key: value for key, value in spec.items() if key != "model"}) | {"model": bpe}
    for added in spec["added_tokens"]:
        added["id"] = old_to_new[added["id"]]  # tokenizers re-derives these on load; keep the file truthful
    for container, key in _post_processor_id_slots(spec["post_processor"]):
        container[key] = old_to_new[container[key]]
    if spec.get("padding") and "pad_id" in spec["padding"]:
        spec["padding"]["pad_id"] = old_to_new[spec["padding"]["pad_id"]]
    return spec


def _check_added_ids(backend: Tokenizer, spec: dict[str, Any], old_to_new: dict[int, int]) -> None:
    """Added tokens outside the BPE vocabulary get ids by their order on load; they must match ours."""
    for added in spec["added_tokens"]:
        if backend.token_to_id(added["content"]) != old_to_new[added["id"]]:
            raise ValueError(f"Added token {added['content']!r} would not keep its place after trimming")


def _post_processor_id_slots(processor: dict[str, Any] | None) -> Iterator[tuple[list[Any], int]]:
    """Every place the post-processor stores a token id, as (list, index) so it can be rewritten."""
    if not processor:
        return
    kind = processor.get("type")
    if kind == "Sequence":
        for inner in processor["processors"]:
            yield from _post_processor_id_slots(inner)
    elif kind == "TemplateProcessing":
        for special in processor["special_tokens"].values():
            yield from ((special["ids"], index) for index in range(len(special["ids"])))
    elif kind in ("BertProcessing", "RobertaProcessing"):
        yield processor["sep"], 1  # stored as [token, id]
        yield processor["cls"], 1


def _unreachable(
    backend: Tokenizer, vocab: dict[str, int], old_to_new: dict[int, int], protected: set[int]
) -> set[int]:
    """Old ids of kept BPE tokens that the trimmed model cannot produce, not even from their own string."""
    dead = set()
    for token, old_id in vocab.items():
        if old_id in old_to_new and old_id not in protected:
            pieces = backend.model.tokenize(token)
            if len(pieces) != 1 or pieces[0].id != old_to_new[old_id]:
                dead.add(old_id)
    return dead


def _wrap_like(tokenizer: PreTrainedTokenizerFast, backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around ``backend`` with ``tokenizer``'s special tokens and settings."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=tokenizer.chat_template,
        model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
        **tokenizer.special_tokens_map,
    )


# --- model -----------------------------------------------------------------------------------------


def _trimmed_model(model: PreTrainedModel, kept_old_ids: list[int], old_to_new: dict[int, int]) -> PreTrainedModel:
    """A copy of ``model`` whose embedding and head rows are those of ``kept_old_ids``, in that order."""
    index = torch.tensor(kept_old_ids, dtype=torch.long)
    # Hand deepcopy the trimmed rows in place of the full matrices: it then never copies those, and
    # a tied head (the same Parameter object) maps to the same trimmed Parameter, so it stays tied.
    head = model.get_output_embeddings()
    vocab_tensors = [model.get_input_embeddings().weight, getattr(head, "weight", None), getattr(head, "bias", None)]
    unique = {id(tensor): tensor for tensor in vocab_tensors if tensor is not None}
    model = copy.deepcopy(model, {key: _select_rows(tensor, index) for key, tensor in unique.items()})

    model.get_input_embeddings().num_embeddings = len(kept_old_ids)
    if model.get_output_embeddings() is not None:
        model.get_output_embeddings().out_features = len(kept_old_ids)
    model.config.get_text_config().vocab_size = len(kept_old_ids)
    for module in model.modules():  # the embedding, and e.g. LlamaModel, keep their own copies of these
        if isinstance(getattr(module, "vocab_size", None), int):
            module.vocab_size = len(kept_old_ids)
        if isinstance(getattr(module, "padding_idx", None), int):
            module.padding_idx = old_to_new.get(module.padding_idx)
    for config in (model.config, model.generation_config):
        for field in SPECIAL_ID_FIELDS:
            _remap_config_id(config, field, old_to_new)
    return model


def _select_rows(parameter: torch.nn.Parameter, index: torch.Tensor) -> torch.nn.Parameter:
    rows = parameter.detach().index_select(0, index.to(parameter.device))
    return torch.nn.Parameter(rows, requires_grad=parameter.requires_grad)


def _remap_config_id(config: Any, field: str, old_to_new: dict[int, int]) -> None:
    value = getattr(config, field, None)
    if value is None:
        return
    # Ids of real tokens were protected, so kept; an id outside the vocabulary (some configs use -1)
    # has no row, so it is cleared. eos may be a list of ids.
    remapped = [old_to_new[i] for i in _as_list(value) if i in old_to_new]
    setattr(config, field, remapped if isinstance(value, list) else next(iter(remapped), None))


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]

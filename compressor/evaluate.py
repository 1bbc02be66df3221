"""Scoring held-out client text: the perplexity a build reports for the teacher and the student.

Every document is scored whole, so the total NLL is the model's log-likelihood of exactly the same text
whatever its tokenizer; dividing it by the *teacher's* token count gives a perplexity comparable across
vocabularies (see ``compressor.report``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from compressor.cache import PIPELINE_VERSION
from compressor.texts import encode_documents
from shared.lm_loss import IGNORE_INDEX
from shared.training import TokenBlocks, next_token_sums

EVAL_TOKENS_PER_BATCH = 1024


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


def score_documents(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Sequence[str]],
    reference_tokens: int | None = None,
    tokens_per_batch: int = EVAL_TOKENS_PER_BATCH,
) -> TextScore:
    """Total NLL of every document, each scored whole as ``EOS s1 EOS s2 EOS ... EOS``.

    Every token after the leading EOS is predicted, and no block boundary cuts a document, so the
    total NLL is the model's log-likelihood of exactly the same text whatever the tokenizer.
    """
    encoded = encode_documents(tokenizer, documents)
    was_training = model.training
    try:
        total, _, _ = next_token_sums(model, _document_batches(encoded, tokenizer.eos_token_id, tokens_per_batch))
    finally:
        model.train(was_training)
    own = sum(len(ids) - 1 for ids in encoded)
    return TextScore(total, own, own if reference_tokens is None else reference_tokens)


def _document_batches(encoded: list[list[int]], pad: int, tokens_per_batch: int) -> Iterator[TokenBlocks]:
    """Documents by increasing length, as many per batch as fit in ``tokens_per_batch`` padded tokens."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    start = 0
    while start < len(order):
        longest = len(encoded[order[start]])
        end = start + 1
        while end < len(order) and len(encoded[order[end]]) * (end - start + 1) <= max(tokens_per_batch, longest):
            end += 1
        batch = [encoded[i] for i in order[start:end]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        yield TokenBlocks(input_ids, mask, input_ids.masked_fill(mask == 0, IGNORE_INDEX))
        start = end


def teacher_score_cached(
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Sequence[str]],
    teacher_hash: str,
    cache_dir: Path,
) -> tuple[TextScore, bool]:
    """The teacher's score on the documents, kept on disk by (teacher weights, text): (score, from cache).

    The teacher's NLL on a fixed text is a deterministic number, and scoring the teacher costs more
    than scoring a compressed student, so every build after the first reuses it.
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

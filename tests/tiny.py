"""Tiny causal LMs and tokenizers built inside the tests, so no hub is needed."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
import torch

SAMPLE_TEXT = [
    "When shall we three meet again in thunder, lightning, or in rain?",
    "When the hurlyburly's done, when the battle's lost and won.",
    "Fair is foul, and foul is fair: hover through the fog and filthy air.",
    "What bloody man is that? He can report, as seemeth by his plight.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind",
    "If music be the food of love, play on; give me excess of it.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar.",
    "All the world's a stage, and all the men and women merely players.",
    "The quality of mercy is not strain'd; it droppeth as the gentle rain.",
] * 20


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (like SmolLM2's) trained on a few lines of verse."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )


def build_model(vocab_size: int, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A Llama-architecture causal LM small enough to train in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


def build_base_folder(path: Path, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny model and tokenizer as a Hugging Face folder, as a user's base would be."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), num_layers=num_layers, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

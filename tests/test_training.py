import math

import torch

from shared.adapters import attach_adapter, lora_config
from shared.base_model import load_model, load_tokenizer
from shared.config import FederationConfig
from shared.training import IGNORE_INDEX, evaluate, tokenize_blocks, train_adapter

TEXTS = ["Fair is foul, and foul is fair.", "When shall we three meet again?", "All the world's a stage."] * 8


def test_blocks_are_the_eos_separated_stream_cut_and_padded(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    blocks = tokenize_blocks(tokenizer, ["ab", "cd ef"], seq_len=4)
    stream = tokenizer("ab", add_special_tokens=False).input_ids + [tokenizer.eos_token_id] \
        + tokenizer("cd ef", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    flat = blocks.input_ids.view(-1).tolist()
    assert flat[: len(stream)] == stream
    assert len(flat) == math.ceil(len(stream) / 4) * 4
    padded = len(flat) - len(stream)
    assert (blocks.labels.view(-1)[len(stream):] == IGNORE_INDEX).all()
    assert int(blocks.attention_mask.sum()) == len(stream)
    assert padded < 4


def test_evaluate_matches_a_hand_computed_cross_entropy(tiny_base):
    tokenizer, model = load_tokenizer(str(tiny_base)), load_model(str(tiny_base))
    blocks = tokenize_blocks(tokenizer, TEXTS[:3], seq_len=16)
    result = evaluate(model, blocks, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), -1)
    targets = blocks.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    assert math.isclose(result["loss"], nll.mean().item(), rel_tol=1e-4)
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-9)
    assert result["tokens"] == mask.sum().item() == blocks.num_tokens


def test_training_the_adapter_lowers_held_in_loss_and_leaves_the_base_alone(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    model = attach_adapter(load_model(str(tiny_base)), lora_config(FederationConfig(lora_r=4, lora_dropout=0.0)))
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    blocks = tokenize_blocks(tokenizer, TEXTS, seq_len=16)
    before = evaluate(model, blocks)["loss"]
    stats = train_adapter(model, blocks, steps=30, batch_size=4, learning_rate=1e-2)
    after = evaluate(model, blocks)["loss"]
    assert stats["train-steps"] == 30
    assert after < before - 0.1
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, base_before[name]), name

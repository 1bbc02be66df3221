import math

import pytest
import torch

from shared.adapters import attach_adapter, lora_config
from shared.base_model import load_model, load_tokenizer
from shared.config import FederationConfig
from shared.training import IGNORE_INDEX, evaluate, hold_out, tokenize_blocks, train_adapter

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


def test_hold_out_splits_the_blocks_into_two_disjoint_seeded_parts(tiny_base):
    blocks = tokenize_blocks(load_tokenizer(str(tiny_base)), TEXTS, seq_len=8)
    fit, validation = hold_out(blocks, 0.25, seed=3)
    assert len(validation) == round(len(blocks) * 0.25) and len(fit) + len(validation) == len(blocks)
    rows = {tuple(row) for row in blocks.input_ids.tolist()}
    assert {tuple(r) for r in fit.input_ids.tolist()} | {tuple(r) for r in validation.input_ids.tolist()} == rows
    again = hold_out(blocks, 0.25, seed=3)[1]
    assert torch.equal(again.input_ids, validation.input_ids)
    assert not torch.equal(hold_out(blocks, 0.25, seed=4)[1].input_ids, validation.input_ids)
    assert hold_out(blocks, 0.0) == (blocks, None)
    one = blocks.select([0])
    assert hold_out(one, 0.5)[1] is None  # nothing left to fit on: no validation
    assert len(hold_out(blocks.select([0, 1]), 0.01)[1]) == 1  # at least one block each side


def _adapted(tiny_base):
    torch.manual_seed(0)
    return attach_adapter(load_model(str(tiny_base)), lora_config(FederationConfig(lora_r=4, lora_dropout=0.0)))


def test_early_stopping_restores_the_checkpoint_with_the_lowest_validation_loss(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    fit = tokenize_blocks(tokenizer, TEXTS, seq_len=16)
    validation = tokenize_blocks(tokenizer, ["Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace."] * 3, 16)
    # The same run without validation gives the loss after the last step (training is deterministic).
    plain = _adapted(tiny_base)
    start = evaluate(plain, validation)["loss"]
    train_adapter(plain, fit, steps=12, batch_size=4, learning_rate=5e-2)
    end = evaluate(plain, validation)["loss"]
    assert start != end

    ends_only = _adapted(tiny_base)
    stats = train_adapter(ends_only, fit, steps=12, batch_size=4, learning_rate=5e-2, validation=validation,
                          validate_every=12)
    assert stats["best-step"] == (0 if start < end else 12)
    assert math.isclose(evaluate(ends_only, validation)["loss"], min(start, end), rel_tol=1e-6)

    every_step = _adapted(tiny_base)
    stats = train_adapter(every_step, fit, steps=12, batch_size=4, learning_rate=5e-2, validation=validation,
                          validate_every=1)
    kept = evaluate(every_step, validation)["loss"]
    assert math.isclose(kept, stats["validation-loss"], rel_tol=1e-6)
    assert kept <= min(start, end) + 1e-9
    assert stats["train-steps"] == 12 and stats["best-step"] < 12  # not the last step: restoring matters


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_micro_batches_give_the_whole_batch_update_and_never_see_more_blocks(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    blocks = tokenize_blocks(tokenizer, TEXTS, seq_len=16).select([0, 1, 2, 3, 4])
    # One block mostly padding: micro-batch losses must be weighted by tokens, not averaged per pass.
    blocks.labels[4, 3:] = IGNORE_INDEX
    blocks.attention_mask[4, 3:] = 0
    assert blocks.num_tokens < 5 * 15
    whole = _adapted(tiny_base)
    whole_stats = train_adapter(whole, blocks, steps=3, batch_size=5, learning_rate=1e-2)
    expected = _lora_tensors(whole)
    for micro in (1, 2):
        model = _adapted(tiny_base)
        seen: list[int] = []
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
        stats = train_adapter(model, blocks, steps=3, batch_size=5, learning_rate=1e-2, micro_batch_size=micro)
        assert max(seen) == micro and sum(seen) == 3 * 5
        assert math.isclose(stats["train-loss"], whole_stats["train-loss"], rel_tol=1e-5)
        for name, tensor in _lora_tensors(model).items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_non_finite_micro_batch_loss_stops_training_before_its_backward(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    blocks = tokenize_blocks(tokenizer, TEXTS, seq_len=16).select([0, 1, 2, 3])
    model = _adapted(tiny_base)
    before = _lora_tensors(model)
    calls = []

    def poison_second_pass(module, args, out):
        calls.append(1)
        return out * float("nan") if len(calls) == 2 else out

    model.get_input_embeddings().register_forward_hook(poison_second_pass)
    with pytest.raises(FloatingPointError, match="training loss became nan at step 1"):
        train_adapter(model, blocks, steps=2, batch_size=4, learning_rate=1e-2, micro_batch_size=2)
    assert len(calls) == 2
    for name, tensor in _lora_tensors(model).items():
        assert torch.equal(tensor, before[name]), name  # no optimizer step was taken


def test_the_seed_fixes_dropout_whatever_the_process_drew_before_and_the_caller_s_generator_is_untouched(tiny_base):
    # A resumed run trains in fresh processes: the global generator's position must not matter.
    tokenizer = load_tokenizer(str(tiny_base))
    blocks = tokenize_blocks(tokenizer, TEXTS, seq_len=16)
    lora = lora_config(FederationConfig(lora_r=4, lora_dropout=0.5))
    results = []
    for draws_before in (0, 1000):
        model = attach_adapter(load_model(str(tiny_base)), lora, seed=0)
        torch.manual_seed(123)
        torch.rand(draws_before)
        state_before = torch.get_rng_state()
        train_adapter(model, blocks, steps=3, batch_size=4, learning_rate=1e-2, seed=5)
        assert torch.equal(torch.get_rng_state(), state_before)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    other_seed = attach_adapter(load_model(str(tiny_base)), lora, seed=0)
    train_adapter(other_seed, blocks, steps=3, batch_size=4, learning_rate=1e-2, seed=6)
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name
    assert any(not torch.equal(p, results[0][n]) for n, p in other_seed.named_parameters() if p.requires_grad)

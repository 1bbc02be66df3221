"""The chunked next-token loss: the model's own loss and gradients, without the whole logits."""

import pytest
import torch
from peft import LoraConfig

from shared.adapters import attach_adapter
from shared.lm_loss import IGNORE_INDEX, ChunkedLinearCrossEntropy, _decoder_and_head, next_token_loss
from tiny import build_model

VOCAB = 300


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 40-token blocks, the second padded from position 30 on (mask 0, label ignored)."""
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(seed))
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[1, 30:], mask[1, 30:] = IGNORE_INDEX, 0
    return ids, mask, labels, torch.tensor(int((labels[:, 1:] != IGNORE_INDEX).sum()))


def _loss_and_grads(model, loss_fn) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _lora_model(base, targets=("q_proj", "v_proj")):
    base.requires_grad_(False)
    return attach_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM"))


def _models_own_loss(model, ids, mask, labels, count):
    return lambda: model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss


@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_equals_the_models_loss_and_lora_gradients(chunk):
    model = _lora_model(build_model(VOCAB))
    assert _decoder_and_head(model) is not None  # the chunked path is taken, not the fallback
    ids, mask, labels, count = _batch()
    expected, expected_grads = _loss_and_grads(model, _models_own_loss(model, ids, mask, labels, count))
    loss, grads = _loss_and_grads(model, lambda: next_token_loss(model, ids, mask, labels, count, chunk))
    assert loss == pytest.approx(expected, rel=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_a_trainable_tied_head_gets_its_gradient_too():
    model = build_model(VOCAB)  # full fine-tuning: embedding (tied to the head) trainable
    ids, mask, labels, count = _batch(1)
    expected, expected_grads = _loss_and_grads(model, _models_own_loss(model, ids, mask, labels, count))
    loss, grads = _loss_and_grads(model, lambda: next_token_loss(model, ids, mask, labels, count, 8))
    assert loss == pytest.approx(expected, rel=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_a_bfloat16_base_matches_within_bfloat16_rounding():
    model = _lora_model(build_model(VOCAB).to(torch.bfloat16))
    ids, mask, labels, count = _batch(2)
    expected, expected_grads = _loss_and_grads(model, _models_own_loss(model, ids, mask, labels, count))
    loss, grads = _loss_and_grads(model, lambda: next_token_loss(model, ids, mask, labels, count, 16))
    assert loss == pytest.approx(expected, rel=1e-3)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32  # the adapter stays fp32 on a bf16 base
        torch.testing.assert_close(grad, expected_grad, rtol=0.05, atol=0.02 * expected_grad.abs().max().item())


def test_a_lora_wrapped_head_falls_back_to_the_models_loss():
    model = _lora_model(build_model(VOCAB), targets=("q_proj", "lm_head"))
    assert _decoder_and_head(model) is None
    ids, mask, labels, count = _batch(3)
    expected, expected_grads = _loss_and_grads(model, _models_own_loss(model, ids, mask, labels, count))
    loss, grads = _loss_and_grads(model, lambda: next_token_loss(model, ids, mask, labels, count))
    assert loss == pytest.approx(expected, rel=1e-6)
    assert any(grad.abs().sum() > 0 for grad in grads)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_the_summed_loss_is_a_hand_computed_cross_entropy():
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, IGNORE_INDEX, 1, 1, IGNORE_INDEX, 2])
    summed = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 3)
    log_probs = torch.log_softmax(hidden @ weight.t(), dim=-1)
    counted = targets != IGNORE_INDEX
    by_hand = -log_probs[counted].gather(1, targets[counted].unsqueeze(1)).sum()
    assert summed.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert torch.autograd.gradcheck(
        lambda h, w: ChunkedLinearCrossEntropy.apply(h, w, targets, 4), (hidden, weight))

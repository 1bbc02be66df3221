"""Compression techniques on the tiny Llama: each must shrink what it claims and stay loadable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import build_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor.distill import distillation_loss, distillation_loss_topk, hidden_layer_map, hidden_state_loss
from compressor.layers import (
    LINEAR_NAMES,
    UnsupportedModelError,
    block_linear,
    drop_layers,
    kv_group_activation_scores,
    layer_importance,
    mlp_activation_scores,
    prune_heads,
    prune_mlp_neurons,
    select_layers,
    select_layers_by_importance,
)
from compressor.lowrank import LowRankLinear, densify_linear, factorize_model
from compressor.magnitude import linear_sparsity, magnitude_masks
from compressor.measure import parameter_count, peak_rss_subprocess, sparse_nbytes, storage_bytes
from compressor.quantize import cast_base
from compressor.sharing import share_layers
from compressor.topk import TopKStore
from shared.base_model import weights_hash
from shared.training import TokenBlocks, evaluate

VOCAB = 384


@pytest.fixture
def model() -> LlamaForCausalLM:
    return build_model(VOCAB, num_layers=4).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def reload(model: torch.nn.Module, folder: Path) -> LlamaForCausalLM:
    """Save, then load with plain from_pretrained, insisting that every weight was found."""
    model.save_pretrained(folder)
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


# --- layers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "num_layers", "keep", "expected"),
    [
        ("ends", 10, 5, [0, 1, 2, 8, 9]),
        ("ends", 30, 8, [0, 1, 2, 3, 26, 27, 28, 29]),
        ("ends", 4, 1, [0]),
        ("even", 30, 8, [0, 4, 8, 12, 17, 21, 25, 29]),
        ("even", 10, 4, [0, 3, 6, 9]),
        ("even", 5, 5, [0, 1, 2, 3, 4]),
        ("first", 10, 3, [0, 1, 2]),
    ],
)
def test_select_layers(how: str, num_layers: int, keep: int, expected: list[int]) -> None:
    assert select_layers(num_layers, keep, how) == expected


def test_select_layers_by_importance() -> None:
    scores = [0.9, 0.1, 0.5, 0.05, 0.7]
    assert select_layers_by_importance(scores, 3) == [0, 2, 4]
    assert select_layers(5, 2, "importance", scores=scores) == [0, 4]
    with pytest.raises(ValueError):
        select_layers(5, 2, "importance")
    with pytest.raises(ValueError):
        select_layers(5, 6, "ends")


def test_layer_importance_scores_every_block(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    scores = layer_importance(model, [tokens, tokens[:1]])
    assert len(scores) == 4
    assert all(0 < score < 2 for score in scores)


def test_drop_layers_saves_and_reloads(model: LlamaForCausalLM, tokens: torch.Tensor, tmp_path: Path) -> None:
    drop_layers(model, [0, 3])
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    before = logits(model, tokens)
    loaded = reload(model, tmp_path)
    assert loaded.config.num_hidden_layers == 2
    assert torch.equal(logits(loaded, tokens), before)
    # The KV cache is indexed by the renumbered blocks: cached decoding must match a full forward.
    with torch.no_grad():
        cache = model(input_ids=tokens[:, :-1], use_cache=True).cache
        last = model(input_ids=tokens[:, -1:], cache=cache).logits[:, -1]
    assert torch.allclose(last, before[:, -1], atol=1e-5)


def test_unsupported_architecture_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="llama"):
        drop_layers(gpt2, [0])
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_model(VOCAB), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UnsupportedModelError, match="before wrapping it with peft"):
        factorize_model(peft_model, rank=2)


def test_prune_heads_removes_whole_kv_groups(model: LlamaForCausalLM, tokens: torch.Tensor, tmp_path: Path) -> None:
    prune_heads(model, keep_kv_heads=1)  # 4 query heads on 2 KV heads -> 2 query heads on 1
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (16, 32)
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (8, 32)
    assert attention.o_proj.weight.shape == (32, 16)
    before = logits(model, tokens)
    assert torch.equal(logits(reload(model, tmp_path), tokens), before)


def test_prune_heads_keeps_the_scored_group(model: LlamaForCausalLM) -> None:
    q_rows_of_group_1 = model.model.layers[0].self_attn.q_proj.weight[16:32].clone()
    scores = [torch.tensor([0.0, 1.0])] * 4
    prune_heads(model, keep_ratio=0.5, scores=scores)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_rows_of_group_1)


def test_activation_scores_see_silenced_units(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:32] = 0  # KV group 1 (query heads 2, 3)
        model.model.layers[1].mlp.down_proj.weight[:, 5] = 0
    groups = kv_group_activation_scores(model, [tokens])
    neurons = mlp_activation_scores(model, [tokens, tokens[:1]])
    assert len(groups) == len(neurons) == 4
    assert groups[0].shape == (2,) and groups[0][1] == 0 < groups[0][0]
    assert neurons[1].shape == (64,) and neurons[1][5] == 0 and (neurons[1] > 0).sum() == 63
    prune_mlp_neurons(model, keep_ratio=0.5, scores=neurons)
    prune_heads(model, keep_kv_heads=1, scores=groups)
    assert logits(model, tokens).isfinite().all()


def test_prune_mlp_neurons(model: LlamaForCausalLM, tokens: torch.Tensor, tmp_path: Path) -> None:
    prune_mlp_neurons(model, keep_ratio=0.25)
    mlp = model.model.layers[0].mlp
    assert model.config.intermediate_size == 16
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (16, 32)
    assert mlp.down_proj.weight.shape == (32, 16)
    before = logits(model, tokens)
    assert torch.equal(logits(reload(model, tmp_path), tokens), before)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_masks_reach_target_sparsity(model: LlamaForCausalLM, scope: str) -> None:
    masks = magnitude_masks(model, 0.6, LINEAR_NAMES, scope)
    assert linear_sparsity(model, LINEAR_NAMES) == pytest.approx(0.6, abs=0.01)
    assert len(masks) == 4 * len(LINEAR_NAMES)  # one per projection of each of the 4 blocks
    assert all(torch.equal(weight == 0, ~mask) for weight, mask in masks)
    mlp = model.model.layers[1].mlp.down_proj
    assert type(mlp.weight) is torch.nn.Parameter
    if scope == "layer":
        assert (mlp.weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(model, 0.5, LINEAR_NAMES, "row")


# --- lowrank ------------------------------------------------------------------------------------------


def parameter_total(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_factorize_at_full_rank_reproduces_outputs(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    before = logits(model, tokens)
    factorize_model(model, rank=32)  # min(hidden 32, intermediate 64): exact
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert torch.allclose(logits(model, tokens), before, atol=1e-5)


def test_factorize_at_low_rank_is_smaller_and_reloads(
    model: LlamaForCausalLM, tokens: torch.Tensor, tmp_path: Path
) -> None:
    dense_total = parameter_total(model)
    factorize_model(model, modules=("gate_proj", "up_proj", "down_proj", "q_proj"), rank=4)
    # Per block: 3 MLP matrices 64x32 -> 4*(64+32); q_proj 32x32 -> 4*(32+32).
    saved = 4 * (3 * (64 * 32 - 4 * 96) + (32 * 32 - 4 * 64))
    assert parameter_total(model) == dense_total - saved
    before = logits(model, tokens)
    loaded = reload(model, tmp_path)  # a plain dense Llama holding the products
    assert isinstance(loaded.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.allclose(logits(loaded, tokens), before, atol=1e-5)
    refactored = factorize_model(loaded, modules=("gate_proj", "up_proj", "down_proj", "q_proj"), rank=4)
    assert parameter_total(refactored) == parameter_total(model)
    assert torch.allclose(logits(refactored, tokens), before, atol=1e-5)


def test_factorize_by_energy_and_state_dict_round_trip(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    factorize_model(model, energy=0.5)
    ranks = {layer.mlp.gate_proj.rank for layer in model.model.layers}
    assert all(1 <= rank < 32 for rank in ranks)
    before = logits(model, tokens)
    state = model.state_dict()
    assert "model.layers.0.mlp.gate_proj.weight" in state and "model.layers.0.mlp.gate_proj.first" not in state
    model.load_state_dict(state)
    assert torch.allclose(logits(model, tokens), before, atol=1e-5)
    for path, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            model.set_submodule(path, densify_linear(module))
    assert type(model.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    assert torch.allclose(logits(model, tokens), before, atol=1e-5)


# --- sharing ------------------------------------------------------------------------------------------

BLOCK_PARAMETERS = (32 * 32 + 2 * 16 * 32 + 32 * 32) + 3 * 64 * 32 + 2 * 32  # attention + MLP + 2 norms


def test_share_layers_reduces_unique_parameters(model: LlamaForCausalLM) -> None:
    before = parameter_count(model)
    share_layers(model, [[0, 1, 2], [3]])
    assert parameter_count(model) == before - 2 * BLOCK_PARAMETERS
    assert parameter_count(model, unique=False) > parameter_count(model, unique=True)
    layers = model.model.layers
    assert layers[2].mlp.down_proj.weight is layers[0].mlp.down_proj.weight
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]


def test_shared_layers_stay_tied_after_an_optimizer_step(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    share_layers(model, [[1, 2]], init="mean")
    q0 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    q1, q2 = (model.model.layers[i].self_attn.q_proj.weight for i in (1, 2))
    assert not torch.equal(q1, q0)
    assert q1 is q2


def test_shared_model_saves_untied_and_reloads(model: LlamaForCausalLM, tokens: torch.Tensor, tmp_path: Path) -> None:
    dense = parameter_count(model)
    share_layers(model, [[0, 1], [2, 3]])
    before = logits(model, tokens)
    loaded = reload(model, tmp_path)
    assert torch.equal(logits(loaded, tokens), before)
    assert parameter_count(loaded) == dense  # the saving is in memory only
    share_layers(loaded, [[0, 1], [2, 3]])
    assert parameter_count(loaded) == parameter_count(model)
    assert torch.equal(logits(loaded, tokens), before)


# --- measure ------------------------------------------------------------------------------------------


def test_perplexity_and_storage(model: LlamaForCausalLM, tokens: torch.Tensor, tmp_path: Path) -> None:
    blocks = TokenBlocks.unpadded(tokens)
    ppl = evaluate(model, blocks, batch_size=1)["perplexity"]
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss  # mean over all predicted tokens
    assert ppl == pytest.approx(loss.exp().item(), rel=1e-4)
    assert evaluate(model, blocks, batch_size=2)["perplexity"] == pytest.approx(ppl, rel=1e-5)
    model.save_pretrained(tmp_path)
    # Tied embeddings are stored once, in fp32, plus a few kB of safetensors header.
    weights = 4 * parameter_count(model)
    assert weights < storage_bytes(tmp_path) < weights + 8192


def test_sparse_nbytes_counts_only_nonzeros(model: LlamaForCausalLM) -> None:
    dense = sparse_nbytes(model)
    assert dense == 4 * parameter_count(model)  # nothing is zero: every tensor stays dense
    magnitude_masks(model, 0.9, LINEAR_NAMES, "layer")
    pruned = sum(block_linear(layer, n).weight.numel() for layer in model.model.layers for n in LINEAR_NAMES)
    # Roughly: the pruned matrices shrink to 10% of the values plus one bit per entry.
    expected = dense - 4 * pruned + round(0.1 * 4 * pruned) + pruned // 8
    assert sparse_nbytes(model) == pytest.approx(expected, rel=0.01)
    assert sparse_nbytes(model, "csr") < dense


def test_peak_rss_subprocess_sees_the_workload() -> None:
    # One spawn (each imports torch, a few seconds): the child holds the 300 MB argument on top of its
    # ~280 MB of interpreter + torch, which alone would stay under 500 MB.
    size, peak = peak_rss_subprocess(len, bytes(300 * 2**20))
    assert size == 300 * 2**20
    assert peak > 500 * 2**20


def test_peak_rss_subprocess_is_the_childs_own_not_its_parents() -> None:
    # ru_maxrss would report this process's peak in a fork+exec child; VmHWM is the child's own
    ballast = b"\x01" * (900 * 2**20)
    _, peak = peak_rss_subprocess(len, b"")
    assert len(ballast) and peak < 800 * 2**20


# --- distill ------------------------------------------------------------------------------------------


def hand_kd(student: list[list[float]], teacher: list[list[float]], labels: list[int], alpha: float, t: float) -> float:
    """The KD loss written out with explicit exp/log, position by position (label -100 skipped)."""

    def softmax(row: list[float], temperature: float) -> list[float]:
        exps = [math.exp(x / temperature) for x in row]
        return [e / sum(exps) for e in exps]

    ce, kl, count = 0.0, 0.0, 0
    for s_row, t_row, label in zip(student, teacher, labels):
        if label == -100:
            continue
        count += 1
        ce += -math.log(softmax(s_row, 1.0)[label])
        p_t, p_s = softmax(t_row, t), softmax(s_row, t)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return (1 - alpha) * ce / count + alpha * t * t * kl / count


KD_STUDENT = [[1.0, -0.5, 2.0, 0.3, 0.0], [0.2, 0.1, -1.0, 1.5, 0.7], [3.0, 0.0, 0.0, -2.0, 1.0]]
KD_TEACHER = [[0.5, 0.5, 3.0, -1.0, 0.2], [1.0, -0.3, 0.0, 2.5, 0.1], [-1.0, 2.0, 0.4, 0.0, 0.9]]
KD_LABELS = [2, -100, 4]


@pytest.mark.parametrize(("alpha", "temperature"), [(0.3, 2.0), (0.0, 2.0), (1.0, 3.0), (0.5, 1.0)])
def test_distillation_loss_matches_hand_computation(alpha: float, temperature: float) -> None:
    student, teacher, labels = torch.tensor([KD_STUDENT]), torch.tensor([KD_TEACHER]), torch.tensor([KD_LABELS])
    loss = distillation_loss(student, teacher, labels, alpha, temperature)
    expected = hand_kd(KD_STUDENT, KD_TEACHER, KD_LABELS, alpha, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if alpha == 0:
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(student[0], labels[0]))
    # Top-k over the whole vocabulary is the full loss.
    values, indices = torch.tensor([KD_TEACHER]).topk(5, dim=-1)
    topk = distillation_loss_topk(student, values, indices, labels, alpha, temperature)
    assert topk.item() == pytest.approx(loss.item(), rel=1e-5)


def test_topk_distillation_renormalises_the_teacher_over_its_top_k() -> None:
    student, labels = torch.tensor([KD_STUDENT]), torch.tensor([KD_LABELS])
    values, indices = torch.tensor([KD_TEACHER]).topk(2, dim=-1)
    # A teacher that is -inf outside its top 2 has exactly that renormalised distribution.
    truncated = torch.full((1, 3, 5), -math.inf).scatter(-1, indices, values)
    loss = distillation_loss_topk(student, values, indices, labels, alpha=1.0, temperature=2.0)
    expected = distillation_loss(student, truncated, labels, alpha=1.0, temperature=2.0)
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 1.0), (0.3, 2.0), (1.0, 0.5), (0.0, 1.0)])
def test_topk_distillation_gradient_matches_autograd(alpha: float, temperature: float, dtype: torch.dtype) -> None:
    # The closed-form gradient against autograd through the explicit loss (a teacher that is -inf
    # outside its top k), with ignored positions and logits in the student's autocast dtype.
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 6, 11, generator=generator)).to(dtype)
    teacher = 3 * torch.randn(2, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[0, 2] = labels[1, 5] = -100
    values, indices = teacher.topk(4, dim=-1)
    truncated = torch.full_like(teacher, -math.inf).scatter(-1, indices, values)

    fused_input = student.clone().requires_grad_(True)
    fused = distillation_loss_topk(fused_input, values, indices.to(torch.int32), labels, alpha, temperature)
    (3.0 * fused).backward()
    reference_input = student.float().requires_grad_(True)
    reference = distillation_loss(reference_input, truncated, labels, alpha, temperature)
    (3.0 * reference).backward()

    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    assert fused_input.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.allclose(fused_input.grad.float(), reference_input.grad, atol=tolerance)
    assert fused_input.grad[0, 2].abs().max() == 0  # an ignored position gets no gradient


def test_hidden_state_loss_and_layer_map() -> None:
    teacher = [torch.full((1, 2, 4), float(i)) for i in range(5)]  # embeddings + 4 blocks
    student = [teacher[0], teacher[1], teacher[4] + 1.0]  # kept blocks 0 and 3; last one off by 1
    layer_map = hidden_layer_map([0, 3])
    assert layer_map == {0: 0, 1: 1, 2: 4}
    assert hidden_state_loss(student, teacher, layer_map).item() == pytest.approx(1 / 3)


def test_topk_store_runs_the_teacher_once_per_block(model: LlamaForCausalLM, tokens: torch.Tensor,
                                                    tmp_path: Path) -> None:
    with torch.no_grad():
        values, indices = model(input_ids=tokens).logits.float().topk(4, dim=-1)
    path = tmp_path / "topk.safetensors"
    store = TopKStore(path, tokens, k=4)
    got_values, got_indices = store.get(model, torch.tensor([1]))
    assert torch.equal(got_indices.long(), indices[1:])
    assert torch.equal(got_values, values[1:].to(torch.bfloat16).float())  # stored in bfloat16
    store.get(model, torch.tensor([1, 0]))
    assert (store.computed, store.loaded) == (2, 0)  # block 1 was not computed again
    store.save()
    again = TopKStore(path, tokens, k=4)
    both_values, both_indices = again.get(model, torch.tensor([0, 1]))
    assert (again.computed, again.loaded) == (0, 2)
    assert torch.equal(both_indices.long(), indices) and torch.equal(both_values, values.to(torch.bfloat16).float())
    assert TopKStore(path, tokens.flip(0), k=4).loaded == 0  # other blocks: nothing reused


# --- quantize -----------------------------------------------------------------------------------------


def test_cast_base_keeps_lora_fp32(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cast_base(peft_model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in peft_model.named_parameters()}
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name)
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if "lora_" not in name)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    lora_grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert lora_grads and all(g is not None and g.dtype == torch.float32 for g in lora_grads)


def test_weights_hash_sees_every_weight(model: LlamaForCausalLM) -> None:
    original = weights_hash(model)
    for name, param in model.named_parameters():
        flat = param.data.view(-1)
        kept = flat[-1].clone()
        flat[-1] += 1.0
        assert weights_hash(model) != original, name
        flat[-1] = kept
    assert weights_hash(model) == original

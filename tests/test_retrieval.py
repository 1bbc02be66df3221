"""The kNN-LM cache (shared/retrieval.py) against hand computations, and a retrieval method on a device."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client import use as client_use
from client.personal import CACHE, StalePersonalAdapter, user_folder
from shared import retrieval
from shared.methods import method, without_retrieval
from shared.retrieval import (CacheSetting, Datastore, build_datastore, choose_setting, collect, evaluate_with_cache,
                              knn_log_probs, mix, nearest)
from shared.training import TokenBlocks, evaluate, tokenize_blocks
from tests.test_personalization import device, global_arrays, run_config, send  # noqa: F401 (fixtures)
from tests.tiny import SAMPLE_TEXT, build_model, build_tokenizer


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer)).eval()
    return model, tokenizer


def test_knn_probability_and_mixing_equal_a_hand_computation():
    distances = torch.tensor([[1.0, 2.0, 4.0], [0.5, 3.0, 3.0]])
    values = torch.tensor([[5, 7, 5], [9, 9, 8]])
    targets = torch.tensor([5, 7])
    got = knn_log_probs(distances, values, targets, temperature=2.0)
    weights = [math.exp(-d / 2.0) for d in (1.0, 2.0, 4.0)]
    assert got[0].item() == pytest.approx(math.log((weights[0] + weights[2]) / sum(weights)), rel=1e-6)
    assert got[1].item() == -math.inf  # no neighbour holds token 7
    model = torch.log(torch.tensor([0.1, 0.2]))
    mixed = mix(model, got, 0.25)
    assert mixed[0].item() == pytest.approx(math.log(0.75 * 0.1 + 0.25 * math.exp(got[0].item())), rel=1e-6)
    assert mixed[1].item() == pytest.approx(math.log(0.75 * 0.2), rel=1e-6)
    assert torch.equal(mix(model, got, 0.0), model)


def test_nearest_equals_brute_force_across_query_chunks(monkeypatch):
    monkeypatch.setattr(retrieval, "QUERY_CHUNK", 7)
    generator = torch.Generator().manual_seed(0)
    store = Datastore(torch.randn(50, 6, generator=generator), torch.arange(50))
    queries = torch.randn(23, 6, generator=generator)
    distances, values = nearest(queries, store, k=4)
    expected = torch.cdist(queries, store.keys) ** 2
    want_d, want_i = expected.topk(4, dim=1, largest=False)
    assert torch.equal(values, want_i)  # values are the key indices here
    assert torch.allclose(distances, want_d, atol=1e-4)
    assert nearest(queries, store, k=500)[0].shape == (23, 50)  # k capped at the store's size


def test_the_hook_reads_the_output_layers_input(tiny):
    model, tokenizer = tiny
    blocks = tokenize_blocks(tokenizer, SAMPLE_TEXT[:6], 16)
    positions = collect(model, blocks, batch_size=4)
    log_probs = torch.log_softmax(model.lm_head(positions.hidden), dim=-1)
    assert torch.allclose(log_probs.gather(1, positions.targets[:, None]).squeeze(1), positions.model_log_probs, atol=1e-5)
    assert positions.targets.shape[0] == blocks.num_tokens


def test_weight_zero_scores_exactly_as_the_model_alone(tiny):
    model, tokenizer = tiny
    blocks = tokenize_blocks(tokenizer, SAMPLE_TEXT[:8], 16)
    store = build_datastore(model, blocks)
    alone = evaluate(model, blocks, batch_size=4)
    cached = evaluate_with_cache(model, store, blocks, CacheSetting(0.0, 1.0, 8), batch_size=4)
    assert cached["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert cached["accuracy"] == alone["accuracy"] and cached["tokens"] == alone["tokens"]


def test_a_cache_of_repeated_text_is_chosen_and_lowers_the_loss(tiny):
    model, tokenizer = tiny  # an untrained model: the cache is all it knows about this verse
    fit = tokenize_blocks(tokenizer, SAMPLE_TEXT[:30], 16)
    validation = tokenize_blocks(tokenizer, SAMPLE_TEXT[30:40], 16)  # the same ten lines again
    setting, loss = choose_setting(collect(model, fit), collect(model, validation))
    alone = evaluate(model, validation, batch_size=8)["loss"]
    assert setting.weight > 0 and loss < 0.5 * alone
    scored = evaluate_with_cache(model, build_datastore(model, fit), validation, setting, batch_size=8)
    assert scored["loss"] == pytest.approx(loss, rel=1e-4)
    assert scored["accuracy"] > evaluate(model, validation, batch_size=8)["accuracy"]


def test_on_unrelated_text_the_grid_keeps_weight_zero(tiny):
    model, tokenizer = tiny
    validation = tokenize_blocks(tokenizer, SAMPLE_TEXT[:10], 16)
    unseen = sorted(set(range(len(tokenizer))) - set(validation.input_ids.flatten().tolist()))
    fit = TokenBlocks.unpadded(torch.tensor(unseen[:64]).view(4, 16))  # no validation target is in the cache
    setting, loss = choose_setting(collect(model, fit), collect(model, validation))
    assert setting.weight == 0.0
    assert loss == pytest.approx(evaluate(model, validation)["loss"], rel=1e-5)


def test_datastore_round_trips_through_its_folder(tmp_path):
    store = Datastore(torch.randn(12, 4), torch.arange(12) * 3)
    folder = store.save(tmp_path / "cache", CacheSetting(0.2, 1.5, 8), base_hash="abc", round=3)
    loaded, setting, tags = Datastore.load(folder)
    assert torch.allclose(loaded.keys, store.keys, atol=1e-2) and torch.equal(loaded.values, store.values)
    assert setting == CacheSetting(0.2, 1.5, 8) and tags == {"base_hash": "abc", "round": 3}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="no kNN cache"):
        Datastore.load(tmp_path / "missing")


def test_a_retrieval_method_keeps_its_cache_on_the_device_and_reports_its_setting(device, capsys):  # noqa: F811
    config = run_config(device, "fedavg-knn")
    send(client_app.train, config, device, global_arrays(config))
    reply = send(client_app.evaluate_adapter, config, device, global_arrays(config))
    metrics = reply.content["metrics"]
    assert "arrays" not in reply.content  # an evaluate reply carries no tensors, the cache included
    assert {"cache-weight", "cache-temperature", "cache-neighbours", "model-perplexity"} <= set(metrics)
    # with weight 0 the cache is the model alone; otherwise it chose to mix because validation improved
    if metrics["cache-weight"] == 0:
        assert metrics["eval-perplexity"] == pytest.approx(metrics["model-perplexity"], rel=1e-5)
    folder = user_folder(device["state"], "me")
    store, setting, tags = Datastore.load(folder / CACHE)
    assert setting.weight == metrics["cache-weight"] and tags["method"] == "fedavg-knn"
    assert len(store) == metrics["cache-keys"]
    # client.use scores with the cache too, and refuses a cache built on another base
    assert client_use.main(["score", "--folder", str(folder), "--text", "Fair is foul, and foul is fair."]) == 0
    assert "kNN cache" in capsys.readouterr().out
    with pytest.raises(StalePersonalAdapter, match="kNN cache"):
        client_use.load_cache(folder, "another-hash")


def test_a_retrieval_run_scores_its_method_without_the_cache_exactly_as_that_method(device, tmp_path):  # noqa: F811
    assert without_retrieval(method("fedavg-knn")) is method("fedavg")
    assert without_retrieval(method("dual-knn")) is method("dual") and without_retrieval(method("dual")) is None
    scores = {}
    for name in ("fedavg", "fedavg-knn", "dual", "dual-knn"):
        config = run_config(device, name, **{"state-dir": str(tmp_path / name)})
        send(client_app.train, config, device, global_arrays(config))
        metrics = send(client_app.evaluate_adapter, config, device, global_arrays(config)).content["metrics"]
        scores[name] = metrics["model-perplexity" if name.endswith("-knn") else "eval-perplexity"]
    assert scores["fedavg-knn"] == scores["fedavg"] and scores["dual-knn"] == scores["dual"]

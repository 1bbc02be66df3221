"""Heterogeneous LoRA ranks (shared/ranks.py): truncation and padding, peft's scaling across ranks, the per-slice
average of mixed ranks, the server's checks of a device's declared rank, and a rank-2 device in a rank-8 federation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from peft import set_peft_model_state_dict

from client.runtime import device_config
from server.strategy import FederatedAdapters
from shared.codec import Codecs, UpdateCodec, decode
from shared.config import ConfigError, FederationConfig
from shared.methods import METHODS
from shared.ranks import adapter_rank, device_alpha, fill_missing, pad, shapes_at_rank, truncate, truncate_record
from tests.test_strategy import FakeGrid, metrics, reply_to, task_identity  # noqa: F401
from tests.tiny import build_model

A, B, OTHER = "layer.lora_A.weight", "layer.lora_B.weight", "layer.norm.weight"
RANK3 = {A: (3, 2), B: (2, 3)}  # a rank-3 adapter: A is (r, in), B is (out, r)


# --- truncation and padding ---------------------------------------------------------------------------


def test_truncation_keeps_the_first_components_and_padding_puts_back_the_rest_exactly():
    full = {A: np.arange(12, dtype=np.float32).reshape(4, 3), B: np.arange(20, dtype=np.float32).reshape(5, 4),
            OTHER: np.array([7.0, 8.0], np.float32)}
    cut = truncate(full, 2)
    np.testing.assert_array_equal(cut[A], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(cut[B], [[0, 1], [4, 5], [8, 9], [12, 13], [16, 17]])
    np.testing.assert_array_equal(cut[OTHER], full[OTHER])
    for key, value in pad(cut, full).items():
        np.testing.assert_array_equal(value, full[key])
    trained = {key: value + 100 for key, value in cut.items()}
    padded = pad(trained, full)
    np.testing.assert_array_equal(padded[A], np.vstack([full[A][:2] + 100, full[A][2:]]))
    np.testing.assert_array_equal(padded[B], np.hstack([full[B][:, :2] + 100, full[B][:, 2:]]))
    np.testing.assert_array_equal(padded[OTHER], full[OTHER] + 100)
    assert shapes_at_rank({A: (4, 3), B: (5, 4), OTHER: (2,)}, 2) == {A: (2, 3), B: (5, 2), OTHER: (2,)}
    assert adapter_rank({A: (4, 3), B: (5, 4), OTHER: (2,)}) == 4 and adapter_rank({OTHER: (2,)}) is None
    with pytest.raises(ValueError, match="different ranks"):
        adapter_rank({A: (4, 3), B: (5, 2)})
    with pytest.raises(ValueError, match="below the 5 asked for"):
        truncate(full, 5)


def test_a_received_record_is_cut_only_where_it_has_more_components_than_the_device():
    record = ArrayRecord({A: Array(np.ones((4, 3), np.float32)), B: Array(np.ones((5, 4), np.float32)),
                          "layer.odd.lora_A.weight": Array(np.ones(6, np.float32))})  # malformed: left for the check
    cut = truncate_record(record, 2)
    assert [tuple(cut[key].shape) for key in (A, B, "layer.odd.lora_A.weight")] == [(2, 3), (5, 2), (6,)]
    assert truncate_record(cut, 2)[A] is cut[A]


def test_a_truncated_adapter_computes_what_the_servers_does_restricted_to_its_components():
    from shared.adapters import adapter_state, attach_adapter
    from peft import LoraConfig

    def model_at(rank: int, alpha: float):
        lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        return attach_adapter(build_model(64), lora, seed=1)

    server, device = model_at(8, 16), model_at(2, device_alpha(16, 2, 8))
    assert device_alpha(16, 2, 8) == 4.0
    generator = torch.Generator().manual_seed(0)
    full = {key: torch.randn(value.shape, generator=generator) for key, value in adapter_state(server).items()}
    restricted = {key: torch.from_numpy(value) for key, value in
                  pad(truncate({k: v.numpy() for k, v in full.items()}, 2),
                      {k: np.zeros(v.shape, np.float32) for k, v in full.items()}).items()}
    set_peft_model_state_dict(server, restricted)  # components 2..7 zero: only the first two act
    set_peft_model_state_dict(device, {key: torch.from_numpy(value) for key, value in
                                       truncate({k: v.numpy() for k, v in full.items()}, 2).items()})
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    server_layer, device_layer = server.get_submodule(layer), device.get_submodule(layer)
    assert device_layer.scaling["default"] == server_layer.scaling["default"] == 2.0
    torch.testing.assert_close(device_layer.get_delta_weight("default"), server_layer.get_delta_weight("default"))
    tokens = torch.arange(1, 9).unsqueeze(0)
    server.eval(), device.eval()
    with torch.no_grad():
        torch.testing.assert_close(device(tokens).logits, server(tokens).logits)
        with server.disable_adapter():
            base = server(tokens).logits
        assert not torch.allclose(server(tokens).logits, base)  # the adapter acts


# --- the per-slice average -----------------------------------------------------------------------------


def test_each_component_is_averaged_over_the_replies_that_have_it_and_one_nobody_has_is_kept():
    current = {A: np.full((3, 2), 9.0, np.float32), B: np.full((2, 3), 9.0, np.float32)}
    replies = [{A: np.full((3, 2), 1.0, np.float32), B: np.full((2, 3), 1.0, np.float32)},
               {A: np.full((3, 2), 2.0, np.float32), B: np.full((2, 3), 2.0, np.float32)}]
    filled = fill_missing(replies, ranks=[2, 1], weights=[1.0, 3.0], current=current)
    # component 0: both, (1 x 1 + 2 x 3) / 4; component 1: only the first; component 2: nobody, kept
    np.testing.assert_allclose(filled[1][A][:, 0], [2.0, 1.0, 9.0])
    np.testing.assert_allclose(filled[1][B][0], [2.0, 1.0, 9.0])
    np.testing.assert_allclose(filled[0][A][:, 0], [1.0, 1.0, 9.0])
    averaged = (1.0 * filled[0][A] + 3.0 * filled[1][A]) / 4
    np.testing.assert_allclose(averaged[:, 1], [7 / 4, 1.0, 9.0])
    np.testing.assert_array_equal(replies[1][A], np.full((3, 2), 2.0))  # the replies themselves are not changed


def rank3_strategy(ledger, nodes, **kwargs):  # noqa: F811
    run_id = ledger.start_run(99, {}, "tiny", "f" * 64, method="fedavg")
    strategy = FederatedAdapters(ledger, run_id, METHODS["fedavg"], adapter_shapes=RANK3, max_update_bytes=10_000,
                                 node_wait_seconds=5, evaluate_rounds={9}, min_train_nodes=len(nodes),
                                 min_available_nodes=len(nodes), **kwargs)
    return strategy, run_id


SAME = object()  # rank_reply declares the rank its shapes have


def rank_reply(value: float, examples: int, rank: int = 3, declared: object = SAME) -> RecordDict:
    """A reply of ``value`` everywhere at ``rank``, declaring ``declared`` as its lora-r (None: declaring none)."""
    shapes = shapes_at_rank(RANK3, rank)
    declared = rank if declared is SAME else declared
    identity = {"user-id": "u", "domain": "a"} | ({} if declared is None else {"lora-r": declared})
    return RecordDict({"arrays": ArrayRecord({k: Array(np.full(s, value, np.float32)) for k, s in shapes.items()}),
                       "metrics": metrics(examples), "identity": ConfigRecord(identity)})


def play_round(strategy, server_round, answers, initial: ArrayRecord):
    sent = list(strategy.configure_train(server_round, initial, ConfigRecord({"base-hash": "x"}), FakeGrid(list(answers))))
    replies = [reply_to(message, answers[message.metadata.dst_node_id]) for message in sent]
    return sent, strategy.aggregate_train(server_round, replies)


def zeros(shapes=RANK3) -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in shapes.items()})


def test_mixed_ranks_aggregate_to_the_hand_computed_per_slice_average_and_go_back_at_each_rank(ledger):
    strategy, run_id = rank3_strategy(ledger, (11, 12, 13))
    answers = {11: rank_reply(1.0, 10, 3), 12: rank_reply(2.0, 30, 1), 13: rank_reply(4.0, 60, 2)}
    sent, (aggregated, _) = play_round(strategy, 1, answers, zeros())
    assert all(tuple(m.content["arrays"][A].shape) == (3, 2) for m in sent)  # ranks not yet known: the run's
    per_slice = [(1 * 10 + 2 * 30 + 4 * 60) / 100, (1 * 10 + 4 * 60) / 70, 1.0]
    np.testing.assert_allclose(aggregated[A].numpy(), np.repeat(np.array(per_slice)[:, None], 2, axis=1), rtol=1e-6)
    np.testing.assert_allclose(aggregated[B].numpy(), np.repeat(np.array(per_slice)[None, :], 2, axis=0), rtol=1e-6)
    rows = {r.node_id: r for r in ledger.client_results(run_id)}
    assert {node: row.status for node, row in rows.items()} == {"11": "ok", "12": "ok", "13": "ok"}
    assert rows["12"].metrics["update-norm"] == pytest.approx(4.0)  # 4 entries of 2 at rank 1, nothing beyond
    # the next round each node gets the global adapter cut to its rank
    sent, _ = play_round(strategy, 2, {11: rank_reply(0.0, 1, 3), 12: rank_reply(0.0, 1, 1),
                                       13: rank_reply(0.0, 1, 2)}, aggregated)
    by_node = {m.metadata.dst_node_id: m.content["arrays"] for m in sent}
    assert {node: (tuple(a[A].shape), tuple(a[B].shape)) for node, a in by_node.items()} == {
        11: ((3, 2), (2, 3)), 12: ((1, 2), (2, 1)), 13: ((2, 2), (2, 2))}
    np.testing.assert_array_equal(by_node[12][A].numpy(), aggregated[A].numpy()[:1])
    assert ledger.rounds(run_id)[1].bytes_down == sum(len(a.data) for m in sent for a in m.content["arrays"].values())


def test_mixed_ranks_under_a_server_optimizer_step_from_the_per_slice_average(ledger):
    from shared.methods import Aggregation
    strategy, _ = rank3_strategy(ledger, (11, 12), aggregation=Aggregation.FEDAVGM, server_learning_rate=1.0,
                                 server_momentum=0.0)
    _, (aggregated, _) = play_round(strategy, 1, {11: rank_reply(1.0, 10, 3), 12: rank_reply(3.0, 30, 1)}, zeros())
    # FedAvgM at learning rate 1 and no momentum lands on the average: component 0 (1 x 10 + 3 x 30) / 40, the rest 1
    np.testing.assert_allclose(aggregated[A].numpy()[:, 0], [2.5, 1.0, 1.0], rtol=1e-6)


def test_coded_replies_at_a_lower_rank_are_decoded_at_that_rank(ledger):
    from shared.codec import encode
    strategy, run_id = rank3_strategy(ledger, (11, 12), codecs=Codecs(UpdateCodec.INT8, UpdateCodec.FLOAT16))
    change = {k: np.full(s, 0.5, np.float32) for k, s in shapes_at_rank(RANK3, 1).items()}
    low = rank_reply(0.0, 10, 1)
    low["arrays"] = encode(change, UpdateCodec.INT8)
    full = rank_reply(0.0, 10, 3)
    full["arrays"] = encode({k: np.full(s, 0.2, np.float32) for k, s in RANK3.items()}, UpdateCodec.INT8)
    _, (aggregated, _) = play_round(strategy, 1, {11: full, 12: low}, zeros())
    # component 0 from both changes, the others from the rank-3 device's alone
    np.testing.assert_allclose(aggregated[A].numpy()[:, 0], [0.35, 0.2, 0.2], atol=1e-6)
    assert {r.node_id: r.status for r in ledger.client_results(run_id)} == {"11": "ok", "12": "ok"}


# --- the server's checks -------------------------------------------------------------------------------


HOSTILE = {  # name: (the hostile reply, what its rejection says)
    "shapes-above-declared": (rank_reply(5.0, 10, 3, declared=1), "shape (3, 2), expected (1, 2)"),
    "shapes-below-declared": (rank_reply(5.0, 10, 1, declared=2), "shape (1, 2), expected (2, 2)"),
    "rank-above-the-run": (rank_reply(5.0, 10, 3, declared=16), "lora-r 16; this run's adapter has rank 3"),
    "rank-zero": (rank_reply(5.0, 10, 3, declared=0), "must be in [1, 3]"),
    "rank-as-text": (rank_reply(5.0, 10, 2, declared="2"), "lora-r '2'"),
    "rank-unstated-low-shapes": (rank_reply(5.0, 10, 1, declared=None), "expected (3, 2)"),  # unstated: the run's
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_replies_whose_shapes_or_rank_disagree_are_rejected_and_not_averaged(ledger, name):
    hostile, says = HOSTILE[name]
    strategy, run_id = rank3_strategy(ledger, (11, 12))
    _, (aggregated, _) = play_round(strategy, 1, {11: rank_reply(1.0, 10, 3), 12: hostile}, zeros())
    np.testing.assert_allclose(aggregated[A].numpy(), np.ones((3, 2)))  # only the honest reply
    rows = {r.node_id: r for r in ledger.client_results(run_id)}
    assert rows["12"].status == "rejected" and says in rows["12"].error, rows["12"].error
    assert [e.kind for e in ledger.events(run_id)] == ["update-rejected"]


def test_a_node_sent_rank_1_that_replies_at_a_higher_rank_stated_or_not_is_rejected(ledger):
    strategy, run_id = rank3_strategy(ledger, (11, 12))
    _, (aggregated, _) = play_round(strategy, 1, {11: rank_reply(1.0, 10, 3), 12: rank_reply(1.0, 10, 1)}, zeros())
    for server_round, reply in ((2, rank_reply(9.0, 10, 2)), (3, rank_reply(9.0, 10, 3, declared=None))):
        play_round(strategy, server_round, {11: rank_reply(1.0, 10, 3), 12: reply}, aggregated)
        row = next(r for r in ledger.client_results(run_id, server_round) if r.node_id == "12")
        assert row.status == "rejected" and "above the rank 1 its node was sent" in row.error


# --- the device ----------------------------------------------------------------------------------------


def test_a_device_trains_its_node_config_rank_with_the_servers_scaling_and_never_above_the_runs():
    run = FederationConfig.from_run_config({"lora-r": 8, "lora-alpha": 16})
    mine = device_config(run, {"lora-r": 2})
    assert (mine.lora_r, mine.lora_alpha) == (2, 4.0)
    assert device_config(run, {}) == run
    for declared, says in ((16, "node-config lora-r 16 must be a whole number in [1, 8]"),
                           (0, "node-config lora-r 0"), ("two", "node-config lora-r 'two'"),
                           (2.5, "node-config lora-r 2.5")):
        with pytest.raises(ConfigError) as raised:
            device_config(run, {"lora-r": declared})
        assert says in str(raised.value)


def test_a_lower_rank_device_is_refused_under_secure_aggregation_and_the_runs_rank_is_not():
    run = FederationConfig.from_run_config({"lora-r": 8, "secure-aggregation": True, "min-train-nodes": 3,
                                            "example-weights": "uniform"})
    assert device_config(run, {"lora-r": 8}).lora_r == 8
    with pytest.raises(ConfigError, match="node-config lora-r 2 with secure-aggregation"):
        device_config(run, {"lora-r": 2})


# --- both sides together: a rank-2 device in a rank-8 federation ------------------------------------------


@pytest.mark.parametrize("codecs", [{}, {"update-codec": "int8", "downlink-codec": "float16"}])
def test_a_rank_2_device_round_trips_through_the_client_app_and_a_rank_8_strategy(tmp_path, tiny_base, ledger,
                                                                                  codecs):
    from client import app as client_app
    from client.runtime import adapter_session
    from shared.adapters import adapter_state, attach_adapter, lora_config, to_arrays
    from shared.base_model import load_model

    data = tmp_path / "me.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Fair is foul, and foul is fair, {i} times."}) for i in range(12)))
    config = {"base-model": str(tiny_base), "method": "fedavg", "local-steps": 2, "seq-len": 16, "batch-size": 2,
              "lora-r": 8, "lora-alpha": 16, "lora-dropout": 0.0, "learning-rate": 0.05,
              "state-dir": str(tmp_path / "s")} | codecs
    settings = FederationConfig.from_run_config(config)
    initial = adapter_state(attach_adapter(load_model(settings.base_model), lora_config(settings), seed=3))
    generator = torch.Generator().manual_seed(1)  # a B that is not zero, so truncation shows in what the device holds
    initial = {k: (torch.randn(v.shape, generator=generator) * 0.01 if "lora_B" in k else v) for k, v in initial.items()}
    shapes = {key: tuple(value.shape) for key, value in initial.items()}
    assert adapter_rank(shapes) == 8
    run_id = ledger.start_run(99, {}, "tiny", "h", method="fedavg")
    strategy = FederatedAdapters(ledger, run_id, METHODS["fedavg"], adapter_shapes=shapes, max_update_bytes=10**7,
                                 node_wait_seconds=5, evaluate_rounds={9}, min_train_nodes=1, min_available_nodes=1,
                                 codecs=settings.codecs)
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data), "lora-r": 2}, state=RecordDict(),
                      run_config=config)
    base_hash = adapter_session(device_config(settings, {"lora-r": 2})).base_hash
    adapter = to_arrays(initial)
    for server_round, rank_sent in ((1, 8), (2, 2)):
        (message,) = strategy.configure_train(server_round, adapter, ConfigRecord({"base-hash": base_hash}),
                                              FakeGrid([7]))
        first_a = next(key for key in shapes if "lora_A" in key)  # float32 and float16 send it under its own key
        assert message.content["arrays"][first_a].shape[0] == rank_sent
        message.metadata.__dict__["_message_id"] = f"m{server_round}"
        reply = client_app.app(message, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert reply.content["identity"]["lora-r"] == 2
        low = shapes_at_rank(shapes, 2)
        if codecs:
            change = decode(reply.content["arrays"], low, UpdateCodec.INT8)
        else:
            assert {k: tuple(a.shape) for k, a in reply.content["arrays"].items()} == low
            change = {k: a.numpy() - truncate({k: adapter[k].numpy()}, 2)[k] for k, a in reply.content["arrays"].items()}
        assert any(np.abs(value).max() > 0 for value in change.values())  # it trained
        before = {k: a.numpy() for k, a in adapter.items()}
        adapter, _ = strategy.aggregate_train(server_round, [reply])
        (row,) = ledger.client_results(run_id, server_round)
        assert row.status == "ok", row.error
        after = {k: a.numpy() for k, a in adapter.items()}
        # one rank-2 reply: its first two components move by its change, the other six stay as they were
        for key, value in after.items():
            np.testing.assert_allclose(truncate({key: value}, 2)[key], truncate({key: before[key]}, 2)[key] + change[key],
                                       rtol=0, atol=1e-6)
            rest = (slice(2, None), slice(None)) if "lora_A" in key else (slice(None), slice(2, None))
            np.testing.assert_array_equal(value[rest], before[key][rest])
    saved = json.loads(next((tmp_path / "s").rglob("adapter_config.json")).read_text())
    assert (saved["r"], saved["lora_alpha"]) == (2, 4.0)  # what the device keeps is at its own rank

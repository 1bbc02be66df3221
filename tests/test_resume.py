"""Resuming a crashed run: adapters, optimizer state and node groups from the ledger, no round counted twice."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from server.aggregation import aggregate_group, load_optimizer_state, make_rule, optimizer_state
from server.strategy import ResumedRounds
from shared.methods import Aggregation
from test_strategy import FakeGrid, arrays, metrics, one_round, reply_to, strategy_for, task_identity  # noqa: F401

NODES = [11, 12]
ANSWERS = [{11: (1.0, 10, "a"), 12: (3.0, 30, "b")}, {11: (-2.0, 10, "a"), 12: (0.5, 30, "b")},
           {11: (4.0, 10, "a"), 12: (1.0, 30, "b")}]


@pytest.mark.parametrize("method, aggregation", [("fedavg", "fedadam"), ("domain", "fedyogi"), ("fedsa", "fedavg"),
                                                ("fedavg", "fedadagrad"), ("fedavg", "fedavgm"), ("domain", "fedavgm")])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(ledger, method, aggregation):
    kwargs = {"method": method, "aggregation": aggregation, "server_learning_rate": 0.3, "nodes": NODES}
    reference, _ = strategy_for(ledger, **kwargs)
    for number, answers in enumerate(ANSWERS, start=1):
        reference_sent, _ = one_round(reference, NODES, answers, server_round=number)

    crashed, run_id = strategy_for(ledger, **kwargs)
    one_round(crashed, NODES, ANSWERS[0], server_round=1)
    one_round(crashed, NODES, ANSWERS[1], server_round=2)
    # round 3 starts, then the server dies before aggregating it
    list(crashed.configure_train(3, arrays(0.0), ConfigRecord({"base-hash": "x"}), FakeGrid(NODES)))

    last = ledger.resume_run(run_id, flower_run_id=555)
    assert last == 2
    resumed, _ = strategy_for(ledger, **kwargs)
    resumed.run_id = run_id
    resumed.restore(last)
    # Flower's loop counts from 1 again; the wrapper maps it to round 3
    sent, _ = one_round(ResumedRounds(resumed, last), NODES, ANSWERS[2], server_round=1, method=resumed.method)
    assert all(m.content["config"]["server-round"] == 3 for m in sent)
    # each node starts round 3 from the adapter it would have received had the server never stopped
    # (its domain's under "domain", which needs the node-to-group map back from the ledger)
    expected_payloads = {m.metadata.dst_node_id: m.content["arrays"] for m in reference_sent}
    for message in sent:
        expected = expected_payloads[message.metadata.dst_node_id]
        for key in expected.keys():
            np.testing.assert_array_equal(message.content["arrays"][key].numpy(), expected[key].numpy())
    for group, expected in reference.groups.items():
        for key in expected.keys():
            np.testing.assert_allclose(resumed.groups[group][key].numpy(), expected[key].numpy(), rtol=1e-6)
    assert [r.number for r in ledger.rounds(run_id)] == [1, 2, 3]
    assert all(r.finished_at is not None for r in ledger.rounds(run_id))
    (event,) = [e for e in ledger.events(run_id) if e.kind == "resume"]
    assert "after round 2" in event.message and "[3]" in event.message
    assert ledger.run(run_id).status == "running"


def test_resume_keeps_only_the_committed_prefix(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "0" * 64)
    for number in (1, 2):
        ledger.start_round(run_id, number, clients_sampled=1, bytes_down=1)
        ledger.finish_round(run_id, number, clients_replied=1, clients_failed=0, metrics={}, bytes_up=1)
        ledger.save_checkpoint(run_id, number, {"x": np.ones(2, np.float32) * number})
    ledger.start_round(run_id, 3, clients_sampled=1, bytes_down=1)
    ledger.record_client_result(run_id, 3, node_id=1, status="ok")
    ledger.save_checkpoint(run_id, 3, {"x": np.zeros(2, np.float32)})
    ledger.finish_run(run_id, "failed")
    assert ledger.resume_run(run_id, 2) == 2
    assert [r.number for r in ledger.rounds(run_id)] == [1, 2]
    assert ledger.client_results(run_id, 3) == []
    np.testing.assert_array_equal(ledger.load_checkpoint(run_id)["x"], [2, 2])
    assert ledger.run(run_id).status == "running" and ledger.run(run_id).finished_at is None


def test_fedavgm_momentum_is_restored_by_key_whatever_order_the_resumed_adapter_has():
    rule = make_rule(Aggregation.FEDAVGM, server_learning_rate=1.0, server_momentum=0.5)
    replies = [Message(RecordDict({"arrays": ArrayRecord({"a": Array(np.full(2, 1.0, np.float32)),
                                                          "b": Array(np.full(3, -2.0, np.float32))}),
                                   "metrics": metrics(1)}), dst_node_id=1, message_type=MessageType.TRAIN)]
    start = ArrayRecord({"a": Array(np.zeros(2, np.float32)), "b": Array(np.zeros(3, np.float32))})
    after = aggregate_group(rule, 1, start, replies)  # momentum = current - mean = (-1, 2); x = (1, -2)
    state = optimizer_state(rule)
    assert set(state) == {"momentum/a", "momentum/b"}
    resumed = make_rule(Aggregation.FEDAVGM, server_learning_rate=1.0, server_momentum=0.5)
    reordered = ArrayRecord({"b": after["b"], "a": after["a"]})  # as a ledger might hand the adapter back
    load_optimizer_state(resumed, state, reordered.keys())
    again = aggregate_group(resumed, 2, reordered, replies)
    # the mean is where x stands: momentum 0.5 x (-1, 2), so x moves to (1.5, -3)
    np.testing.assert_allclose(again["a"].numpy(), 1.5)
    np.testing.assert_allclose(again["b"].numpy(), -3.0)

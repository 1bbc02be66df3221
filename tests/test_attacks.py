"""The attack harness (client/attacks.py): who attacks, what each attack sends, and the mod on Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from client.attacks import attack_mod, attacking_partitions, corrupt, is_attacker
from server.aggregation import NormBound
from shared.config import ATTACKS
from tests.test_strategy import SHAPES, FakeGrid, arrays, metrics, strategy_for, task_identity  # noqa: F401

ATTACK = {"attack": "scale", "attack-fraction": 0.5, "attack-scale": 10.0, "seed": 0}


def test_exactly_the_rounded_fraction_of_partitions_attacks():
    assert len(attacking_partitions(10, 0.3, seed=0)) == 3
    assert len(attacking_partitions(6, 0.3, seed=0)) == 2  # 1.8
    assert len(attacking_partitions(5, 0.5, seed=0)) == 3  # 2.5: halves round up
    assert attacking_partitions(6, 0.0, seed=0) == set() and attacking_partitions(6, 1.0, seed=0) == set(range(6))
    assert attacking_partitions(20, 0.3, seed=1) == attacking_partitions(20, 0.3, seed=1)  # seeded
    assert attacking_partitions(20, 0.3, seed=1) != attacking_partitions(20, 0.3, seed=2)


def test_a_node_attacks_by_its_partition_in_simulation_and_by_a_seeded_draw_elsewhere():
    chosen = attacking_partitions(6, 0.5, seed=3)
    for partition in range(6):
        node_config = {"partition-id": partition, "num-partitions": 6}
        assert is_attacker(node_config, node_id=99, fraction=0.5, seed=3) is (partition in chosen)
    draws = [is_attacker({}, node_id, fraction=0.3, seed=0) for node_id in range(2000)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert draws == [is_attacker({}, node_id, fraction=0.3, seed=0) for node_id in range(2000)]
    assert not any(is_attacker({}, node_id, fraction=0.0, seed=0) for node_id in range(100))


def test_each_attack_corrupts_the_update_as_documented():
    received = {"a": np.full((2, 3), 1.0, np.float32)}
    update = {"a": np.full((2, 3), 1.5, np.float32)}  # a change of 0.5 everywhere
    np.testing.assert_array_equal(corrupt(received, update, "scale", 10.0, np.random.default_rng(0))["a"], 6.0)
    np.testing.assert_array_equal(corrupt(received, update, "sign-flip", 10.0, np.random.default_rng(0))["a"], -4.0)
    noisy = corrupt(received, update, "gaussian", 10.0, np.random.default_rng(7))["a"]
    expected = (1.0 + np.random.default_rng(7).normal(0.0, 10.0 * 0.5, (2, 3))).astype(np.float32)
    np.testing.assert_array_equal(noisy, expected)  # noise of 10 x the change's RMS (0.5)
    assert noisy.dtype == np.float32
    with pytest.raises(ValueError, match="does not change tensors"):
        corrupt(received, update, "inflate-examples", 10.0, np.random.default_rng(0))


def test_every_configured_attack_but_none_is_implemented():
    received, update = {"a": np.zeros(2, np.float32)}, {"a": np.ones(2, np.float32)}
    for attack in set(ATTACKS) - {"none", "inflate-examples"}:
        assert not np.array_equal(corrupt(received, update, attack, 2.0, np.random.default_rng(0))["a"], update["a"])


def context(run_config: dict, partition: int, partitions: int = 2) -> Context:
    return Context(run_id=1, node_id=500 + partition, node_config={"partition-id": partition, "num-partitions": partitions},
                   state=RecordDict(), run_config=run_config)


def train_message(value: float = 1.0, message_type: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({"arrays": arrays(value), "config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                   message_type=message_type)


def honest_client(msg: Message, _context: Context) -> Message:
    """Adds 0.5 to every value it received, from 10 examples."""
    trained = arrays(float(msg.content["arrays"]["layer.lora_A.weight"].numpy()[0, 0]) + 0.5)
    return Message(RecordDict({"arrays": trained, "metrics": metrics(10)}), reply_to=msg)


def value_of(reply: Message) -> float:
    return float(reply.content["arrays"]["layer.lora_B.weight"].numpy()[0, 0])


def partitions_by_role(run_config: dict) -> tuple[int, int]:
    attackers = attacking_partitions(2, run_config["attack-fraction"], run_config["seed"])
    (attacker,) = attackers
    return attacker, 1 - attacker


def test_with_attack_none_the_mod_passes_the_reply_through_untouched():
    for run_config in ({}, {"attack": "none", "attack-fraction": 1.0}):
        reply = honest_client(train_message(), context(run_config, 0))
        passed = attack_mod(train_message(), context(run_config, 0), lambda msg, ctx: reply)
        assert passed is reply and value_of(passed) == 1.5 and passed.content["metrics"]["num-examples"] == 10


def test_an_attacking_node_corrupts_its_train_reply_and_nothing_else():
    attacker, honest = partitions_by_role(ATTACK)
    assert value_of(attack_mod(train_message(), context(ATTACK, attacker), honest_client)) == pytest.approx(6.0)
    assert value_of(attack_mod(train_message(), context(ATTACK, honest), honest_client)) == 1.5
    evaluate = attack_mod(train_message(message_type=MessageType.EVALUATE), context(ATTACK, attacker), honest_client)
    assert value_of(evaluate) == 1.5
    inflate = ATTACK | {"attack": "inflate-examples"}
    inflated = attack_mod(train_message(), context(inflate, attacker), honest_client)
    assert inflated.content["metrics"]["num-examples"] == 100 and value_of(inflated) == 1.5
    failing = attack_mod(train_message(), context(ATTACK, attacker),
                         lambda msg, ctx: Message(Error(code=2, reason="crashed"), reply_to=msg))
    assert failing.has_error()


@pytest.mark.parametrize("bound, attacker_status, aggregate", [
    (None, "ok", (1.5 + 6.0) / 2),  # the scaled update pulls the average
    (NormBound(absolute=2.0), "rejected", 1.5),  # the honest change is 0.5 x sqrt(12) = 1.73, the attack's 10 x that
])
def test_the_harness_against_the_defence(ledger, bound, attacker_status, aggregate):
    kwargs = {"norm_bound": bound} if bound else {}
    strategy, run_id = strategy_for(ledger, nodes=(1, 2), **kwargs)
    attacker, honest = partitions_by_role(ATTACK)
    sent = list(strategy.configure_train(1, arrays(1.0), ConfigRecord({"base-hash": "x"}), FakeGrid([1, 2])))
    replies = []
    for message, partition in zip(sent, (attacker, honest)):
        message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"  # as the SuperLink does
        reply = attack_mod(message, context(ATTACK, partition), honest_client)
        reply.content["identity"] = ConfigRecord({"domain": "a"})
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        replies.append(reply)
    aggregated, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(aggregated["layer.lora_A.weight"].numpy(), aggregate, rtol=1e-6)
    statuses = {r.node_id: r.status for r in ledger.client_results(run_id)}
    assert statuses == {str(sent[0].metadata.dst_node_id): attacker_status, str(sent[1].metadata.dst_node_id): "ok"}


def test_flower_runs_the_mod_around_the_client_apps_train_function():
    from flwr.clientapp import ClientApp

    import client.app

    app = ClientApp(mods=[attack_mod])  # as client/app.py builds its app
    app.train()(honest_client)
    attacker, _ = partitions_by_role(ATTACK)
    assert value_of(app(train_message(), context(ATTACK, attacker))) == pytest.approx(6.0)
    assert client.app.app._mods[-1] is attack_mod  # innermost: it sees this app's own train reply, as here

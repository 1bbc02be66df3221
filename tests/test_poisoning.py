"""The poisoning defence: a corpus of bad and adversarial updates, the defence's helpers, and Flower's robust rules by hand.

Every corpus case plays one round of four honest clients (their values and example counts in
``HONEST``) and one or more attackers through the real strategy, and checks that the attack is
rejected (recorded against its node, the aggregate equal to the honest clients' own) or neutralised
(the aggregate the hand-computed value, inside the honest clients' range).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from server.aggregation import NormBound, aggregate_group, clip_update, make_rule, update_norm
from shared.methods import Aggregation, ExampleWeights
from tests.test_strategy import (SHAPES, FakeGrid, arrays, metrics, reply_to, strategy_for,  # noqa: F401
                                 task_identity)

HONEST = {11: (1.0, 10), 12: (2.0, 20), 13: (2.5, 30), 14: (4.0, 40)}  # node -> (update value, num-examples)
HONEST_FEDAVG = (1.0 * 10 + 2.0 * 20 + 2.5 * 30 + 4.0 * 40) / 100  # 2.85
UNIT = math.sqrt(12)  # the norm of an update of 1.0 on every one of SHAPES' 12 values, from 0.0
BOUND = 5 * UNIT  # above every honest norm (at most 4 * UNIT)
RECEIVED = 0.0  # what every node is sent


def content(value: float, examples: float, dtype=np.float32, keys=tuple(SHAPES), **extra_metrics) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(np.full(SHAPES[k], value, dtype=dtype)) for k in keys}),
                       "metrics": metrics(examples, **extra_metrics), "identity": ConfigRecord({"domain": "a"})})


def answer(value: float, examples: float = 10, **kwargs) -> Callable[[dict[int, Message], int], list[Message]]:
    """An attacker that answers its own message with a constant update."""
    return lambda sent, node: [reply_to(sent[node], content(value, examples, **kwargs))]


def answer_with(change: Callable[[RecordDict], None]) -> Callable[[dict[int, Message], int], list[Message]]:
    """An attacker that answers its own message with an honest-looking reply, then ``change``s it."""
    def build(sent, node):
        reply = content(2.0, 20)
        change(reply)
        return [reply_to(sent[node], reply)]
    return build


def set_array(key: str, values: np.ndarray) -> Callable[[RecordDict], None]:
    return lambda reply: reply["arrays"].__setitem__(key, Array(values))


def replay(sent, node):
    """Node 14's honest reply delivered twice."""
    return [reply_to(sent[14], content(*HONEST[14])), reply_to(sent[14], content(*HONEST[14]))]


def forged(sent, node):
    """A reply to a train message this server never sent."""
    fake = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return [reply_to(fake, content(4.0, 40))]


def gaussian(sent, node):
    noise = np.random.default_rng(0)
    reply = content(2.0, 20)
    for key in SHAPES:
        reply["arrays"][key] = Array((2.0 + noise.normal(0.0, 50.0, SHAPES[key])).astype(np.float32))
    return [reply_to(sent[node], reply)]


@dataclass
class Case:
    attack: Callable[[dict[int, Message], int], list[Message]]
    outcome: str  # "rejected" (with ``error`` in the ledger row) or "neutralised" (aggregate ``expected``)
    expected: float = HONEST_FEDAVG
    error: str = ""
    strategy: dict = field(default_factory=dict)
    attackers: tuple[int, ...] = (15,)


BOUNDED = {"norm_bound": NormBound(absolute=BOUND)}
MEDIAN = {"aggregation": Aggregation.FEDMEDIAN}

CORPUS = {
    # huge norms: the bound rejects, clips, or rejects relative to the round's median norm
    "huge-norm": Case(answer(1e6), "rejected", error="update norm 3.4641e+06 is over the bound 17.3205", strategy=BOUNDED),
    "huge-norm-clipped": Case(answer(1e6, 40), "neutralised", (HONEST_FEDAVG * 100 + 5.0 * 40) / 140,
                              strategy={"norm_bound": NormBound(absolute=BOUND, clip=True)}),
    "huge-norm-relative": Case(answer(1e6), "rejected", error="over the bound 17.3205",  # 2 x the median, 2.5 x UNIT
                               strategy={"norm_bound": NormBound(relative=2.0)}),
    "gaussian-noise": Case(gaussian, "rejected", error="update norm", strategy=BOUNDED),
    "float64-overflow": Case(answer(1e300, dtype=np.float64), "rejected", error="update norm overflows float64"),
    # within any norm bound: the robust rules keep the aggregate inside the honest clients' range
    "sign-flip-median": Case(answer(-4.0, 40), "neutralised", 2.0, strategy=BOUNDED | MEDIAN),
    "sign-flip-krum": Case(answer(-4.0, 40), "neutralised", 2.0,  # the reply closest to its 2 nearest: 2.0
                           strategy={"aggregation": Aggregation.KRUM, "byzantine_clients": 1}),
    "scaled-trimmed-mean": Case(answer(40.0, 40), "neutralised", (2.0 + 2.5 + 4.0) / 3,  # one cut from each tail
                                strategy={"aggregation": Aggregation.FEDTRIMMEDAVG, "trim_beta": 0.2}),
    "tiny-but-many": Case(answer(-1.0, 40), "neutralised", 1.0, strategy=BOUNDED | MEDIAN, attackers=(15, 16, 17)),
    "zero-update": Case(answer(RECEIVED, 40), "neutralised", 2.0, strategy=MEDIAN),
    "sybil-copies-median": Case(answer(10.0, 40), "neutralised", (2.5 + 4.0) / 2, strategy=MEDIAN,
                                attackers=(15, 16)),
    # example counts: a claim buys at most the cap, or every reply weighs 1; absurd claims are refused
    "inflated-examples-capped": Case(answer(4.0, 10**8), "neutralised", (HONEST_FEDAVG * 100 + 4.0 * 40) / 140,
                                     strategy={"example_weights": ExampleWeights.CAPPED, "max_examples_per_client": 40}),
    "inflated-examples-uniform": Case(answer(4.0, 10**8), "neutralised", (1.0 + 2.0 + 2.5 + 4.0 + 4.0) / 5,
                                      strategy={"example_weights": ExampleWeights.UNIFORM}),
    "examples-over-limit": Case(answer(4.0, 10**12), "rejected", error="num-examples 1000000000000 is out of range"),
    "negative-examples": Case(answer(4.0, -5), "rejected", error="num-examples -5 is out of range"),
    # who answers: a node answers once, and only a message this round sent
    "duplicated-client": Case(replay, "rejected", error="node 14 already replied this round", attackers=(14,)),
    "unsolicited-reply": Case(forged, "rejected", error="answers no train message of this round"),
    # malformed updates
    "nan": Case(answer_with(set_array("layer.lora_A.weight", np.full((2, 3), np.nan, np.float32))),
                "rejected", error="contains NaN or inf"),
    "inf": Case(answer_with(set_array("layer.lora_B.weight", np.full((3, 2), -np.inf, np.float32))), "rejected",
                error="contains NaN or inf"),
    "wrong-dtype": Case(answer(4.0, 40, dtype=np.int32), "rejected", error="is not a float type"),
    "wrong-shape": Case(answer_with(set_array("layer.lora_A.weight", np.zeros((3, 2), np.float32))), "rejected",
                        error="shape (3, 2), expected (2, 3)"),
    "extra-tensor": Case(answer_with(set_array("layer.lora_C.weight", np.zeros((1,), np.float32))), "rejected",
                         error="unexpected ['layer.lora_C.weight']"),
    "missing-tensor": Case(answer(4.0, 40, keys=("layer.lora_A.weight",)), "rejected",
                           error="missing ['layer.lora_B.weight']"),
    "oversized": Case(answer_with(set_array("layer.lora_A.weight", np.zeros((2, 3000), np.float32))), "rejected",
                      error="over the limit of 10000 bytes"),
    "second-array-record": Case(answer_with(lambda reply: reply.__setitem__("extra", arrays(1.0))), "rejected",
                                error="exactly one ArrayRecord"),
    "metric-nan": Case(answer(4.0, 40, **{"eval-loss": float("nan")}), "rejected", error="is not a finite number"),
}


def play(ledger, case_strategy: dict, attackers: tuple[int, ...] = (),
         attack: Callable[[dict[int, Message], int], list[Message]] | None = None):
    """One round of the honest clients and the attackers; the aggregate and the ledger's run id."""
    nodes = sorted({*HONEST, *attackers})
    strategy, run_id = strategy_for(ledger, nodes=nodes, **case_strategy)
    messages = strategy.configure_train(1, arrays(RECEIVED), ConfigRecord({"base-hash": "x"}), FakeGrid(nodes))
    sent = {m.metadata.dst_node_id: m for m in messages}
    replies = [reply_to(sent[node], content(value, examples)) for node, (value, examples) in HONEST.items()
               if node not in attackers]  # an honest node can misbehave too (a replay)
    for node in attackers:
        replies.extend(attack(sent, node))
    aggregated, _ = strategy.aggregate_train(1, replies)
    return aggregated, run_id


def assert_everywhere(aggregated: ArrayRecord, value: float) -> None:
    for key in SHAPES:
        np.testing.assert_allclose(aggregated[key].numpy(), np.full(SHAPES[key], value), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_bad_update_is_rejected_or_neutralised(ledger, name):
    case = CORPUS[name]
    aggregated, run_id = play(ledger, case.strategy, case.attackers, case.attack)
    rows = [r for r in ledger.client_results(run_id) if int(r.node_id) in case.attackers]
    if case.outcome == "rejected":
        honest, _ = play(ledger, case.strategy)
        assert_everywhere(honest, case.expected)
        assert_everywhere(aggregated, case.expected)  # the honest clients' aggregate
        rejected = [r for r in rows if r.status == "rejected"]
        assert len(rejected) == 1 and case.error in rejected[0].error, [(r.status, r.error) for r in rows]
        assert "update-rejected" in [e.kind for e in ledger.events(run_id)]
    else:
        assert 1.0 <= case.expected <= 4.0  # inside the honest clients' range
        assert_everywhere(aggregated, case.expected)
        assert {r.status for r in rows} == {"ok"}


def test_the_corpus_holds_at_least_fifteen_kinds():
    assert len(CORPUS) >= 15
    assert {case.outcome for case in CORPUS.values()} == {"rejected", "neutralised"}


def test_without_the_defence_the_same_attacks_move_the_aggregate(ledger):
    # what the corpus would let through without its defence: the cases test something
    huge, _ = play(ledger, {}, (15,), answer(1e6))
    assert huge["layer.lora_A.weight"].numpy()[0, 0] > 1e4
    inflated, _ = play(ledger, {}, (15,), answer(10.0, 10**8))
    assert inflated["layer.lora_A.weight"].numpy()[0, 0] == pytest.approx(10.0, rel=1e-5)
    flipped, _ = play(ledger, {}, (15,), answer(-40.0, 40))
    assert flipped["layer.lora_A.weight"].numpy()[0, 0] < 0


def test_a_clipped_update_is_recorded_with_its_measured_norm(ledger):
    case = CORPUS["huge-norm-clipped"]
    _, run_id = play(ledger, case.strategy, case.attackers, case.attack)
    (row,) = [r for r in ledger.client_results(run_id) if r.node_id == "15"]
    assert row.status == "ok"
    assert row.metrics["update-norm"] == pytest.approx(1e6 * UNIT, rel=1e-6)
    assert row.metrics["update-clipped-to"] == pytest.approx(BOUND)
    (event,) = [e for e in ledger.events(run_id) if e.kind == "update-clipped"]
    assert event.node_id == "15" and "clipped to 17.3205" in event.message
    honest = {r.node_id: r.metrics["update-norm"] for r in ledger.client_results(run_id) if r.node_id != "15"}
    assert honest == pytest.approx({"11": 1.0 * UNIT, "12": 2.0 * UNIT, "13": 2.5 * UNIT, "14": 4.0 * UNIT}, rel=1e-6)


def test_the_ledger_keeps_the_claimed_examples_and_the_weight_they_bought(ledger):
    case = CORPUS["inflated-examples-capped"]
    _, run_id = play(ledger, case.strategy, case.attackers, case.attack)
    rows = {r.node_id: r for r in ledger.client_results(run_id)}
    assert rows["15"].num_examples == 10**8 and rows["15"].metrics["example-weight"] == 40
    assert rows["11"].num_examples == 10 and rows["11"].metrics["example-weight"] == 10


def test_the_norm_is_measured_from_what_each_node_received_under_a_per_domain_method(ledger):
    strategy, run_id = strategy_for(ledger, method="domain", nodes=(11, 12), norm_bound=NormBound(absolute=BOUND))
    domains = {11: "x", 12: "y"}
    for server_round, values in ((1, {11: 1.0, 12: 3.0}), (2, {11: 7.5, 12: 7.5})):
        sent = strategy.configure_train(server_round, arrays(0.0), ConfigRecord({"base-hash": "x"}), FakeGrid([11, 12]))
        replies = [reply_to(m, RecordDict({"arrays": arrays(values[m.metadata.dst_node_id]), "metrics": metrics(10),
                                           "identity": ConfigRecord({"domain": domains[m.metadata.dst_node_id]})}))
                   for m in sent]
        strategy.aggregate_train(server_round, replies)
    # round 2: node 11 was sent domain x's 1.0 (7.5 is 6.5 x UNIT away), node 12 domain y's 3.0 (4.5 x
    # UNIT away); from the global adapter (2.0) both would be 5.5 x UNIT away, over the bound
    statuses = sorted((r.round_number, r.node_id, r.status) for r in ledger.client_results(run_id))
    assert statuses == [(1, "11", "ok"), (1, "12", "ok"), (2, "11", "rejected"), (2, "12", "ok")]
    np.testing.assert_allclose(strategy.groups["domain:y"]["layer.lora_A.weight"].numpy(), 7.5)


def test_a_rejection_that_leaves_bulyan_too_few_replies_keeps_the_adapter_and_says_so(ledger):
    nodes = (11, 12, 13, 14, 15, 16, 17)  # 4f + 3 for f = 1
    strategy, run_id = strategy_for(ledger, nodes=nodes, aggregation=Aggregation.BULYAN, byzantine_clients=1,
                                    norm_bound=NormBound(absolute=BOUND))
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, arrays(0.5), ConfigRecord({"base-hash": "x"}), FakeGrid(nodes))}
    replies = [reply_to(sent[node], content(1e6 if node == 17 else 1.0, 10)) for node in nodes]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert_everywhere(aggregated, 0.5)  # six replies: Flower's Bulyan declines
    assert [e.kind for e in ledger.events(run_id)] == ["update-rejected", "group-not-aggregated"]


# --- the helpers, exactly -----------------------------------------------------------------------------


def test_update_norm_is_the_l2_norm_of_the_change_over_every_tensor():
    received = {"a": np.zeros((2, 3), np.float32), "b": np.ones((3, 2), np.float32)}
    returned = {"a": np.ones((2, 3), np.float32), "b": np.full((3, 2), 3.0, np.float32)}
    assert update_norm(received, returned) == pytest.approx(math.sqrt(6 * 1.0 + 6 * 4.0))
    assert update_norm(received, received) == 0.0
    assert update_norm({"a": np.zeros(2)}, {"a": np.array([1e300, 1e300])}) == math.inf


def test_clip_update_scales_the_change_to_the_bound_and_keeps_the_dtype():
    received = {"a": np.ones((2, 3), np.float32)}
    returned = {"a": np.full((2, 3), 4.0, np.float32)}  # change 3.0 on 6 values: norm 3 sqrt(6)
    clipped = clip_update(received, returned, bound=math.sqrt(6), norm=3 * math.sqrt(6))
    np.testing.assert_allclose(clipped["a"], 2.0, rtol=1e-6)  # change 1.0 on each value
    assert clipped["a"].dtype == np.float32
    unchanged = clip_update(received, returned, bound=100.0, norm=3 * math.sqrt(6))
    np.testing.assert_array_equal(unchanged["a"], returned["a"])
    np.testing.assert_array_equal(clip_update(received, received, bound=0.0, norm=0.0)["a"], received["a"])
    with pytest.raises(ValueError, match="infinite norm"):
        clip_update(received, returned, bound=1.0, norm=math.inf)


def test_the_norm_bound_is_the_tighter_of_its_parts():
    assert NormBound().limit([1.0, 2.0]) == math.inf
    assert NormBound(absolute=5.0).limit([1.0, 100.0]) == 5.0
    assert NormBound(relative=2.0).limit([1.0, 3.0, 10.0]) == 6.0  # 2 x the median
    assert NormBound(absolute=5.0, relative=2.0).limit([1.0, 3.0, 10.0]) == 5.0
    assert NormBound(relative=2.0).limit([1.0, math.inf, 3.0]) == 4.0  # an overflowing norm is no evidence
    assert NormBound(relative=2.0).limit([]) == math.inf


def test_example_weight_follows_the_policy():
    assert ExampleWeights("claimed").weight(7, 5) == 7
    assert ExampleWeights.CAPPED.weight(7, 5) == 5
    assert ExampleWeights.CAPPED.weight(3, 5) == 3
    assert ExampleWeights.UNIFORM.weight(10**8, 5) == 1
    with pytest.raises(ValueError, match="'trusted' is not a valid ExampleWeights"):
        ExampleWeights("trusted")


# --- Flower's robust rules on a hand-made set ------------------------------------------------------------

VALUES = (1.0, 2.0, 3.5, 4.0, 100.0)
EXAMPLES = (1, 2, 3, 4, 10)
# Krum's score (f = 1, n = 5: the n - f - 2 = 2 nearest) per reply, in squared distance per value:
# 1.0: 1 + 6.25; 2.0: 1 + 2.25; 3.5: 0.25 + 2.25; 4.0: 0.25 + 4; 100.0: 96^2 + 96.5^2
BY_HAND = {
    Aggregation.FEDAVG: (1.0 * 1 + 2.0 * 2 + 3.5 * 3 + 4.0 * 4 + 100.0 * 10) / 20,
    Aggregation.FEDMEDIAN: 3.5,
    Aggregation.FEDTRIMMEDAVG: (2.0 + 3.5 + 4.0) / 3,  # int(0.2 x 5) = 1 cut from each tail
    Aggregation.KRUM: 3.5,  # the lowest score, 2.5
    Aggregation.MULTIKRUM: (1.0 * 1 + 2.0 * 2 + 3.5 * 3 + 4.0 * 4) / 10,  # the n - f = 4 lowest, weighted
}
# Bulyan (f = 1) needs 7: Multi-Krum (the 4 nearest) keeps n - 2f = 5, whose coordinate-wise median is
# 4.0; the mean of the n - 4f = 3 of them nearest to it
BULYAN_VALUES = (1.0, 2.0, 3.5, 4.0, 5.0, 6.0, 100.0)
BULYAN_BY_HAND = (4.0 + 3.5 + 5.0) / 3


def rule_replies(values, examples) -> list[Message]:
    return [Message(RecordDict({"arrays": arrays(value), "metrics": metrics(count)}), dst_node_id=i + 1,
                    message_type=MessageType.TRAIN) for i, (value, count) in enumerate(zip(values, examples))]


@pytest.mark.parametrize("rule", sorted(BY_HAND, key=lambda rule: rule.value))
def test_each_robust_rule_aggregates_a_hand_made_set_to_the_hand_computed_value(rule):
    replies = rule_replies(VALUES, EXAMPLES)
    aggregated = aggregate_group(make_rule(rule, trim_beta=0.2, byzantine_clients=0 if rule is Aggregation.FEDAVG else 1),
                                 1, arrays(0.0), replies)
    assert_everywhere(aggregated, BY_HAND[rule])
    assert all(set(reply.content["arrays"].keys()) == set(SHAPES) for reply in replies)  # the rule read copies


def test_bulyan_aggregates_a_hand_made_set_to_the_hand_computed_value():
    aggregated = aggregate_group(make_rule(Aggregation.BULYAN, byzantine_clients=1), 1, arrays(0.0),
                                 rule_replies(BULYAN_VALUES, [1] * 7))
    assert_everywhere(aggregated, BULYAN_BY_HAND)
    assert aggregate_group(make_rule(Aggregation.BULYAN, byzantine_clients=1), 1, arrays(0.0),
                           rule_replies(BULYAN_VALUES[:6], [1] * 6)) is None  # under 4f + 3: declined


def test_multikrum_keeps_the_configured_number_of_replies():
    aggregated = aggregate_group(make_rule(Aggregation.MULTIKRUM, byzantine_clients=1, krum_keep=2), 1, arrays(0.0),
                                 rule_replies(VALUES, EXAMPLES))
    assert_everywhere(aggregated, (2.0 * 2 + 3.5 * 3) / 5)  # the two lowest scores: 3.5 and 2.0


@pytest.mark.parametrize("rule", list(Aggregation), ids=lambda rule: rule.value)
def test_weighs_by_examples_says_whether_num_examples_moves_each_rules_aggregate(rule):
    def aggregate(examples):
        return float(aggregate_group(make_rule(rule, byzantine_clients=1 if rule.selects_replies else 0), 1,
                                     arrays(0.0), rule_replies(BULYAN_VALUES, examples))["layer.lora_A.weight"].numpy()[0, 0])

    moved = aggregate([1, 1, 1, 1, 1, 1, 1]) != pytest.approx(aggregate([1, 1, 30, 1, 1, 1, 1]))
    assert moved is rule.weighs_by_examples


def test_min_replies_is_each_rules_minimum():
    assert Aggregation.KRUM.min_replies(2, 0.2) == 7 and Aggregation.MULTIKRUM.min_replies(0, 0.2) == 3
    assert Aggregation.BULYAN.min_replies(1, 0.2) == 7
    assert Aggregation.FEDMEDIAN.min_replies(0, 0.2) == 3
    assert Aggregation.FEDTRIMMEDAVG.min_replies(0, 0.2) == 5 and Aggregation.FEDTRIMMEDAVG.min_replies(0, 0.3) == 4
    assert Aggregation.FEDAVG.min_replies(0, 0.2) == 1
    with pytest.raises(ValueError, match="trims nothing"):
        Aggregation.FEDTRIMMEDAVG.min_replies(0, 0.0)

"""The server strategy on hand-built Flower messages: aggregation, grouping, rejection, ledger rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.aggregation import EVALUATE_METRICS
from server.strategy import FederatedAdapters, NodeWaitTimeout, wait_for_nodes
from shared.methods import METHODS, Aggregation

SHAPES = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2)}


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


@pytest.fixture(autouse=True)
def task_identity():
    # Messages are stamped with the run id of the process; set one as a ServerApp process has.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def arrays(value: float, keys=SHAPES) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(SHAPES[k], value, dtype=np.float32)) for k in keys})


def metrics(examples: int, **extra) -> MetricRecord:
    values = {"num-examples": examples, "train-loss": 1.0, "train-steps": 2.0, "eval-loss-before": 2.0,
              "eval-loss": 1.5, "eval-perplexity": 4.5, "eval-accuracy": 0.3, "eval-tokens": 10.0, "seconds": 1.0,
              "peak-rss-mb": 300.0}
    values.update(extra)
    return MetricRecord(values)


def reply_to(message: Message, content: RecordDict) -> Message:
    message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"  # as the SuperLink does on push
    reply = Message(content, reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
    return reply


def strategy_for(ledger, method="fedavg", nodes=(11, 12, 13), **kwargs):
    run_id = ledger.start_run(99, {}, "tiny", "f" * 64, method=method)
    strategy = FederatedAdapters(ledger, run_id, METHODS[method], adapter_shapes=SHAPES, max_update_bytes=10_000,
                                 node_wait_seconds=5, evaluate_rounds={2}, min_train_nodes=len(nodes),
                                 min_available_nodes=len(nodes), **kwargs)
    return strategy, run_id


def one_round(strategy, nodes, answers, server_round=1, initial=0.0, method=None):
    """answers: node -> (value, examples, domain) or a ready RecordDict; ``method`` when ``strategy`` is a wrapper."""
    method = method or strategy.method
    sent = list(strategy.configure_train(server_round, arrays(initial), ConfigRecord({"base-hash": "x"}), FakeGrid(nodes)))
    replies = []
    for message in sent:
        answer = answers[message.metadata.dst_node_id]
        if isinstance(answer, RecordDict):
            content = answer
        else:
            value, examples, domain = answer
            keys = [k for k in SHAPES if method.shared_key(k)]
            content = RecordDict({"arrays": arrays(value, keys), "metrics": metrics(examples),
                                  "identity": ConfigRecord({"user-id": f"u{message.metadata.dst_node_id}",
                                                            "domain": domain})})
        replies.append(reply_to(message, content))
    return sent, strategy.aggregate_train(server_round, replies)


def test_fedavg_equals_the_hand_computed_weighted_average(ledger):
    strategy, run_id = strategy_for(ledger)
    _, (aggregated, agg_metrics) = one_round(strategy, [11, 12, 13], {11: (1.0, 10, "a"), 12: (2.0, 30, "a"),
                                                                      13: (4.0, 60, "b")})
    expected = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    for key in SHAPES:
        np.testing.assert_allclose(aggregated[key].numpy(), np.full(SHAPES[key], expected), rtol=1e-6)
    assert agg_metrics["eval-loss"] == pytest.approx(1.5)
    (round_,) = ledger.rounds(run_id)
    assert (round_.clients_sampled, round_.clients_replied, round_.clients_failed) == (3, 3, 0)
    assert round_.bytes_up == 3 * sum(len(a.data) for a in arrays(0.0).values())
    results = ledger.client_results(run_id, 1)
    assert sorted(r.user_id for r in results) == ["u11", "u12", "u13"]
    assert {r.node_id: r.num_examples for r in results} == {"11": 10, "12": 30, "13": 60}
    np.testing.assert_allclose(ledger.load_checkpoint(run_id, 1)["layer.lora_A.weight"], expected, rtol=1e-6)


def test_domain_method_aggregates_each_domain_over_its_own_clients(ledger):
    strategy, run_id = strategy_for(ledger, method="domain")
    one_round(strategy, [11, 12, 13], {11: (1.0, 10, "comedies"), 12: (3.0, 30, "comedies"), 13: (7.0, 50, "tragedies")})
    comedies = strategy.groups["domain:comedies"]["layer.lora_B.weight"].numpy()
    tragedies = strategy.groups["domain:tragedies"]["layer.lora_B.weight"].numpy()
    np.testing.assert_allclose(comedies, (1.0 * 10 + 3.0 * 30) / 40, rtol=1e-6)
    np.testing.assert_allclose(tragedies, 7.0, rtol=1e-6)
    np.testing.assert_allclose(strategy.groups["global"]["layer.lora_B.weight"].numpy(), (10 + 90 + 350) / 90, rtol=1e-6)
    # next round each node receives its own domain's adapter
    sent, _ = one_round(strategy, [11, 12, 13], {11: (1.0, 10, "comedies"), 12: (1.0, 10, "comedies"),
                                                  13: (1.0, 10, "tragedies")}, server_round=2)
    received = {m.metadata.dst_node_id: m.content["arrays"]["layer.lora_A.weight"].numpy()[0, 0] for m in sent}
    assert received[11] == pytest.approx(2.5) and received[13] == pytest.approx(7.0)
    assert set(ledger.load_checkpoint(run_id, 1, domain="tragedies")) == set(SHAPES)


def test_domain_mix_pulls_domains_toward_the_global_adapter(ledger):
    strategy, _ = strategy_for(ledger, method="domain", domain_mix=0.5, nodes=(11, 12))
    one_round(strategy, [11, 12], {11: (2.0, 10, "x"), 12: (4.0, 10, "y")})
    np.testing.assert_allclose(strategy.groups["domain:x"]["layer.lora_A.weight"].numpy(), 0.5 * 2.0 + 0.5 * 3.0)


def test_fedsa_aggregates_only_A_and_never_sees_B(ledger):
    strategy, _ = strategy_for(ledger, method="fedsa")
    sent, (aggregated, _) = one_round(strategy, [11, 12, 13], {11: (1.0, 1, "a"), 12: (2.0, 1, "a"), 13: (3.0, 2, "a")})
    assert all(set(m.content["arrays"].keys()) == {"layer.lora_A.weight"} for m in sent)
    assert set(aggregated.keys()) == {"layer.lora_A.weight"}
    np.testing.assert_allclose(aggregated["layer.lora_A.weight"].numpy(), (1 + 2 + 6) / 4, rtol=1e-6)


def test_a_reply_with_B_under_fedsa_is_rejected(ledger):
    strategy, run_id = strategy_for(ledger, method="fedsa", nodes=(11, 12))
    leaking = RecordDict({"arrays": arrays(5.0), "metrics": metrics(1), "identity": ConfigRecord({"domain": "a"})})
    _, (aggregated, _) = one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: leaking})
    np.testing.assert_allclose(aggregated["layer.lora_A.weight"].numpy(), 1.0)
    assert {r.node_id: r.status for r in ledger.client_results(run_id)} == {"11": "ok", "12": "rejected"}


@pytest.mark.parametrize("bad", ["nan", "shape", "keys", "weight", "metric-nan", "oversized", "metric-unknown",
                                 "metric-missing"])
def test_hostile_updates_are_rejected_recorded_and_not_averaged(ledger, bad):
    strategy, run_id = strategy_for(ledger, nodes=(11, 12))
    content = RecordDict({"arrays": arrays(100.0), "metrics": metrics(10), "identity": ConfigRecord({"domain": "a"})})
    if bad == "nan":
        values = np.full(SHAPES["layer.lora_A.weight"], np.nan, np.float32)
        content["arrays"]["layer.lora_A.weight"] = Array(values)
    elif bad == "shape":
        content["arrays"]["layer.lora_A.weight"] = Array(np.zeros((9, 9), np.float32))
    elif bad == "keys":
        content["arrays"]["layer.extra"] = Array(np.zeros((1,), np.float32))
    elif bad == "weight":
        content["metrics"] = metrics(10**12)
    elif bad == "metric-nan":
        content["metrics"] = metrics(10, **{"eval-loss": float("nan")})
    elif bad == "metric-unknown":
        content["metrics"] = metrics(10, **{"secret": 1.0})
    elif bad == "metric-missing":
        content["metrics"] = MetricRecord({k: v for k, v in metrics(10).items() if k != "train-loss"})
    elif bad == "oversized":
        content["arrays"]["layer.lora_A.weight"] = Array(np.zeros((2, 3000), np.float32))
    _, (aggregated, _) = one_round(strategy, [11, 12], {11: (1.0, 10, "a"), 12: content})
    np.testing.assert_allclose(aggregated["layer.lora_A.weight"].numpy(), 1.0)  # only the honest client
    statuses = {r.node_id: (r.status, r.error) for r in ledger.client_results(run_id)}
    assert statuses["12"][0] == "rejected" and statuses["12"][1]
    assert [e.kind for e in ledger.events(run_id)] == ["update-rejected"]
    assert ledger.rounds(run_id)[0].clients_failed == 1


def test_the_optional_personal_best_step_metric_is_accepted_and_recorded(ledger):
    strategy, run_id = strategy_for(ledger, nodes=(11, 12))
    content = RecordDict({"arrays": arrays(3.0), "metrics": metrics(10, **{"personal-best-step": 4.0}),
                          "identity": ConfigRecord({"domain": "a"})})
    _, (aggregated, _) = one_round(strategy, [11, 12], {11: (1.0, 10, "a"), 12: content})
    np.testing.assert_allclose(aggregated["layer.lora_A.weight"].numpy(), 2.0)
    rows = {r.node_id: r for r in ledger.client_results(run_id)}
    assert rows["12"].status == "ok" and rows["12"].metrics["personal-best-step"] == 4.0


def test_a_retrieval_methods_evaluation_metrics_are_accepted_and_recorded(ledger):
    strategy, run_id = strategy_for(ledger, nodes=(11, 12))
    strategy.evaluate_rounds = {1, 2}
    one_round(strategy, [11, 12], {11: (1.0, 10, "a"), 12: (1.0, 10, "a")})
    sent = list(strategy.configure_evaluate(1, arrays(0.0), ConfigRecord(), FakeGrid([11, 12])))
    scores = {key: 1.0 for key in EVALUATE_METRICS}
    extra = {"shared-perplexity": 90.0, "model-perplexity": 90.0, "model-loss": 4.5, "cache-weight": 0.2,
             "cache-temperature": 30.0, "cache-neighbours": 128.0, "cache-validation-loss": 4.4, "cache-keys": 2000.0}
    strategy.aggregate_evaluate(1, [reply_to(m, RecordDict({"metrics": MetricRecord({**scores, **extra})})) for m in sent])
    rows = [r for r in ledger.client_results(run_id) if r.phase == "evaluate"]
    assert len(rows) == 2 and all(r.status == "ok" and r.metrics["cache-weight"] == 0.2 for r in rows)
    unknown = {**scores, "cache-secret": 1.0}  # anything else is still refused
    one_round(strategy, [11, 12], {11: (1.0, 10, "a"), 12: (1.0, 10, "a")}, server_round=2)
    sent = list(strategy.configure_evaluate(2, arrays(0.0), ConfigRecord(), FakeGrid([11, 12])))
    strategy.aggregate_evaluate(2, [reply_to(m, RecordDict({"metrics": MetricRecord(unknown)})) for m in sent])
    assert [r.status for r in ledger.client_results(run_id, 2) if r.phase == "evaluate"] == ["rejected"] * 2


def test_failed_and_missing_clients_are_recorded_against_their_nodes(ledger):
    strategy, run_id = strategy_for(ledger)
    sent = list(strategy.configure_train(1, arrays(0.0), ConfigRecord({"base-hash": "x"}), FakeGrid([11, 12, 13])))
    by_node = {m.metadata.dst_node_id: m for m in sent}
    good = reply_to(by_node[11], RecordDict({"arrays": arrays(1.0), "metrics": metrics(5),
                                             "identity": ConfigRecord({"domain": "a"})}))
    # a dead node's error reply comes from the SuperLink (src 0), matched through reply_to_message_id
    from flwr.app import Error
    by_node[12].metadata.__dict__["_message_id"] = "m12"
    dead = Message(Error(code=5, reason="node unavailable"), reply_to=by_node[12])
    dead.metadata.__dict__["_src_node_id"] = 0
    aggregated, _ = strategy.aggregate_train(1, [good, dead])  # node 13 never answers
    np.testing.assert_allclose(aggregated["layer.lora_A.weight"].numpy(), 1.0)
    results = {r.node_id: r for r in ledger.client_results(run_id)}
    assert results["12"].status == "failed" and "node unavailable" in results["12"].error
    assert results["13"].status == "failed" and "no reply" in results["13"].error
    assert ledger.rounds(run_id)[0].clients_failed == 2


def test_fedadam_steps_from_the_current_adapter(ledger):
    strategy, _ = strategy_for(ledger, aggregation=Aggregation.FEDADAM, server_learning_rate=0.1, nodes=(11, 12))
    _, (aggregated, _) = one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: (1.0, 1, "a")})
    value = aggregated["layer.lora_A.weight"].numpy()[0, 0]
    # Adam's first step from the adapter (0.0) toward the average (1.0), with Flower's FedAdam defaults
    # (beta_1 0.9, beta_2 0.99, tau 1e-3) and its bias correction at server_round + 1
    eta, beta_1, beta_2, tau, delta = 0.1, 0.9, 0.99, 1e-3, 1.0
    m, v = (1 - beta_1) * delta, (1 - beta_2) * delta**2
    eta_norm = eta * math.sqrt(1 - beta_2 ** (1 + 1)) / (1 - beta_1 ** (1 + 1))
    assert value == pytest.approx(eta_norm * m / (math.sqrt(v) + tau), rel=1e-6)  # float32 moments


def test_fedadagrad_accumulates_squared_steps_from_the_current_adapter(ledger):
    strategy, _ = strategy_for(ledger, aggregation=Aggregation.FEDADAGRAD, server_learning_rate=0.1, nodes=(11, 12))
    _, (first, _) = one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: (1.0, 1, "a")})
    _, (second, _) = one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: (1.0, 1, "a")}, server_round=2)
    # Adagrad (Flower's FedAdagrad: tau 1e-3, no momentum): v accumulates each step's square
    eta, tau = 0.1, 1e-3
    x1 = eta * 1.0 / (math.sqrt(1.0) + tau)
    delta = 1.0 - x1
    x2 = x1 + eta * delta / (math.sqrt(1.0 + delta**2) + tau)
    assert first["layer.lora_A.weight"].numpy()[0, 0] == pytest.approx(x1, rel=1e-6)
    assert second["layer.lora_B.weight"].numpy()[1, 1] == pytest.approx(x2, rel=1e-6)


def test_fedavgm_steps_with_server_momentum(ledger):
    strategy, _ = strategy_for(ledger, aggregation=Aggregation.FEDAVGM, server_learning_rate=0.5, server_momentum=0.9,
                               nodes=(11, 12))
    _, (first, _) = one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: (1.0, 1, "a")})
    _, (second, _) = one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: (1.0, 1, "a")}, server_round=2)
    # pseudo-gradient g = current - mean; momentum m = 0.9 m + g; x -= 0.5 m
    # round 1: g = -1, m = -1, x = 0.5; round 2: g = -0.5, m = -1.4, x = 0.5 + 0.7 = 1.2 (past the mean)
    np.testing.assert_allclose(first["layer.lora_A.weight"].numpy(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(second["layer.lora_A.weight"].numpy(), 1.2, rtol=1e-6)


def test_waiting_for_nodes_has_a_deadline():
    with pytest.raises(NodeWaitTimeout, match="only 1 of the 3 required nodes"):
        wait_for_nodes(FakeGrid([1]), 3, deadline_seconds=0.3, poll_seconds=0.1)
    assert wait_for_nodes(FakeGrid([1, 2, 3]), 3, deadline_seconds=0.1) == [1, 2, 3]


def test_rounds_without_evaluation_record_no_phantom_evaluation_failures(ledger):
    strategy, run_id = strategy_for(ledger, nodes=(11, 12))
    strategy.evaluate_rounds = {1}
    one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: (1.0, 1, "a")}, server_round=1)
    sent = list(strategy.configure_evaluate(1, arrays(0.0), ConfigRecord(), FakeGrid([11, 12])))
    scores = MetricRecord({key: 1.0 for key in ("num-examples", "base-loss", "base-perplexity", "base-accuracy",
                                                "eval-loss", "eval-perplexity", "eval-accuracy", "eval-tokens", "seconds")})
    strategy.aggregate_evaluate(1, [reply_to(m, RecordDict({"metrics": scores})) for m in sent])
    one_round(strategy, [11, 12], {11: (1.0, 1, "a"), 12: (1.0, 1, "a")}, server_round=2)
    assert list(strategy.configure_evaluate(2, arrays(0.0), ConfigRecord(), FakeGrid([11, 12]))) == []
    strategy.aggregate_evaluate(2, [])
    assert all(r.status == "ok" for r in ledger.client_results(run_id))
    assert [e.kind for e in ledger.events(run_id)] == []

"""Server overhead: a round's ledger writes in one transaction, and adapter checkpoints on a policy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from sqlalchemy import event

from server.ledger import CheckpointPolicy, Ledger, LedgerError
from server.strategy import ResumedRounds
from shared.config import ConfigError, FederationConfig
from test_strategy import FakeGrid, arrays, metrics, one_round, reply_to, strategy_for, task_identity  # noqa: F401

NODES = [11, 12, 13, 14, 15]
ANSWERS = [{11: (1.0, 10, "a"), 12: (3.0, 30, "b")}, {11: (-2.0, 10, "a"), 12: (0.5, 30, "b")},
           {11: (4.0, 10, "a"), 12: (1.0, 30, "b")}]


def count_commits(ledger: Ledger) -> list[int]:
    """A one-item list counting the transactions the ledger's engine commits from now on."""
    commits = [0]
    event.listen(ledger.engine, "commit", lambda _connection: commits.__setitem__(0, commits[0] + 1))
    return commits


def test_a_rounds_client_results_events_and_checkpoint_are_one_commit(ledger):
    strategy, run_id = strategy_for(ledger, nodes=NODES)
    sent = list(strategy.configure_train(1, arrays(0.0), ConfigRecord({"base-hash": "x"}), FakeGrid(NODES)))
    replies = [reply_to(message, RecordDict({"arrays": arrays(1.0), "metrics": metrics(10),
                                             "identity": ConfigRecord({"user-id": f"u{message.metadata.dst_node_id}",
                                                                       "domain": "a"})}))
               for message in sent[:3]]
    replies.append(reply_to(sent[3], RecordDict({"arrays": arrays(float("nan")), "metrics": metrics(10)})))
    # the fifth node never answers: a failed result and an event, in the same transaction
    commits = count_commits(ledger)
    strategy.aggregate_train(1, replies)
    assert commits[0] == 1
    nodes = [str(message.metadata.dst_node_id) for message in sent]  # in the sampler's order
    results = ledger.client_results(run_id, 1)
    assert {r.node_id: r.status for r in results} == {nodes[0]: "ok", nodes[1]: "ok", nodes[2]: "ok",
                                                       nodes[3]: "rejected", nodes[4]: "failed"}
    assert {e.kind for e in ledger.events(run_id)} == {"update-rejected", "client-failed"}
    assert ledger.rounds(run_id)[0].clients_replied == 3
    assert ledger.checkpoint_domains(run_id, 1) == [""]


def test_a_batch_is_invisible_to_readers_until_it_commits(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "f" * 64)
    with Ledger(ledger.engine.url.render_as_string(), read_only=True) as reader:
        with ledger.batch():
            ledger.record_event(run_id, "note", "first")
            ledger.record_event(run_id, "note", "second")
            assert reader.events(run_id) == []
        assert [e.message for e in reader.events(run_id)] == ["first", "second"]


def test_a_batch_left_by_an_exception_keeps_none_of_its_writes(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "f" * 64)
    with pytest.raises(RuntimeError, match="server died"):
        with ledger.batch():
            ledger.start_round(run_id, 1, clients_sampled=2, bytes_down=0)
            ledger.record_event(run_id, "note", "lost")
            raise RuntimeError("server died")
    assert ledger.rounds(run_id) == [] and ledger.events(run_id) == []


def test_a_failed_write_inside_a_batch_leaves_the_others(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "f" * 64)
    ledger.start_round(run_id, 1, clients_sampled=2, bytes_down=0)
    with ledger.batch():
        ledger.record_event(run_id, "note", "before")
        with pytest.raises(LedgerError, match="already in the ledger"):
            ledger.start_round(run_id, 1, clients_sampled=2, bytes_down=0)
        ledger.record_event(run_id, "note", "after")
    assert [e.message for e in ledger.events(run_id)] == ["before", "after"]
    assert len(ledger.rounds(run_id)) == 1


def test_batches_do_not_nest(ledger):
    with ledger.batch():
        with pytest.raises(LedgerError, match="do not nest"):
            with ledger.batch():
                pass


def test_a_read_only_ledger_refuses_a_batch(ledger):
    with Ledger(ledger.engine.url.render_as_string(), read_only=True) as reader:
        with pytest.raises(LedgerError, match="read-only"):
            with reader.batch():
                pass


@pytest.mark.parametrize("every, last, due", [(1, 5, [1, 2, 3, 4, 5, 6, 7]), (2, 5, [2, 4, 5, 6]), (3, 7, [3, 6, 7]),
                                              (10, 4, [4]), (2, 0, [2, 4, 6])])
def test_the_policy_checkpoints_every_kth_round_and_the_last(every, last, due):
    policy = CheckpointPolicy(every, last)
    assert [number for number in range(1, 8) if policy.due(number)] == due


def test_a_policy_of_zero_rounds_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        CheckpointPolicy(0)


def test_the_strategy_writes_checkpoints_exactly_on_the_policys_rounds(ledger):
    strategy, run_id = strategy_for(ledger, nodes=[11, 12], checkpoints=CheckpointPolicy(2, last=5))
    for number in range(1, 6):
        one_round(strategy, [11, 12], ANSWERS[number % 3], server_round=number)
    assert [n for n in range(1, 6) if ledger.checkpoint_domains(run_id, n)] == [2, 4, 5]
    np.testing.assert_allclose(ledger.load_checkpoint(run_id)["layer.lora_A.weight"],
                               strategy.groups["global"]["layer.lora_A.weight"].numpy())


def test_a_resumed_run_continues_after_its_latest_checkpoint(ledger):
    kwargs = {"method": "fedavg", "aggregation": "fedadam", "server_learning_rate": 0.3, "nodes": [11, 12]}
    reference, _ = strategy_for(ledger, **kwargs)
    for number, answers in enumerate(ANSWERS, start=1):
        reference_sent, _ = one_round(reference, [11, 12], answers, server_round=number)

    crashed, run_id = strategy_for(ledger, checkpoints=CheckpointPolicy(2, last=4), **kwargs)
    for number in (1, 2, 3):
        one_round(crashed, [11, 12], ANSWERS[number - 1], server_round=number)
    list(crashed.configure_train(4, arrays(0.0), ConfigRecord({"base-hash": "x"}), FakeGrid([11, 12])))

    last = ledger.resume_run(run_id, flower_run_id=555, from_checkpoint=True)
    assert last == 2  # round 3 finished, but only round 2 has a checkpoint
    assert [r.number for r in ledger.rounds(run_id)] == [1, 2]
    (resume,) = [e for e in ledger.events(run_id) if e.kind == "resume"]
    assert "after round 2" in resume.message and "[3, 4]" in resume.message
    resumed, _ = strategy_for(ledger, **kwargs)
    resumed.run_id = run_id
    resumed.restore(last)
    sent, _ = one_round(ResumedRounds(resumed, last), [11, 12], ANSWERS[2], server_round=1, method=resumed.method)
    assert all(m.content["config"]["server-round"] == 3 for m in sent)
    for key in reference.groups["global"].keys():  # FedAdam's moments came back from the checkpoint too
        np.testing.assert_allclose(resumed.groups["global"][key].numpy(), reference.groups["global"][key].numpy(),
                                   rtol=1e-6)


def test_resume_without_a_checkpoint_yet_starts_over_and_without_from_checkpoint_keeps_every_round(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "f" * 64)
    for number in (1, 2):
        ledger.start_round(run_id, number, clients_sampled=1, bytes_down=0)
        ledger.finish_round(run_id, number, clients_replied=1, clients_failed=0, metrics={}, bytes_up=0)
    assert ledger.resume_run(run_id, 2) == 2  # a method with nothing to checkpoint: the committed rounds
    assert ledger.resume_run(run_id, 3, from_checkpoint=True) == 0
    assert ledger.rounds(run_id) == []


def test_checkpoint_every_is_a_positive_run_config_key():
    assert FederationConfig.from_run_config({"checkpoint-every": 5}).checkpoint_every == 5
    with pytest.raises(ConfigError, match="checkpoint-every must be > 0"):
        FederationConfig.from_run_config({"checkpoint-every": 0})


def test_dp_refuses_checkpoints_less_often_than_every_round():
    private = {"dp": "server-fixed", "example-weights": "uniform"}
    FederationConfig.from_run_config(private)
    with pytest.raises(ConfigError, match="checkpoint-every = 3"):
        FederationConfig.from_run_config({**private, "checkpoint-every": 3})

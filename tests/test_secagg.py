"""Secure aggregation with Flower's SecAgg+: the bridge, the refusals, the protocol in process, and a real `flwr run`."""

from __future__ import annotations

import copy
import io
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
from flwr.supercore.task_identity import TaskIdentity

from client.secure import legacy_fit_bridge, secure_aggregation_mod, to_fit_result, to_train_message
from server.aggregation import make_rule
from server.ledger import Ledger
from server.secure import SecureAdapters, run_secure_rounds
from server.strategy import FederatedAdapters
from shared.adapters import AdapterUpdateError
from shared.config import ConfigError, FederationConfig
from shared.methods import METHODS, Aggregation
from shared.secure import ADAPTER_KEYS

SHAPES = {"layer.lora_A.weight": (4, 3), "layer.lora_B.weight": (3, 4)}
KEYS = list(SHAPES)
SECURE = {"secure-aggregation": True, "example-weights": "uniform", "min-train-nodes": 3}
STEP = 16 / 4194304  # Flower's default quantization: clipping range [-8, 8] on 2**22 levels
TRAIN_METRICS = {"train-loss": 1.0, "train-steps": 2.0, "eval-loss-before": 2.0, "eval-loss": 1.5,
                 "eval-perplexity": 4.5, "eval-accuracy": 0.3, "eval-tokens": 10.0, "seconds": 1.0, "peak-rss-mb": 300.0}


@pytest.fixture(autouse=True)
def task_identity():
    # Messages are stamped with the run id of the process; set one as a ServerApp process has.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def config(**overrides) -> FederationConfig:
    return FederationConfig.from_run_config({**SECURE, **overrides})


def context(run_config: dict, node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config=run_config)


def fit_message(values: list[np.ndarray], keys=KEYS, node_id: int = 7) -> Message:
    """A legacy fit message as Flower's SecAgg+ workflow sends it in its third stage (without the protocol's record)."""
    fit = FitIns(ndarrays_to_parameters(values), {"base-hash": "h", "server-round": 2, ADAPTER_KEYS: list(keys)})
    return Message(fitins_to_recorddict(fit, keep_input=True), dst_node_id=node_id, message_type="train")


def train_reply(msg: Message, arrays: dict[str, np.ndarray], examples: int = 7) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": examples, **TRAIN_METRICS}),
                               "identity": ConfigRecord({"user-id": f"user-{msg.metadata.dst_node_id}",
                                                         "domain": "tragedies", "base-hash": "h"})}),
                   reply_to=msg)


RNG = np.random.default_rng(0)
SENT = [RNG.normal(0, 0.1, SHAPES[key]).astype(np.float32) for key in KEYS]


# --- the bridge -----------------------------------------------------------------------------------


def test_a_fit_message_becomes_this_apps_train_message_with_the_tensors_named_exactly():
    keys, train = to_train_message(fit_message(SENT))
    assert keys == KEYS
    assert list(train.content["arrays"].keys()) == KEYS
    for key, value in zip(KEYS, SENT):
        np.testing.assert_array_equal(train.content["arrays"][key].numpy(), value)
        assert train.content["arrays"][key].numpy().dtype == np.float32
    assert dict(train.content["config"]) == {"base-hash": "h", "server-round": 2}
    assert train.metadata.message_type == "train" and train.metadata.dst_node_id == 7


@pytest.mark.parametrize("policy, extra, weight", [("uniform", {}, 1), ("capped", {"max-examples-per-client": 5}, 5),
                                                   ("capped", {"max-examples-per-client": 50}, 7)])
def test_a_train_reply_becomes_a_fit_result_in_the_named_order_weighted_by_the_policy(policy, extra, weight):
    updated = {key: value + 1.0 for key, value in zip(KEYS, SENT)}
    reply = train_reply(fit_message(SENT), dict(reversed(updated.items())), examples=7)  # order must not matter
    fitres = recorddict_to_fitres(to_fit_result(reply.content, KEYS, config(**{"example-weights": policy}, **extra)),
                                  keep_input=True)
    for got, key in zip(parameters_to_ndarrays(fitres.parameters), KEYS, strict=True):
        np.testing.assert_array_equal(got, updated[key])
    assert fitres.num_examples == weight
    assert fitres.metrics["num-examples"] == 7  # the claim stays for the ledger
    assert fitres.metrics["user-id"] == "user-7" and fitres.metrics["train-loss"] == 1.0


def test_the_bridge_round_trips_the_apps_update_exactly():
    seen: list[Message] = []

    def train(msg: Message, ctx: Context) -> Message:
        seen.append(msg)
        return train_reply(msg, {k: a.numpy() * 2 - 0.5 for k, a in msg.content["arrays"].items()})

    msg = fit_message(SENT)
    reply = legacy_fit_bridge(msg, context(SECURE), train, config())
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    for got, sent in zip(parameters_to_ndarrays(fitres.parameters), SENT, strict=True):
        np.testing.assert_array_equal(got, sent * 2 - 0.5)
    assert set(seen[0].content.array_records) == {"arrays"}


def test_a_failed_training_drops_the_node_out_of_the_round_with_its_reason():
    failing = lambda msg, ctx: Message(Error(code=2, reason="out of memory"), reply_to=msg)  # noqa: E731
    with pytest.raises(RuntimeError, match="out of memory"):
        legacy_fit_bridge(fit_message(SENT), context(SECURE), failing, config())


def test_the_bridge_refuses_a_fit_message_without_names_or_with_the_wrong_count():
    unnamed = fit_message(SENT)
    del unnamed.content.config_records["fitins.config"][ADAPTER_KEYS]
    with pytest.raises(AdapterUpdateError, match="adapter-keys"):
        to_train_message(unnamed)
    with pytest.raises(AdapterUpdateError, match="2 arrays for 3 names"):
        to_train_message(fit_message(SENT, keys=KEYS + ["extra"]))


def test_the_bridge_refuses_a_reply_with_other_tensors_than_named():
    reply = train_reply(fit_message(SENT), {KEYS[0]: SENT[0]})
    with pytest.raises(AdapterUpdateError, match="not the ones the server named"):
        to_fit_result(reply.content, KEYS, config())


def test_the_mod_passes_every_message_through_when_secure_aggregation_is_off():
    msg, answer = fit_message(SENT), object()
    calls = []
    result = secure_aggregation_mod(msg, context({}), lambda m, c: calls.append(m) or answer)
    assert result is answer and calls == [msg]


def test_the_mod_passes_evaluate_messages_through_when_secure_aggregation_is_on():
    msg = Message(RecordDict({"config": ConfigRecord({"base-hash": "h"})}), dst_node_id=7, message_type="evaluate")
    answer, calls = object(), []
    assert secure_aggregation_mod(msg, context(SECURE), lambda m, c: calls.append(m) or answer) is answer
    assert calls == [msg]


# --- refusals -------------------------------------------------------------------------------------


def test_the_secure_defaults_are_accepted():
    settings = config()
    assert settings.secure_aggregation and (settings.secagg_num_shares, settings.secagg_reconstruction_threshold) == (3, 2)


@pytest.mark.parametrize("overrides, names", [
    ({"method": "domain"}, "per domain"),
    ({"method": "dual-domain"}, "per domain"),
    ({"method": "local"}, "sends no update"),
    ({"aggregation": "fedmedian"}, "robust rule"),
    ({"aggregation": "krum", "min-train-nodes": 5}, "robust rule"),
    ({"aggregation": "fedadam"}, "server optimizer"),
    ({"max-update-norm": 1.0}, "max-update-norm"),
    ({"norm-bound-relative": 3.0}, "norm-bound-relative"),
    ({"example-weights": "claimed"}, "claimed"),
    ({"dp": "server-fixed"}, "dp is not built"),
    ({"dp": "client-fixed"}, "dp is not built"),
    ({"resume-run": 4}, "resume-run"),
])
def test_what_needs_each_update_is_refused_with_the_reason(overrides, names):
    with pytest.raises(ConfigError, match=names):
        config(**overrides)


@pytest.mark.parametrize("overrides, names", [
    ({"min-train-nodes": 2}, "min-train-nodes >= 3"),
    ({"secagg-num-shares": 2}, "secagg-num-shares"),
    ({"secagg-reconstruction-threshold": 3}, "secagg-reconstruction-threshold"),
    ({"secagg-reconstruction-threshold": 1}, "secagg-reconstruction-threshold"),
    ({"secagg-num-shares": 7, "secagg-reconstruction-threshold": 4}, "over min-train-nodes"),
    ({"secagg-clipping-range": 0.0}, "secagg-clipping-range"),
    ({"secagg-quantization-range": 2**32}, "secagg-quantization-range"),
])
def test_protocol_settings_that_cannot_work_are_refused(overrides, names):
    with pytest.raises(ConfigError, match=names):
        config(**overrides)


# --- the protocol in this process -----------------------------------------------------------------


class InProcessGrid:
    """A grid whose nodes run the ClientApp's secure mod in this process: SecAgg+ without a SuperLink.

    Each node keeps its own Context (SecAgg+ keeps its keys there between stages). A node whose app
    raises answers with an error, as a SuperNode does. ``replies`` keeps what the server received.
    """

    def __init__(self, apps: dict[int, object], run_config: dict) -> None:
        self.apps = apps
        self.contexts = {node: context(run_config, node) for node in apps}
        self.run = type("Run", (), {"run_id": 1})()
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does on push
            incoming = Message(metadata=copy.deepcopy(message.metadata), content=copy.deepcopy(message.content))
            node = message.metadata.dst_node_id
            try:
                reply = self.apps[node](incoming, self.contexts[node])
            except Exception as error:  # noqa: BLE001 - any failure of a node is its error reply
                reply = Message(Error(code=2, reason=str(error)), reply_to=incoming)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        self.replies += replies
        return replies


def client(update: dict[str, np.ndarray], fails: bool = False):
    """A node's ClientApp: the secure mod around a train function that returns ``update`` (or raises)."""
    def train(msg: Message, ctx: Context) -> Message:
        if fails:
            raise RuntimeError("the device lost power after sharing its keys")
        return train_reply(msg, update)
    return lambda msg, ctx: secure_aggregation_mod(msg, ctx, train)


def updates_for(nodes) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return {node: {key: (value + rng.normal(0, 0.05, value.shape)).astype(np.float32) for key, value in zip(KEYS, SENT)}
            for node in nodes}


def plain_fedavg(updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """What the plain path's FedAvg makes of the same updates, uniformly weighted."""
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                                   "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=1, message_type="train")
               for update in updates]
    arrays, _ = make_rule(Aggregation.FEDAVG).aggregate_train(1, replies)
    return {key: arrays[key].numpy() for key in KEYS}


class Seen(SecureAdapters):
    """The legacy strategy, keeping every result SecAgg+ hands to aggregate_fit."""

    results: list = []

    def aggregate_fit(self, server_round, results, failures):
        Seen.results = [(proxy.node_id, parameters_to_ndarrays(fitres.parameters)) for proxy, fitres in results]
        return super().aggregate_fit(server_round, results, failures)


def secure_round(tmp_path, monkeypatch, apps: dict[int, object], **overrides):
    """One SecAgg+ round over ``apps`` through run_secure_rounds; returns (ledger, run id, adapters, grid)."""
    run_config = {**SECURE, "num-server-rounds": 1, "node-wait-seconds": 5, "round-timeout": 30, **overrides}
    settings = FederationConfig.from_run_config(run_config)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    run_id = ledger.start_run(99, {}, "tiny", "f" * 64, method="fedavg")
    adapters = FederatedAdapters(ledger, run_id, METHODS["fedavg"], adapter_shapes=SHAPES, max_update_bytes=10_000,
                                 node_wait_seconds=5, evaluate_rounds=set(), min_train_nodes=settings.min_train_nodes,
                                 min_available_nodes=settings.available_nodes)
    grid = InProcessGrid(apps, run_config)
    monkeypatch.setattr("server.secure.SecureAdapters", Seen)
    initial = ArrayRecord({key: Array(value) for key, value in zip(KEYS, SENT)})
    run_secure_rounds(grid, context({}, 0), adapters, settings, initial, ConfigRecord({"base-hash": "h"}))
    return ledger, run_id, adapters, grid


def global_adapter(adapters) -> dict[str, np.ndarray]:
    return {key: adapters.groups["global"][key].numpy() for key in KEYS}


def test_the_secure_aggregate_is_plain_fedavgs_within_the_quantization_step(tmp_path, monkeypatch):
    updates = updates_for([11, 12, 13])
    ledger, run_id, adapters, _ = secure_round(tmp_path, monkeypatch, {n: client(u) for n, u in updates.items()})
    expected = plain_fedavg(list(updates.values()))
    for key in KEYS:
        np.testing.assert_allclose(global_adapter(adapters)[key], expected[key], rtol=0, atol=STEP)
    (round_,) = ledger.rounds(run_id)
    assert (round_.clients_sampled, round_.clients_replied, round_.clients_failed) == (3, 3, 0)
    np.testing.assert_allclose(ledger.load_checkpoint(run_id, 1)["layer.lora_B.weight"], expected["layer.lora_B.weight"],
                               rtol=0, atol=STEP)
    ledger.close()


def test_nothing_the_strategy_or_the_ledger_sees_is_a_single_clients_update(tmp_path, monkeypatch):
    updates = updates_for([11, 12, 13])
    ledger, run_id, adapters, grid = secure_round(tmp_path, monkeypatch, {n: client(u) for n, u in updates.items()})
    aggregate = global_adapter(adapters)
    # aggregate_fit gets the average in every client's place, and it is no client's update
    assert sorted(node for node, _ in Seen.results) == [11, 12, 13]
    for _, parameters in Seen.results:
        for got, key in zip(parameters, KEYS, strict=True):
            np.testing.assert_allclose(got, aggregate[key], rtol=0, atol=1e-6)
    for update in updates.values():
        assert all(np.abs(aggregate[key] - update[key]).max() > 100 * STEP for key in KEYS)
    # what reached the server from each device: keys, encrypted shares, masked vectors; decoded as if
    # unmasked, a masked vector is noise over the whole clipping range, nothing like the update
    masked = [reply for reply in grid.replies if Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3 and all(not reply.content.array_records["fitres.parameters"] for reply in masked)
    for reply in masked:
        update = updates[reply.metadata.src_node_id]
        vectors = [np.load(io.BytesIO(data), allow_pickle=False)
                   for data in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        decoded = [(vector % 4194304) * STEP - 8 for vector in vectors[1:]]  # the first holds the masked weight
        assert all(np.abs(d - update[key]).mean() > 1.0 for d, key in zip(decoded, KEYS, strict=True))
    # the ledger: one checkpoint a round (the aggregate), client rows of numbers, no tensor of anyone's
    assert ledger.checkpoint_domains(run_id, 1) == [""]
    rows = [row for row in ledger.client_results(run_id, 1) if row.phase == "train"]
    assert sorted(int(row.node_id) for row in rows) == [11, 12, 13] and {row.status for row in rows} == {"ok"}
    for row in rows:
        assert all(isinstance(value, (int, float)) for value in row.metrics.values())
        assert "update-norm" not in row.metrics and row.metrics["example-weight"] == 1
        assert row.user_id == f"user-{row.node_id}" and row.bytes_up > 0 and row.bytes_down > 0
    ledger.close()


def test_a_client_dropped_after_sharing_its_keys_leaves_the_others_average(tmp_path, monkeypatch):
    updates = updates_for([11, 12, 13, 14])
    apps = {n: client(u, fails=n == 13) for n, u in updates.items()}
    ledger, run_id, adapters, _ = secure_round(tmp_path, monkeypatch, apps, **{"min-train-nodes": 4})
    expected = plain_fedavg([u for n, u in updates.items() if n != 13])
    for key in KEYS:
        np.testing.assert_allclose(global_adapter(adapters)[key], expected[key], rtol=0, atol=STEP)
    (round_,) = ledger.rounds(run_id)
    assert (round_.clients_sampled, round_.clients_replied, round_.clients_failed) == (4, 3, 1)
    failed = [row for row in ledger.client_results(run_id, 1) if row.status == "failed"]
    assert [int(row.node_id) for row in failed] == [13] and "dropped out of the SecAgg+ round" in failed[0].error
    ledger.close()


def test_a_round_that_loses_too_many_clients_halts_keeps_the_adapter_and_says_so(tmp_path, monkeypatch):
    updates = updates_for([11, 12, 13])
    apps = {n: client(u, fails=n != 11) for n, u in updates.items()}
    ledger, run_id, adapters, _ = secure_round(tmp_path, monkeypatch, apps)
    for key, value in zip(KEYS, SENT):
        np.testing.assert_array_equal(global_adapter(adapters)[key], value)
    (round_,) = ledger.rounds(run_id)
    assert (round_.clients_replied, round_.clients_failed) == (0, 3) and round_.finished_at is not None
    assert "round-not-aggregated" in {event.kind for event in ledger.events(run_id)}
    ledger.close()


# --- a real `flwr run` -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_and_secure(tiny_base, tmp_path_factory):
    """The same 3 users x 2 rounds, once with plain FedAvg and once with SecAgg+; their ledgers' runs."""
    from simulations.run import run_simulation

    users = 3
    run_config = {
        "base-model": str(tiny_base), "base-dtype": "float32", "method": "fedavg", "num-server-rounds": 2,
        "min-train-nodes": users, "example-weights": "uniform", "local-steps": 2, "batch-size": 2, "seq-len": 32,
        "learning-rate": 0.01, "lora-dropout": 0.0, "max-eval-blocks": 4, "min-speeches": 60,
        "node-wait-seconds": 120, "round-timeout": 300,
    }
    runs = {}
    for name, secure in (("plain", False), ("secure", True)):
        finished = run_simulation(users, run_config | {"secure-aggregation": secure}, tmp_path_factory.mktemp(name),
                                  cpus_per_client=2, timeout=600)
        ledger = Ledger(finished.ledger_url, read_only=True)
        (run,) = [r for r in ledger.runs() if r.flower_run_id == finished.flower_run_id]
        runs[name] = (ledger, run)
    yield runs
    for ledger, _ in runs.values():
        ledger.close()


@pytest.mark.simulation
def test_a_secure_simulation_aggregates_what_plain_fedavg_does(plain_and_secure):
    (plain, plain_run), (secure, secure_run) = plain_and_secure["plain"], plain_and_secure["secure"]
    assert secure_run.status == "completed"
    first_plain, first_secure = plain.load_checkpoint(plain_run.id, 1), secure.load_checkpoint(secure_run.id, 1)
    assert set(first_plain) == set(first_secure)
    for key, value in first_plain.items():  # the same clients' updates, from the same start
        np.testing.assert_allclose(first_secure[key], value, rtol=0, atol=STEP)
    # round 2 starts from adapters a quantization step apart: close, not equal
    second_plain, second_secure = plain.load_checkpoint(plain_run.id, 2), secure.load_checkpoint(secure_run.id, 2)
    moved = np.sqrt(sum(np.sum((second_plain[k] - first_plain[k]) ** 2) for k in first_plain))
    apart = np.sqrt(sum(np.sum((second_secure[k] - second_plain[k]) ** 2) for k in first_plain))
    assert moved > 0 and apart < 0.05 * moved


@pytest.mark.simulation
def test_a_secure_simulation_records_every_client_and_evaluation_but_no_update(plain_and_secure):
    (plain, plain_run), (secure, secure_run) = plain_and_secure["plain"], plain_and_secure["secure"]
    for round_ in secure.rounds(secure_run.id):
        assert (round_.clients_sampled, round_.clients_replied, round_.clients_failed) == (3, 3, 0)
        assert secure.checkpoint_domains(secure_run.id, round_.number) == [""]
    train = [row for row in secure.client_results(secure_run.id) if row.phase == "train"]
    assert len(train) == 6 and {row.status for row in train} == {"ok"} and len({row.user_id for row in train}) == 3
    assert all("update-norm" not in row.metrics for row in train)
    evaluated = [row for row in secure.client_results(secure_run.id, 2) if row.phase == "evaluate"]
    assert len(evaluated) == 3 and {row.status for row in evaluated} == {"ok"}
    # the protocol's bytes: keys, shares and a masked vector beside what a plain reply carries
    plain_up = {row.user_id: row.bytes_up for row in plain.client_results(plain_run.id, 1) if row.phase == "train"}
    for row in train:
        assert row.bytes_up > plain_up[row.user_id]

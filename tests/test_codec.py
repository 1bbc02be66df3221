"""Coded payloads (shared/codec.py): round trips, error bounds, top-k with error feedback on the device, and the
server decoding replies as strictly as plain ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.codec import RESIDUAL, codec_mod, load_residual, residual_tags, save_residual
from shared.adapters import array_nbytes
from shared.codec import (AdapterUpdateError, Codecs, ErrorFeedback, UpdateCodec, decode, encode, index_dtype,
                          topk_count)
from shared.config import ConfigError, FederationConfig
from tests.test_strategy import (SHAPES, FakeGrid, arrays, metrics, one_round, reply_to, strategy_for,  # noqa: F401
                                 task_identity)

RNG = np.random.default_rng(0)
A, B = "layer.lora_A.weight", "layer.lora_B.weight"


def tensors(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {key: (scale * RNG.standard_normal(shape)).astype(np.float32) for key, shape in SHAPES.items()}


def round_trip(values: dict[str, np.ndarray], codec: UpdateCodec, fraction: float = 0.1) -> dict[str, np.ndarray]:
    return decode(encode(values, codec, fraction), {key: value.shape for key, value in values.items()}, codec, fraction)


# --- the codecs ------------------------------------------------------------------------------------


def test_float32_round_trips_exactly_and_float16_and_bfloat16_on_values_they_hold():
    values = tensors()
    for key, value in round_trip(values, UpdateCodec.FLOAT32).items():
        np.testing.assert_array_equal(value, values[key])
    halves = {key: value.astype(np.float16).astype(np.float32) for key, value in values.items()}
    for key, value in round_trip(halves, UpdateCodec.FLOAT16).items():
        np.testing.assert_array_equal(value, halves[key])
    brains = {key: (value.view(np.uint32) & 0xFFFF0000).view(np.float32) for key, value in values.items()}
    for key, value in round_trip(brains, UpdateCodec.BFLOAT16).items():
        np.testing.assert_array_equal(value, brains[key])


def test_bfloat16_rounds_to_nearest_even_as_torch_does():
    # ties go to the even last bit: 1 + 2^-8 (between 1 and 1 + 2^-7) to 1, 1 + 3 x 2^-8 to 1 + 2^-6
    values = {"x": np.array([1 + 2**-8, 1 + 3 * 2**-8, -2.7182817, 3.0e38], np.float32)}
    decoded = round_trip(values, UpdateCodec.BFLOAT16)["x"]
    np.testing.assert_array_equal(decoded[:2], [1.0, 1 + 2**-6])
    np.testing.assert_array_equal(decoded, torch.from_numpy(values["x"]).to(torch.bfloat16).float().numpy())
    with pytest.raises(ValueError, match="overflows bfloat16"):
        encode({"x": np.array([3.4e38], np.float32)}, UpdateCodec.BFLOAT16)
    with pytest.raises(ValueError, match="overflows float16"):
        encode({"x": np.array([70000.0], np.float32)}, UpdateCodec.FLOAT16)


def test_int8_keeps_each_value_within_half_its_rows_scale():
    values = {"m": (RNG.standard_normal((6, 40)) * np.logspace(-4, 2, 6)[:, None]).astype(np.float32)}
    payload = encode(values, UpdateCodec.INT8)
    scale = payload["m/scale"].numpy()
    np.testing.assert_array_equal(scale, (np.abs(values["m"]).astype(np.float64).max(axis=1) / 127).astype(np.float32))
    error = np.abs(values["m"] - decode(payload, {"m": (6, 40)}, UpdateCodec.INT8)["m"])
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (error.max(axis=1) > scale / 4).all()  # the bound is what int8 costs, not slack
    # by hand: scale 1; -63.5 rounds half to even (-64); a zero row has scale 0 and decodes to zeros
    hand = {"h": np.array([[127.0, -63.5, 0.25], [0.0, 0.0, 0.0]], np.float32)}
    np.testing.assert_array_equal(round_trip(hand, UpdateCodec.INT8)["h"], [[127.0, -64.0, 0.0], [0.0, 0.0, 0.0]])


def test_top_k_keeps_exactly_the_k_largest_magnitudes():
    values = {"v": np.array([[0.5, -7.0, 0.1, 3.0], [-0.2, 6.0, -4.0, 0.05]], np.float32)}
    payload = encode(values, UpdateCodec.TOPK, 0.3)  # ceil(0.3 x 8) = 3
    np.testing.assert_array_equal(payload["v/indices"].numpy(), [1, 5, 6])
    assert payload["v/indices"].numpy().dtype == np.uint16
    np.testing.assert_array_equal(decode(payload, {"v": (2, 4)}, UpdateCodec.TOPK, 0.3)["v"],
                                  [[0, -7.0, 0, 0], [0, 6.0, -4.0, 0]])
    assert topk_count(4608, 0.01) == 47 and topk_count(10, 0.0001) == 1 and topk_count(5, 1.0) == 5
    assert index_dtype(2**16) == np.uint16 and index_dtype(2**16 + 1) == np.uint32


def test_error_feedback_adds_what_was_dropped_to_the_next_change():
    feedback, shapes = ErrorFeedback(), {"x": (4,)}
    sent = []
    for change in ([4.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 1.0], [0.0, -1.0, 0.0, 0.0]):
        payload = feedback.encode({"x": np.array(change, np.float32)}, UpdateCodec.TOPK, 0.25)  # one entry a round
        sent.append(decode(payload, shapes, UpdateCodec.TOPK, 0.25)["x"])
    # round 1 sends 4 and keeps [0, -1, 0.5, 3]; round 2 adds it: [0, -1, 0.5, 4] sends the 4 at the end;
    # round 3: [0, -2, 0.5, 0] sends -2 and keeps only the 0.5
    np.testing.assert_array_equal(sent, [[4, 0, 0, 0], [0, 0, 0, 4], [0, -2, 0, 0]])
    np.testing.assert_array_equal(feedback.residual["x"], [0, 0, 0.5, 0])


# --- the device: the mod, and the residual across a restart -----------------------------------------


def test_the_residual_survives_a_restart_and_belongs_to_its_base_and_codec(tmp_path):
    codecs = Codecs(UpdateCodec.TOPK, topk_fraction=0.25)
    residual = {A: np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_residual(tmp_path, residual, residual_tags(codecs, "base-1"))
    np.testing.assert_array_equal(load_residual(tmp_path, residual_tags(codecs, "base-1"))[A], residual[A])
    assert load_residual(tmp_path, residual_tags(codecs, "base-2")) == {}
    assert load_residual(tmp_path, residual_tags(Codecs(UpdateCodec.TOPK, topk_fraction=0.5), "base-1")) == {}
    assert load_residual(tmp_path / "elsewhere", residual_tags(codecs, "base-1")) == {}


CHANGE = np.array([[6.0, -5.0, 4.0], [-3.0, 2.0, 1.0]], np.float32)


def device_context(tmp_path, **run_config) -> Context:
    data = tmp_path / "user.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"speech {i}"}) for i in range(5)))
    return Context(run_id=1, node_id=7, node_config={"data-path": str(data), "state-dir": str(tmp_path / "state")},
                   state=RecordDict(), run_config=run_config)


def trains_by(changes: dict[str, np.ndarray]):
    """A train function that adds ``changes`` to what it received."""
    def train(msg: Message, _context: Context) -> Message:
        trained = {key: array.numpy() + changes[key] for key, array in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
                                   "metrics": metrics(5)}), reply_to=msg)
    return train


def train_message(base_hash: str = "h") -> Message:
    return Message(RecordDict({"arrays": arrays(0.5), "config": ConfigRecord({"server-round": 1, "base-hash": base_hash})}),
                   dst_node_id=7, message_type=MessageType.TRAIN)


def test_the_device_sends_top_k_of_its_change_and_the_rest_next_time_even_after_a_restart(tmp_path):
    context = device_context(tmp_path, **{"update-codec": "topk", "topk-fraction": 0.5, "method": "fedavg"})
    both = {A: CHANGE, B: CHANGE.T.copy()}
    reply = codec_mod(train_message(), context, trains_by(both))
    first = decode(reply.content["arrays"], SHAPES, UpdateCodec.TOPK, 0.5)
    np.testing.assert_allclose(first[A], [[6, -5, 4], [0, 0, 0]])  # the change, not the adapter (0.5 + change)
    assert (tmp_path / "state" / "user" / RESIDUAL).is_file()
    # a new process: nothing in memory, the residual comes from the state folder and joins the next change
    nudge = np.array([[0, 0, 0], [0, 0, 0.5]], np.float32)
    reply = codec_mod(train_message(), context, trains_by({A: nudge, B: nudge.T.copy()}))
    second = decode(reply.content["arrays"], SHAPES, UpdateCodec.TOPK, 0.5)
    np.testing.assert_allclose(second[A], [[0, 0, 0], [-3, 2, 1.5]])
    # under another base the old residual is not used
    reply = codec_mod(train_message("another-base"), context, trains_by({A: nudge, B: nudge.T.copy()}))
    np.testing.assert_allclose(decode(reply.content["arrays"], SHAPES, UpdateCodec.TOPK, 0.5)[A], nudge)


def test_a_plain_run_passes_messages_through_untouched(tmp_path):
    message = train_message()
    reply = codec_mod(message, device_context(tmp_path), trains_by({A: CHANGE, B: CHANGE.T.copy()}))
    np.testing.assert_array_equal(reply.content["arrays"][A].numpy(), 0.5 + CHANGE)
    assert not (tmp_path / "state").exists()


# --- the server -------------------------------------------------------------------------------------


def coded_reply(change: float, examples: int, codec: UpdateCodec, fraction: float = 0.5) -> RecordDict:
    payload = encode({key: np.full(shape, change, np.float32) for key, shape in SHAPES.items()}, codec, fraction)
    return RecordDict({"arrays": payload, "metrics": metrics(examples), "identity": ConfigRecord({"domain": "a"})})


def test_int8_replies_are_changes_added_to_the_adapter_and_the_ledger_counts_their_bytes(ledger):
    strategy, run_id = strategy_for(ledger, nodes=(11, 12), codecs=Codecs(UpdateCodec.INT8))
    answers = {11: coded_reply(0.25, 10, UpdateCodec.INT8), 12: coded_reply(-0.5, 30, UpdateCodec.INT8)}
    coded = {node: array_nbytes(answer["arrays"]) for node, answer in answers.items()}  # before the server decodes
    _, (aggregated, _) = one_round(strategy, [11, 12], answers, initial=1.0)
    np.testing.assert_allclose(aggregated[A].numpy(), 1.0 + (0.25 * 10 - 0.5 * 30) / 40, rtol=1e-6)
    assert coded[11] != array_nbytes(arrays(0.0))  # what came, not the float32 adapter it stands for
    assert {r.node_id: r.bytes_up for r in ledger.client_results(run_id)} == {"11": coded[11], "12": coded[12]}
    assert ledger.rounds(run_id)[0].bytes_up == sum(coded.values())
    assert {r.node_id: r.metrics["update-norm"] for r in ledger.client_results(run_id)}["11"] == pytest.approx(
        0.25 * np.sqrt(12), rel=1e-6)


def test_a_coded_downlink_is_counted_as_sent_and_never_enters_the_servers_adapter(ledger):
    strategy, run_id = strategy_for(ledger, nodes=(11, 12), codecs=Codecs(down=UpdateCodec.INT8))
    exact = ArrayRecord({key: Array(value) for key, value in tensors().items()})
    sent = list(strategy.configure_train(1, exact, ConfigRecord({"base-hash": "x"}), FakeGrid([11, 12])))
    assert {key for m in sent for key in m.content["arrays"].keys()} == {f"{k}/{p}" for k in SHAPES for p in ("int8", "scale")}
    got = decode(sent[0].content["arrays"], SHAPES, UpdateCodec.INT8)
    assert np.abs(got[A] - exact[A].numpy()).max() > 1e-4  # the node starts from int8's rounding of the adapter
    replies = [reply_to(m, RecordDict({"arrays": ArrayRecord({k: Array(v + 0.5) for k, v in got.items()}),
                                       "metrics": metrics(1), "identity": ConfigRecord({"domain": "a"})}))
               for m in sent]  # a float32 reply: the trained adapter, 0.5 above what the node decoded
    aggregated, _ = strategy.aggregate_train(1, replies)
    for key in SHAPES:  # the change lands on the server's own adapter, not on its rounding
        np.testing.assert_allclose(aggregated[key].numpy(), exact[key].numpy() + 0.5, rtol=0, atol=1e-6)
    assert ledger.rounds(run_id)[0].bytes_down == 2 * array_nbytes(sent[0].content["arrays"])
    assert array_nbytes(sent[0].content["arrays"]) != array_nbytes(exact)




def _replace(record: ArrayRecord, key: str, value: np.ndarray | None) -> ArrayRecord:
    items = {k: record[k] for k in record.keys() if k != key}
    return ArrayRecord(items if value is None else items | {key: Array(value)})


HOSTILE = {  # name: (codec, key to replace, its new value (None: removed), what the rejection says)
    "index-out-of-range": (UpdateCodec.TOPK, f"{A}/indices", np.array([0, 1, 6], np.uint16), "below 6"),
    "index-repeated": (UpdateCodec.TOPK, f"{A}/indices", np.array([1, 1, 2], np.uint16), "strictly increasing"),
    "index-unsorted": (UpdateCodec.TOPK, f"{A}/indices", np.array([2, 1, 0], np.uint16), "strictly increasing"),
    "index-wide": (UpdateCodec.TOPK, f"{A}/indices", np.array([0, 1, 2], np.int64), "dtype int64"),
    "values-too-many": (UpdateCodec.TOPK, f"{A}/values", np.ones(4, np.float32), "shape (4,), expected (3,)"),
    "values-nan": (UpdateCodec.TOPK, f"{A}/values", np.array([1, np.nan, 1], np.float32), "NaN or inf"),
    "indices-missing": (UpdateCodec.TOPK, f"{A}/indices", None, "missing"),
    "extra-array": (UpdateCodec.TOPK, "layer.extra", np.zeros(1, np.float32), "unexpected"),
    "scale-nan": (UpdateCodec.INT8, f"{A}/scale", np.array([np.nan, 1], np.float32), "finite and >= 0"),
    "scale-negative": (UpdateCodec.INT8, f"{A}/scale", np.array([-1, 1], np.float32), "finite and >= 0"),
    "scale-overflows": (UpdateCodec.INT8, f"{A}/scale", np.array([3e38, 3e38], np.float32), "NaN or inf"),
    "scales-too-few": (UpdateCodec.INT8, f"{A}/scale", np.ones(1, np.float32), "shape (1,), expected (2,)"),
    "int8-minus-128": (UpdateCodec.INT8, f"{A}/int8", np.full((2, 3), -128, np.int8), "-128"),
    "int8-reshaped": (UpdateCodec.INT8, f"{A}/int8", np.ones((3, 2), np.int8), "shape (3, 2), expected (2, 3)"),
    "int8-oversized": (UpdateCodec.INT8, f"{A}/int8", np.ones((2, 12_000), np.int8), "over the limit"),
    "float16-as-float32": (UpdateCodec.FLOAT16, A, np.ones((2, 3), np.float32), "dtype float32, expected float16"),
    "float16-inf": (UpdateCodec.FLOAT16, A, np.full((2, 3), np.inf, np.float16), "NaN or inf"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_coded_payloads_are_rejected_recorded_and_not_averaged(ledger, name):
    codec, key, value, says = HOSTILE[name]
    strategy, run_id = strategy_for(ledger, nodes=(11, 12), codecs=Codecs(codec, topk_fraction=0.5))
    hostile = coded_reply(100.0, 10, codec)
    hostile["arrays"] = _replace(hostile["arrays"], key, value)
    honest = coded_reply(1.0, 10, codec)
    expected = decode(honest["arrays"], SHAPES, codec, 0.5)[A]  # top-k at 0.5 keeps 3 of the 6 ones
    _, (aggregated, _) = one_round(strategy, [11, 12], {11: honest, 12: hostile})
    np.testing.assert_allclose(aggregated[A].numpy(), expected)  # only the honest change, from 0
    rows = {r.node_id: r for r in ledger.client_results(run_id)}
    assert rows["12"].status == "rejected" and says in rows["12"].error
    assert [e.kind for e in ledger.events(run_id)] == ["update-rejected"]


def test_decode_raises_adapter_update_error_for_a_payload_that_is_not_plain_numpy():
    payload = encode({A: np.ones((2, 3), np.float32)}, UpdateCodec.FLOAT16)
    payload[A] = Array(dtype="float16", shape=(2, 3), stype="torch.raw", data=b"\0" * 12)
    with pytest.raises(AdapterUpdateError, match="not a plain numpy array"):
        decode(payload, {A: (2, 3)}, UpdateCodec.FLOAT16)


# --- run config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_config, message", [
    ({"update-codec": "int4"}, "update-codec must be one of"),
    ({"downlink-codec": "topk"}, "downlink-codec must be one of"),
    ({"topk-fraction": 0.0}, "topk-fraction must be in (0, 1]"),
    ({"topk-fraction": 1.5}, "topk-fraction must be in (0, 1]"),
    ({"server-momentum": 1.0}, "server-momentum must be in [0, 1)"),
    ({"dp": "client-fixed", "example-weights": "uniform", "method": "fedavg", "update-codec": "topk"},
     "dp = \"client-fixed\" with update-codec 'topk'"),
])
def test_codec_keys_are_validated(run_config, message):
    with pytest.raises(ConfigError) as raised:
        FederationConfig.from_run_config(run_config)
    assert message in str(raised.value)


def test_the_run_config_gives_the_codecs():
    config = FederationConfig.from_run_config({"update-codec": "topk", "downlink-codec": "int8", "topk-fraction": 0.01})
    assert config.codecs == Codecs(UpdateCodec.TOPK, UpdateCodec.INT8, 0.01)
    assert FederationConfig().codecs.plain


# --- both sides together: the ClientApp with its mods, and the strategy ---------------------------------


def test_the_client_app_and_the_server_agree_on_coded_payloads_both_ways(tmp_path, tiny_base, ledger):
    from client import app as client_app
    from client.runtime import adapter_session
    from server.strategy import FederatedAdapters
    from shared.adapters import adapter_state, attach_adapter, expected_shapes, lora_config, to_arrays
    from shared.base_model import load_model
    from shared.methods import METHODS, SHARED

    data = tmp_path / "me.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Fair is foul, and foul is fair, {i} times."}) for i in range(12)))
    config = {"base-model": str(tiny_base), "method": "fedavg", "local-steps": 2, "seq-len": 16, "batch-size": 2,
              "lora-r": 2, "lora-alpha": 4, "lora-dropout": 0.0, "learning-rate": 0.05, "state-dir": str(tmp_path / "s"),
              "update-codec": "topk", "downlink-codec": "int8", "topk-fraction": 0.25}
    settings = FederationConfig.from_run_config(config)
    session = adapter_session(settings)
    shapes = expected_shapes(session.model, SHARED)
    initial = to_arrays(adapter_state(attach_adapter(load_model(settings.base_model), lora_config(settings), seed=3)))
    run_id = ledger.start_run(99, {}, "tiny", session.base_hash, method="fedavg")
    strategy = FederatedAdapters(ledger, run_id, METHODS["fedavg"], adapter_shapes=shapes, max_update_bytes=10**7,
                                 node_wait_seconds=5, evaluate_rounds={9}, min_train_nodes=1, min_available_nodes=1,
                                 codecs=settings.codecs)
    (message,) = strategy.configure_train(1, initial, ConfigRecord({"base-hash": session.base_hash}), FakeGrid([7]))
    message.metadata.__dict__["_message_id"] = "m7"
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data)}, state=RecordDict(), run_config=config)
    reply = client_app.app(message, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content["arrays"].keys()) == {f"{key}/{part}" for key in shapes for part in ("values", "indices")}
    coded = array_nbytes(reply.content["arrays"])
    change = decode(reply.content["arrays"], shapes, UpdateCodec.TOPK, 0.25)
    assert all(np.count_nonzero(value) <= topk_count(value.size, 0.25) for value in change.values())
    assert any(np.count_nonzero(value) for value in change.values())  # it trained, and sent some of it
    aggregated, _ = strategy.aggregate_train(1, [reply])
    for key in shapes:  # one reply: the server's own adapter plus the change the device sent
        np.testing.assert_allclose(aggregated[key].numpy(), initial[key].numpy() + change[key], rtol=0, atol=1e-6)
    (row,) = ledger.client_results(run_id)
    assert (row.status, row.bytes_up, row.bytes_down) == ("ok", coded, array_nbytes(message.content["arrays"]))
    assert (tmp_path / "s" / "me" / RESIDUAL).is_file()

"""Secure aggregation on the device: Flower's ``secaggplus_mod`` around the ClientApp's own train function.

With run config ``secure-aggregation = true`` the server runs Flower's SecAgg+ workflow
(server/secure.py): four train messages a round, of which only the third asks for training. Flower's
``secaggplus_mod`` answers the other three itself (keys, key shares, unmasking) and, for the third,
calls the app in Flower's legacy fit format ("fitins.*" records in, "fitres.*" out), then masks the
reply's arrays before they leave. ``legacy_fit_bridge`` turns that fit message into this app's train
message ("arrays", "config") and the app's reply back into a fit result: the tensors in the order the
server named them, the weight the run's example-weight policy gives, the metrics and identity as
fit metrics. Without the run-config key every message passes through untouched.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from shared.adapters import AdapterUpdateError
from shared.config import FederationConfig
from shared.secure import ADAPTER_KEYS, device_weight

FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` over the legacy bridge for train messages when the run asks for secure aggregation.

    Evaluate messages, and every message of a run without it, pass through untouched (Flower's mod
    would hand an evaluate message to the bridge).
    """
    config = FederationConfig.from_run_config(context.run_config)
    if not config.secure_aggregation or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda fit, ctx: legacy_fit_bridge(fit, ctx, call_next, config))


def legacy_fit_bridge(msg: Message, context: Context, call_next: ClientAppCallable, config: FederationConfig) -> Message:
    """Run this app's train function on a legacy fit message and answer with a legacy fit result."""
    keys, train = to_train_message(msg)
    reply = call_next(train, context)
    if reply.has_error():  # SecAgg+ has no error result: the node drops out of the round and its masks are rebuilt
        raise RuntimeError(f"training failed (code {reply.error.code}): {reply.error.reason}")
    return Message(to_fit_result(reply.content, keys, config), reply_to=msg)


def to_train_message(msg: Message) -> tuple[list[str], Message]:
    """The names of the sent tensors, and the fit message as this app's train message (the same metadata)."""
    config = ConfigRecord(dict(msg.content.config_records[FITINS_CONFIG]))
    keys = config.pop(ADAPTER_KEYS, None)
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise AdapterUpdateError(f"the fit config must name the adapter's tensors in {ADAPTER_KEYS!r}")
    legacy = msg.content.array_records[FITINS_ARRAYS]  # Flower names the list's arrays "0", "1", ...
    if len(legacy) != len(keys):
        raise AdapterUpdateError(f"the fit message holds {len(legacy)} arrays for {len(keys)} names")
    arrays = ArrayRecord({key: Array(legacy[str(index)].numpy()) for index, key in enumerate(keys)})
    return keys, Message(metadata=msg.metadata, content=RecordDict({"arrays": arrays, "config": config}))


def to_fit_result(content: RecordDict, keys: list[str], config: FederationConfig) -> RecordDict:
    """This app's train reply as Flower's legacy fit result, which ``secaggplus_mod`` masks.

    The tensors go in the order of ``keys``; ``num_examples`` is the weight the device gives its
    update (the claim stays in the metrics); metrics and identity travel as fit metrics.
    """
    arrays = content.array_records["arrays"]
    if sorted(arrays.keys()) != sorted(keys):
        raise AdapterUpdateError("the train reply's tensors are not the ones the server named")
    metrics = content.metric_records["metrics"]
    identity = content.config_records.get("identity", ConfigRecord())
    result = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([arrays[key].numpy() for key in keys]),
                    num_examples=device_weight(config, metrics["num-examples"]), metrics={**metrics, **identity})
    return fitres_to_recorddict(result, keep_input=False)

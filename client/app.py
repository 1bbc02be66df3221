"""The fedgraft ClientApp: fine-tune the shared LoRA adapter on this user's speeches.

A train message carries the global adapter and the announced base hash. The client checks the
base, loads the adapter, scores it on the user's held-out speeches, trains locally, scores again,
and replies with the adapter tensors and metrics only. Training and local evaluation share one
message because in deployment every message pays a process start.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.runtime import adapter_session, device_config, require_base, user_blocks, user_for_node
from shared.adapters import adapter_state, load_arrays, to_arrays
from shared.config import FederationConfig
from shared.training import evaluate, train_adapter

app = ClientApp()


def _prepare(msg: Message, context: Context):
    """Config, user, adapter session with the incoming adapter loaded, and the user's blocks."""
    config = device_config(FederationConfig.from_run_config(context.run_config), context.node_config)
    user = user_for_node(context.node_config, config)
    session = adapter_session(config)
    require_base(str(msg.content["config"].get("base-hash", "")), session.base_hash)
    load_arrays(session.model, msg.content["arrays"], max_bytes=int(config.max_update_mb * 2**20))
    train_blocks, test_blocks = user_blocks(user, session.tokenizer, config)
    return config, user, session, train_blocks, test_blocks


def _identity(user, session) -> ConfigRecord:
    # Ids stay out of the MetricRecord: Flower averages every metric key.
    return ConfigRecord({"user-id": user.user_id, "domain": user.domain, "base-hash": session.base_hash})


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config, user, session, train_blocks, test_blocks = _prepare(msg, context)
    before = evaluate(session.model, test_blocks, config.batch_size)
    seed = config.seed + int(msg.content["config"].get("server-round", 0))
    stats = train_adapter(session.model, train_blocks, config.local_steps, config.batch_size, config.learning_rate, seed)
    after = evaluate(session.model, test_blocks, config.batch_size)
    metrics = MetricRecord({
        "num-examples": len(train_blocks),
        **stats,
        "eval-loss-before": before["loss"],
        "eval-loss": after["loss"],
        "eval-perplexity": after["perplexity"],
        "eval-accuracy": after["accuracy"],
        "eval-tokens": after["tokens"],
        "seconds": time.perf_counter() - started,
    })
    arrays: ArrayRecord = to_arrays(adapter_state(session.model))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "identity": _identity(user, session)}), reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Held-out scores of the base alone and of the base with the received adapter."""
    started = time.perf_counter()
    config, user, session, _, test_blocks = _prepare(msg, context)
    with session.model.disable_adapter():
        base = evaluate(session.model, test_blocks, config.batch_size)
    adapted = evaluate(session.model, test_blocks, config.batch_size)
    metrics = MetricRecord({
        "num-examples": len(test_blocks),
        "base-loss": base["loss"],
        "base-perplexity": base["perplexity"],
        "base-accuracy": base["accuracy"],
        "eval-loss": adapted["loss"],
        "eval-perplexity": adapted["perplexity"],
        "eval-accuracy": adapted["accuracy"],
        "eval-tokens": adapted["tokens"],
        "seconds": time.perf_counter() - started,
    })
    return Message(RecordDict({"metrics": metrics, "identity": _identity(user, session)}), reply_to=msg)

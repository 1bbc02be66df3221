"""The fedgraft ClientApp: fine-tune LoRA adapters on this user's speeches.

A train message carries the shared adapter (or the part of it the method shares) and the announced
base hash. The client checks the base, restores the user's private adapters from the device, trains
what the method trains (shared and/or personal, see shared/methods.py), scores the user's model on
held-out speeches before and after, saves its private state, and replies with the shared tensors
and metrics only. Training and local evaluation share one message because in deployment every
message pays a process start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.attacks import attack_mod
from client.codec import codec_mod
from client.personal import CACHE, copy_adapter, load_personal, save_personal
from client.privacy import dp_clipping_mod
from client.runtime import (AdapterSession, adapter_session, device_config, require_base, state_folder, user_blocks,
                            user_for_node)
from client.secure import secure_aggregation_mod
from shared.adapters import adapter_state, load_arrays, to_arrays
from shared.config import FederationConfig
from shared.data import UserData
from shared.memory import peak_rss_bytes
from shared.methods import PERSONAL, SHARED, Aggregation, Method, method
from shared.ranks import truncate_record
from shared.retrieval import CacheSetting, Datastore, build_datastore, choose_setting, collect, evaluate_with_cache
from shared.training import TokenBlocks, evaluate, hold_out, proximal_penalty, train_adapter

# Each mod passes messages through unless the run config turns it on. Secure aggregation is outermost: it
# answers SecAgg+'s protocol messages itself and hands the inner mods this app's own train message.
# The codec mod decodes what arrives and encodes what leaves, so the mods inside it see float32 adapters.
app = ClientApp(mods=[secure_aggregation_mod, codec_mod, attack_mod])

CACHE_VALIDATION_FRACTION = 0.2  # blocks held out to choose the cache's setting, when personal training holds out none


@dataclass
class Job:
    """Everything one message works with."""

    config: FederationConfig
    method: Method
    user: UserData
    session: AdapterSession
    train_blocks: TokenBlocks
    test_blocks: TokenBlocks
    folder: Path
    round: int


def _prepare(msg: Message, context: Context) -> Job:
    """Check the base, reset the adapters, load the incoming shared tensors and this user's private ones."""
    config = device_config(FederationConfig.from_run_config(context.run_config), context.node_config)
    method_ = method(config.method)
    user = user_for_node(context.node_config, config)
    session = adapter_session(config)
    require_base(str(msg.content["config"].get("base-hash", "")), session.base_hash)
    session.reset()
    folder = state_folder(context.node_config, config, user)
    if method_.keeps_b_matrices:  # FedSA: the device's own B lives in its saved shared adapter
        load_personal(session.model, SHARED, folder, session.base_hash)
    if method_.sends_arrays:
        # a server that has not yet heard this device's rank sends the run's: the device keeps its first components
        load_arrays(session.model, truncate_record(msg.content["arrays"], config.lora_r), max_bytes=int(config.max_update_mb * 2**20),
                    adapter_name=SHARED, keep=method_.shared_key)
    if method_.keeps_personal and not load_personal(session.model, PERSONAL, folder, session.base_hash):
        if method_.personal_from_shared:
            copy_adapter(session.model, SHARED, PERSONAL)
    train_blocks, test_blocks = user_blocks(user, session.tokenizer, config)
    job = Job(config, method_, user, session, train_blocks, test_blocks, folder,
              int(msg.content["config"].get("server-round", 0)))
    keep_received_shared(job)
    return job


def keep_received_shared(job: Job) -> None:
    """Keep the newest global/domain adapter on the device, so ``python -m client.use`` can use it offline.

    FedSA's shared adapter holds the device's private B: it is saved after training instead.
    """
    if job.method.sends_arrays and not job.method.keeps_b_matrices:
        save_personal(job.session.model, SHARED, job.folder, job.session.base_hash, **_tags(job))


def score_user_model(job: Job) -> dict[str, float]:
    """Held-out scores of the model this method gives the user (see the table in shared/methods.py)."""
    return score_adapters(job, job.method.user_adapters)


def score_adapters(job: Job, adapters: list[str]) -> dict[str, float]:
    """Held-out scores of the base with these adapters active."""
    job.session.use(adapters, trainable=[])
    return evaluate(job.session.model, job.test_blocks, job.config.micro_batch_size)


def train_shared(job: Job) -> dict[str, float]:
    """Local steps on the shared adapter, with FedProx's proximal term when that rule is chosen."""
    job.session.use([SHARED], trainable=[SHARED])
    parameters = job.session.parameters_of(SHARED)
    penalty = None
    if Aggregation(job.config.aggregation).clients_add_proximal_term and job.config.proximal_mu > 0:
        penalty = proximal_penalty(parameters, {k: p.detach().clone() for k, p in parameters.items()},
                                   job.config.proximal_mu)
    return train_adapter(job.session.model, job.train_blocks, job.config.local_steps, job.config.batch_size,
                         job.config.learning_rate, seed=job.config.seed + job.round, penalty=penalty,
                         micro_batch_size=job.config.micro_batch_size)


def train_personal(job: Job, steps: int) -> dict[str, float]:
    """Steps on the personal adapter: on top of the frozen shared one (dual), or alone (local, Ditto)."""
    job.session.use([SHARED, PERSONAL] if job.method.stacks_personal else [PERSONAL], trainable=[PERSONAL])
    penalty = None
    if job.method.proximal_to_shared and job.config.ditto_lambda > 0:
        shared = job.session.parameters_of(SHARED)
        penalty = proximal_penalty(job.session.parameters_of(PERSONAL), {k: p.detach().clone() for k, p in shared.items()},
                                   job.config.ditto_lambda)
    # With validation-fraction > 0 the personal adapter fits on part of the user's blocks and keeps its
    # best checkpoint on the rest: the shared adapter still trains on all of them.
    fit, validation = hold_out(job.train_blocks, job.config.validation_fraction, seed=job.config.seed)
    return train_adapter(job.session.model, fit, steps, job.config.batch_size, job.config.personal_lr,
                         seed=job.config.seed + 7919 * (job.round + 1), penalty=penalty, validation=validation,
                         validate_every=job.config.validate_every, micro_batch_size=job.config.micro_batch_size)


def score_with_cache(job: Job) -> tuple[dict[str, float], dict[str, float]]:
    """The user's model mixed with a kNN cache of their training speeches (``retrieval`` methods).

    The setting is chosen on the blocks personal training also holds out (a fifth when it holds out
    none), then the cache holds every training block; it is scored on the held-out test blocks
    and saved on the device for ``python -m client.use``. Returns (scores, the setting as metrics).
    """
    job.session.use(job.method.user_adapters, trainable=[])
    model, batch = job.session.model, job.config.micro_batch_size
    fit, validation = hold_out(job.train_blocks, job.config.validation_fraction or CACHE_VALIDATION_FRACTION,
                               seed=job.config.seed)
    if validation is None:  # too few blocks to hold any out: no fair choice, so no cache
        store, setting, validation_loss = build_datastore(model, fit, batch), CacheSetting(0.0, 1.0, 1), float("nan")
    else:  # one pass over the training blocks: the fit part chooses the setting, then all of it is the cache
        fit_positions, validation_positions = collect(model, fit, batch), collect(model, validation, batch)
        setting, validation_loss = choose_setting(fit_positions, validation_positions)
        store = Datastore.of(fit_positions, validation_positions)
    store.save(job.folder / CACHE, setting, base_hash=job.session.base_hash, **_tags(job))
    scores = evaluate_with_cache(model, store, job.test_blocks, setting, batch)
    return scores, {"cache-weight": setting.weight, "cache-temperature": setting.temperature,
                    "cache-neighbours": float(setting.neighbours), "cache-validation-loss": validation_loss,
                    "cache-keys": float(len(store))}


def best_step_metric(personal_stats: dict[str, float]) -> dict[str, float]:
    """``personal-best-step`` when personal training kept its best validation checkpoint, else nothing."""
    return {"personal-best-step": personal_stats["best-step"]} if "best-step" in personal_stats else {}


def _tags(job: Job) -> dict[str, object]:
    # what client.use needs to rebuild the user's model: the method says which adapters it stacks
    return {"method": job.method.name, "round": job.round, "user_id": job.user.user_id,
            "base_model": job.config.base_model, "base_dtype": job.config.base_dtype}


def save_private_state(job: Job) -> None:
    tags = _tags(job)
    if job.method.keeps_b_matrices:
        save_personal(job.session.model, SHARED, job.folder, job.session.base_hash, **tags)
    elif job.method.keeps_personal:
        save_personal(job.session.model, PERSONAL, job.folder, job.session.base_hash, **tags)


def _identity(job: Job) -> ConfigRecord:
    # Ids stay out of the MetricRecord: Flower averages every metric key.
    # lora-r: the rank this device trains (node config), which the server checks its reply's shapes against
    return ConfigRecord({"user-id": job.user.user_id, "domain": job.user.domain, "base-hash": job.session.base_hash,
                         "lora-r": job.config.lora_r})


def _shared_arrays(job: Job) -> ArrayRecord:
    """What travels back: the shared tensors the method shares, nothing private."""
    if not job.method.sends_arrays:
        return ArrayRecord()
    state = adapter_state(job.session.model, SHARED)
    return to_arrays({key: tensor for key, tensor in state.items() if job.method.shared_key(key)})


@app.train(mods=[dp_clipping_mod])  # inside attack_mod: an attacker corrupts after clipping, and is caught
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    job = _prepare(msg, context)
    before = score_user_model(job)
    stats = {"train-loss": float("nan"), "train-steps": 0.0}
    if job.method.sends_arrays:
        stats = train_shared(job)
    if job.method.trains_personal:
        steps = job.config.local_steps if job.method.personal_steps_from_local else job.config.personal_steps
        personal = train_personal(job, steps)
        if job.method.personal_steps_from_local:
            stats = {"train-loss": personal["train-loss"], "train-steps": personal["train-steps"]}
        else:  # the personal adapter's steps beside the shared one's, so a comparison counts both
            stats["personal-steps"] = personal["train-steps"]
        stats.update(best_step_metric(personal))
    after = score_user_model(job)
    save_private_state(job)
    metrics = MetricRecord({
        "num-examples": len(job.train_blocks),
        **stats,
        "eval-loss-before": before["loss"],
        "eval-loss": after["loss"],
        "eval-perplexity": after["perplexity"],
        "eval-accuracy": after["accuracy"],
        "eval-tokens": after["tokens"],
        "seconds": time.perf_counter() - started,
        "peak-rss-mb": peak_rss_bytes() / 2**20,  # this process's own peak so far
    })
    return Message(RecordDict({"arrays": _shared_arrays(job), "metrics": metrics, "identity": _identity(job)}),
                   reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Held-out scores of the base alone and of the user's model under the method."""
    started = time.perf_counter()
    job = _prepare(msg, context)
    with job.session.model.disable_adapter():
        base = evaluate(job.session.model, job.test_blocks, job.config.micro_batch_size)
    tuning: dict[str, float] = {}
    if job.method.tunes_at_evaluation:  # fedavg-ft: the user tunes a copy of the global adapter
        copy_adapter(job.session.model, SHARED, PERSONAL)
        tuned = train_personal(job, job.config.personal_steps)
        tuning = {"personal-steps": tuned["train-steps"], **best_step_metric(tuned)}
        save_private_state(job)
    adapted = score_user_model(job)
    # beside the user's model, the shared adapter alone, so a table can show what personalization added
    shared = score_adapters(job, [SHARED]) if job.method.user_adapters != [SHARED] else adapted
    cache: dict[str, float] = {}
    if job.method.retrieval:  # the user's model with its cache; the model alone stays as model-* for comparison
        cache = {"model-loss": adapted["loss"], "model-perplexity": adapted["perplexity"]}
        adapted, setting = score_with_cache(job)
        cache.update(setting)
    metrics = MetricRecord({
        **tuning,
        **cache,
        "shared-perplexity": shared["perplexity"],
        "num-examples": len(job.test_blocks),
        "base-loss": base["loss"],
        "base-perplexity": base["perplexity"],
        "base-accuracy": base["accuracy"],
        "eval-loss": adapted["loss"],
        "eval-perplexity": adapted["perplexity"],
        "eval-accuracy": adapted["accuracy"],
        "eval-tokens": adapted["tokens"],
        "seconds": time.perf_counter() - started,
    })
    return Message(RecordDict({"metrics": metrics, "identity": _identity(job)}), reply_to=msg)

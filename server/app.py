"""The fedgraft ServerApp: federate LoRA adapters over the shared base and keep a round ledger."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

from server.aggregation import NormBound, checkpoint_domain
from server.ledger import CheckpointPolicy, Ledger
from server.privacy import PrivacySettings
from server.progress import ProgressGrid
from server.secure import run_secure_rounds
from server.strategy import FederatedAdapters, ResumedRounds
from shared.adapters import (adapter_state, attach_adapter, base_lora_config, expected_shapes, load_arrays,
                             save_adapter, to_arrays)
from shared.base_model import load_model, weights_hash
from shared.config import FederationConfig, fedgraft_home
from shared.methods import GLOBAL_GROUP, Aggregation, ExampleWeights, method

app = ServerApp()


def open_ledger(config: FederationConfig) -> Ledger:
    return Ledger(config.ledger_url or Ledger.default_url(fedgraft_home()))


def save_group_adapters(adapter: PeftModel, groups: dict[str, ArrayRecord], folder: Path) -> None:
    """Each group's final adapter in peft's format: global-adapter/, domain-<name>/."""
    for group, arrays in groups.items():
        load_arrays(adapter, arrays, keep=lambda key, shared=set(arrays.keys()): key in shared)
        name = "global-adapter" if group == GLOBAL_GROUP else f"domain-{checkpoint_domain(group)}"
        save_adapter(adapter, folder / name)


def open_run(ledger: Ledger, config: FederationConfig, flower_run_id: int, base_hash: str) -> int:
    """A new ledger run, or the crashed run named by ``resume-run`` after checking it is the same job."""
    if not config.resume_run:
        return ledger.start_run(flower_run_id, config.as_run_config(), config.base_model, base_hash, method=config.method)
    previous = ledger.run(config.resume_run)
    if previous.status == "completed":
        raise ValueError(f"run {previous.id} already completed; nothing to resume")
    if previous.base_hash != base_hash or previous.method != config.method:
        raise ValueError(f"run {previous.id} used method {previous.method!r} on base {previous.base_hash[:12]}...; "
                         f"this run asks for {config.method!r} on {base_hash[:12]}...; refusing to resume")
    return previous.id


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederationConfig.from_run_config(context.run_config)
    privacy = PrivacySettings.from_config(config)  # refuses a budget no user fits in, before the run is opened
    method_ = method(config.method)
    ledger = open_ledger(config)
    base = load_model(config.base_model, config.base_dtype)
    base_hash = weights_hash(base)
    adapter = attach_adapter(base, base_lora_config(config), seed=config.seed)
    run_id = open_run(ledger, config, context.run_id, base_hash)
    strategy = FederatedAdapters(
        ledger, run_id, method_,
        adapter_shapes=expected_shapes(adapter),
        aggregation=Aggregation(config.aggregation),
        max_update_bytes=int(config.max_update_mb * 2**20),
        node_wait_seconds=config.node_wait_seconds,
        evaluate_rounds=config.evaluate_rounds,
        domain_mix=config.domain_mix,
        server_learning_rate=config.server_learning_rate,
        server_momentum=config.server_momentum,
        codecs=config.codecs,
        proximal_mu=config.proximal_mu,
        norm_bound=NormBound(config.max_update_norm, config.norm_bound_relative, clip=config.norm_bound_mode == "clip"),
        example_weights=ExampleWeights(config.example_weights),
        max_examples_per_client=config.max_examples_per_client,
        trim_beta=config.trim_beta,
        byzantine_clients=config.byzantine_clients,
        krum_keep=config.krum_keep,
        privacy=privacy,
        checkpoints=CheckpointPolicy(config.checkpoint_every, last=config.num_server_rounds),
        fraction_train=config.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.available_nodes,
        min_available_nodes=config.available_nodes,
    )
    done = ledger.resume_run(run_id, context.run_id, from_checkpoint=method_.sends_arrays) if config.resume_run else 0
    strategy.restore(done)
    initial = strategy.groups.get(GLOBAL_GROUP) or to_arrays(adapter_state(adapter))
    announced = ConfigRecord({"base-hash": base_hash})
    try:
        if config.secure_aggregation:  # Flower's SecAgg+ trains, the strategy above evaluates (server/secure.py)
            run_secure_rounds(grid, context, strategy, config, initial, announced)
        else:
            (ResumedRounds(strategy, done) if done else strategy).start(
                grid=ProgressGrid(grid, ledger, run_id), initial_arrays=initial,  # replies counted as they arrive
                num_rounds=config.num_server_rounds - done,
                timeout=config.round_timeout, train_config=announced, evaluate_config=ConfigRecord(dict(announced)))
    except BaseException as error:
        ledger.record_event(run_id, "run-failed", f"{type(error).__name__}: {error}")
        ledger.finish_run(run_id, "failed")
        raise
    if method_.sends_arrays:
        output = Path(config.output_dir) if config.output_dir else fedgraft_home() / "runs"
        save_group_adapters(adapter, strategy.groups, output / f"run-{context.run_id}")
    ledger.finish_run(run_id, "completed")
    ledger.close()

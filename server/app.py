"""The fedgraft ServerApp: federate a LoRA adapter over the shared base and keep a round ledger."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.ledger import Ledger
from server.strategy import LedgerFedAvg
from shared.adapters import adapter_state, attach_adapter, expected_shapes, load_arrays, lora_config, save_adapter, to_arrays
from shared.base_model import cached_base
from shared.config import FederationConfig

app = ServerApp()


def state_dir() -> Path:
    """Where the ledger and run outputs go unless the run config says otherwise ($FEDGRAFT_HOME)."""
    return Path(os.environ.get("FEDGRAFT_HOME", Path.home() / ".fedgraft"))


def open_ledger(config: FederationConfig) -> Ledger:
    return Ledger(config.ledger_url or Ledger.default_url(state_dir()))


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederationConfig.from_run_config(context.run_config)
    ledger = open_ledger(config)
    base, _, base_hash = cached_base(config.base_model, config.base_dtype)
    adapter = attach_adapter(base, lora_config(config), seed=config.seed)
    run_id = ledger.start_run(context.run_id, config.as_run_config(), config.base_model, base_hash)
    strategy = LedgerFedAvg(
        ledger, run_id,
        expected_shapes=expected_shapes(adapter),
        max_update_bytes=int(config.max_update_mb * 2**20),
        node_wait_seconds=config.node_wait_seconds,
        evaluate_rounds=config.evaluate_rounds,
        fraction_train=config.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_train_nodes,
        min_available_nodes=config.min_train_nodes,
    )
    announced = ConfigRecord({"base-hash": base_hash})
    try:
        result = strategy.start(grid=grid, initial_arrays=to_arrays(adapter_state(adapter)),
                                num_rounds=config.num_server_rounds, timeout=config.round_timeout,
                                train_config=announced, evaluate_config=ConfigRecord(dict(announced)))
    except BaseException as error:
        ledger.record_event(run_id, "run-failed", f"{type(error).__name__}: {error}")
        ledger.finish_run(run_id, "failed")
        raise
    load_arrays(adapter, result.arrays)
    output = Path(config.output_dir) if config.output_dir else state_dir() / "runs"
    save_adapter(adapter, output / f"run-{context.run_id}" / "global-adapter")
    ledger.finish_run(run_id, "completed")
    ledger.close()

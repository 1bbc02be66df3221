"""Exports of a run: its rounds and client results as JSON or CSV, its adapter as a peft folder."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy
import safetensors.numpy

from server.ledger import Ledger, LedgerError
from server.ledger.records import ClientResultRecord, RoundRecord, RunRecord

from .queries import CheckpointInfo, checkpoints

FORMATS = ("csv", "json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The run-config keys an adapter_config.json is built from.
LORA_KEYS = ("lora-r", "lora-alpha", "lora-dropout", "lora-target-modules", "base-model")

# CSV: one row per round ("round") and per client result ("client"), metrics flattened.
CSV_COLUMNS = (
    "record", "run_id", "round", "phase", "node_id", "user_id", "domain", "status", "num_examples",
    "clients_sampled", "clients_replied", "clients_failed", "bytes_down", "bytes_up", "seconds",
    "started_at", "finished_at", "error",
)  # fmt: skip
METRIC_PREFIX = "metric:"


# --- rounds and client results ------------------------------------------------------------------


def export_run(ledger: Ledger, run: RunRecord, fmt: str, output: Path) -> tuple[int, int]:
    """Write the run's rounds and client results to ``output``; returns (rounds, client results)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    rounds = ledger.rounds(run.id)
    results = ledger.client_results(run.id)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as stream:
        if fmt == "json":
            write_json(stream, run, rounds, results)
        else:
            write_csv(stream, rounds, results)
    return len(rounds), len(results)


def write_json(stream: TextIO, run: RunRecord, rounds: list[RoundRecord], results: list[ClientResultRecord]) -> None:
    """``{"run": {...}, "rounds": [...], "client_results": [...]}``, times in ISO 8601 (UTC).

    One record per line: greppable, diffable, and written by json's C encoder (``indent`` would
    switch to the pure-Python one, several times slower on a long run).
    """
    stream.write('{"run": ' + _dumps(_plain(run)))
    for key, records in (("rounds", rounds), ("client_results", results)):
        lines = ",\n  ".join(_dumps(_plain(record)) for record in records)
        stream.write(f',\n"{key}": [\n  {lines}\n]' if records else f',\n"{key}": []')
    stream.write("}\n")


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False)


def write_csv(stream: TextIO, rounds: list[RoundRecord], results: list[ClientResultRecord]) -> None:
    """One table: a row per round (``record=round``) then per client result (``record=client``).

    Each metric gets a ``metric:<name>`` column; cells that do not apply to a row are empty.
    """
    metric_names = sorted({name for record in [*rounds, *results] for name in record.metrics})
    writer = csv.DictWriter(stream, [*CSV_COLUMNS, *(METRIC_PREFIX + name for name in metric_names)])
    writer.writeheader()
    writer.writerows(_round_row(round_) for round_ in rounds)
    writer.writerows(_client_row(result) for result in results)


def _round_row(round_: RoundRecord) -> dict[str, Any]:
    row = {
        "record": "round", "run_id": round_.run_id, "round": round_.number,
        "clients_sampled": round_.clients_sampled, "clients_replied": round_.clients_replied,
        "clients_failed": round_.clients_failed, "bytes_down": round_.bytes_down, "bytes_up": round_.bytes_up,
        "started_at": _iso(round_.started_at), "finished_at": _iso(round_.finished_at),
    }  # fmt: skip
    return row | _metric_cells(round_.metrics)


def _client_row(result: ClientResultRecord) -> dict[str, Any]:
    row = {
        "record": "client", "run_id": result.run_id, "round": result.round_number, "phase": result.phase,
        "node_id": result.node_id, "user_id": result.user_id, "domain": result.domain, "status": result.status,
        "num_examples": result.num_examples, "bytes_down": result.bytes_down, "bytes_up": result.bytes_up,
        "seconds": result.seconds, "error": result.error,
    }  # fmt: skip
    return row | _metric_cells(result.metrics)


def _metric_cells(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {METRIC_PREFIX + name: value for name, value in metrics.items()}


def _plain(record: Any) -> dict[str, Any]:
    """A record dataclass as JSON-ready data (datetimes as ISO strings)."""
    return {field.name: _json_value(getattr(record, field.name)) for field in dataclasses.fields(record)}


def _json_value(value: Any) -> Any:
    return _iso(value) if isinstance(value, datetime) else value


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --- adapters -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdapterExport:
    """What ``write_adapter`` wrote."""

    folder: Path
    round_number: int
    domain: str
    num_tensors: int
    content_hash: str
    base_model: str  # what the adapter's config names as its base: the run's, or the emulator's teacher


def write_adapter(
    ledger: Ledger, run: RunRecord, output: Path, round_number: int | None = None, domain: str = "",
    overwrite: bool = False, for_teacher: bool = False, teacher: str | None = None,
) -> AdapterExport:  # fmt: skip
    """Write a stored checkpoint as a peft adapter folder ``PeftModel.from_pretrained`` loads.

    The checkpoint holds exactly the tensors of ``peft.get_peft_model_state_dict``; they go to
    ``adapter_model.safetensors`` unchanged, next to an ``adapter_config.json`` built from the run's
    LoRA settings. ``round_number`` None takes the latest round with a checkpoint for ``domain``.
    ``for_teacher``: the run's base is an emulator; write the adapter for its teacher (the one its
    layout names, or ``teacher``), its blocks renamed to the teacher's (``shared.plugin``).
    """
    stored = _find_checkpoint(ledger, run, round_number, domain)
    lora, layout = adapter_config(run.config, for_teacher)  # before writing anything: bad settings fail here
    weights = output / ADAPTER_WEIGHTS
    if weights.exists() and not overwrite:
        raise FileExistsError(f"{weights} already exists (pass --force to replace it)")
    tensors = ledger.load_checkpoint(run.id, stored.round_number, domain)
    if for_teacher:
        from shared.plugin import NotPluggable, teacher_adapter

        try:
            tensors, lora = teacher_adapter(tensors, lora, layout, teacher or layout.teacher)
        except NotPluggable as error:
            raise LedgerError(f"run {run.id}'s adapter: {error}") from error
    output.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, weights)
    lora.save_pretrained(str(output))
    return AdapterExport(output, stored.round_number, domain, len(tensors), stored.content_hash,
                         lora.base_model_name_or_path)


def adapter_config(run_config: Mapping[str, Any], for_teacher: bool = False):  # -> (LoraConfig, EmulatorLayout | None)
    """The peft LoRA configuration of a run, from the run config stored in the ledger, and its base's layout.

    The layout (which blocks carry adapters on an emulator base) is read from the base where it is on
    this machine. Without it, the configuration covers every block: loading then gives the blocks
    absent from the checkpoint a zero LoRA B, so the adapter computes the same. Writing for the
    teacher needs the layout.
    """
    missing = [key for key in LORA_KEYS if run_config.get(key) in (None, "")]
    if missing:
        raise LedgerError(f"the run's config lacks {', '.join(missing)}: cannot describe its adapter")
    from shared.adapters import lora_config  # imports torch: only the adapter export pays for it
    from shared.base_model import BaseModelError, base_layout
    from shared.config import ConfigError, FederationConfig

    try:  # only the LoRA keys: a run stored by an older version may hold keys this one no longer knows
        config = FederationConfig.from_run_config({key: run_config[key] for key in LORA_KEYS})
    except ConfigError as error:
        raise LedgerError(f"the run's LoRA settings are invalid: {error}") from error
    try:
        layout = base_layout(config.base_model)
    except BaseModelError as error:
        if for_teacher:
            raise LedgerError(f"the run's base {config.base_model!r} is not here ({error}): "
                              "its emulator layout says which teacher blocks the adapter belongs to") from error
        layout = None
    if for_teacher and layout is None:
        raise LedgerError(f"the run's base {config.base_model!r} is not an emulator base: its adapter runs only on it")
    return lora_config(config, layout, base_model_name_or_path=config.base_model, inference_mode=True), layout


def save_tensors(tensors: Mapping[str, numpy.ndarray], path: Path) -> None:
    """Save as peft does: safetensors with ``format: pt`` metadata."""
    arrays = {name: numpy.ascontiguousarray(array) for name, array in tensors.items()}
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "pt"})


def _find_checkpoint(ledger: Ledger, run: RunRecord, round_number: int | None, domain: str) -> CheckpointInfo:
    stored = [c for c in checkpoints(ledger, run.id) if c.domain == domain]
    if round_number is not None:
        stored = [c for c in stored if c.round_number == round_number]
    if not stored:
        which = "any round" if round_number is None else f"round {round_number}"
        available = _describe_checkpoints(ledger, run)
        raise LedgerError(f"run {run.id} has no checkpoint for {which}, domain {domain!r}; {available}")
    return stored[-1]


def _describe_checkpoints(ledger: Ledger, run: RunRecord) -> str:
    stored = checkpoints(ledger, run.id)
    if not stored:
        return "it has no checkpoints at all"
    return "stored: " + ", ".join(f"round {c.round_number} domain {c.domain!r}" for c in stored)

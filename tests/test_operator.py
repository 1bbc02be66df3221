"""The operator CLI (fedgraft-ops) over ledgers filled through the Ledger write API.

One ledger, written once per module with known values, serves most tests; they check that what the
commands print and export are those values. The adapter export is checked against peft itself: the
written folder loads with plain ``PeftModel.from_pretrained`` on the tiny base.
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from server.ledger import Ledger
from server.operator.cli import app
from server.operator.export import CSV_COLUMNS, METRIC_PREFIX

POSTGRES_URL = os.environ.get("FEDGRAFT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MAX_UINT64 = 2**64 - 1
BASE_HASH = "0123456789abcdef" * 4
USERS = ("macbeth/LADY MACBETH", "hamlet/HAMLET", "tempest/[bold]ARIEL[/bold]")  # markup must stay text
CONFIG = {
    "base-model": "tiny-llama", "lora-r": 4, "lora-alpha": 8, "lora-dropout": 0.0,
    "lora-target-modules": "q_proj,v_proj", "num-server-rounds": 3, "learning-rate": 0.01,
}  # fmt: skip


# --- a ledger with known contents ---------------------------------------------------------------


@dataclass(frozen=True)
class Filled:
    """A ledger filled by ``fill_ledger`` and what went into it."""

    url: str
    run_id: int  # completed: 3 rounds of 3 clients, one failure in round 2, evaluation after round 3
    running_id: int  # still running, no rounds
    flower_run_id: str


def train_metrics(round_number: int, client: int) -> dict[str, float]:
    return {
        "num-examples": 10 + client, "train-loss": 3.0 / round_number + client / 100,
        "eval-loss-before": 3.25 / round_number, "eval-loss": 2.75 / round_number + client / 1000, "seconds": 1.5,
    }  # fmt: skip


def round_metrics(round_number: int) -> dict[str, float]:
    return {"train-loss": 3.0 / round_number, "eval-loss-before": 3.25 / round_number, "eval-loss": 2.75 / round_number}


def fill_ledger(url: str, schema: str | None = None) -> Filled:
    """Two runs: a completed one with rounds, results, events and checkpoints, and a running one."""
    with Ledger(url, schema=schema) as ledger:
        run_id = ledger.start_run(MAX_UINT64, CONFIG, "tiny-llama", BASE_HASH)
        for number in (1, 2, 3):
            fill_round(ledger, run_id, number)
        for client, user in enumerate(USERS):
            ledger.record_client_result(
                run_id, 3, node_id=100 + client, phase="evaluate", status="ok", user_id=user, domain="tragedy",
                num_examples=5, metrics={"base-loss": 4.5, "eval-loss": 0.9 + client / 10, "eval-tokens": 321},
                seconds=0.25,
            )  # fmt: skip
        ledger.finish_run(run_id, "completed")
        running_id = ledger.start_run("12345", CONFIG, "tiny-llama", BASE_HASH)
    return Filled(url, run_id, running_id, str(MAX_UINT64))


def fill_round(ledger: Ledger, run_id: int, number: int) -> None:
    ledger.start_round(run_id, number, clients_sampled=3, bytes_down=3 * 4096)
    for client, user in enumerate(USERS):
        if number == 2 and client == 2:
            ledger.record_client_result(run_id, number, node_id=102, status="failed", error="code 2: [red]gone[/red]")
            ledger.record_event(run_id, "client-failed", "node 102 vanished", round_number=number, node_id=102)
            continue
        ledger.record_client_result(
            run_id, number, node_id=100 + client, status="ok", user_id=user, domain="tragedy",
            num_examples=10 + client, metrics=train_metrics(number, client), bytes_up=4096, bytes_down=4096,
            seconds=1.5,
        )  # fmt: skip
    failed = 1 if number == 2 else 0
    ledger.finish_round(run_id, number, clients_replied=3 - failed, clients_failed=failed,
                        metrics=round_metrics(number), bytes_up=(3 - failed) * 4096)  # fmt: skip
    ledger.save_checkpoint(run_id, number, {"layer.lora_A.weight": np.full((4, 8), number, np.float32)})


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Filled:
    return fill_ledger(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}")


def ops(*args: str, db: str | None = None) -> Result:
    """Run ``fedgraft-ops ARGS --db DB``; the result has exit_code, stdout and stderr."""
    arguments = [*args, "--db", db] if db else list(args)
    return CliRunner().invoke(app, arguments, env={"COLUMNS": "200"})


# --- listing and showing ------------------------------------------------------------------------


def test_runs_lists_every_run_with_its_status_and_round_count(filled: Filled) -> None:
    result = ops("runs", db=filled.url)
    assert result.exit_code == 0, result.output
    completed, running = _line_with(result.stdout, filled.flower_run_id), _line_with(result.stdout, " 12345 ")
    assert completed.split("│")[1].strip() == str(filled.run_id)
    assert "completed" in completed and "tiny-llama" in completed and "fedavg" in completed
    assert completed.split("│")[-2].strip() == "3"  # rounds
    assert "running" in running and running.split("│")[-2].strip() == "0"


def test_run_shows_identity_summary_checkpoints_and_config(filled: Filled) -> None:
    result = ops("run", str(filled.run_id), db=filled.url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert BASE_HASH in out and filled.flower_run_id in out and "completed" in out
    assert "3 (3 finished)" in out
    assert "8 of 9 sampled, 1 failed" in out
    assert "36.0 KiB / 32.0 KiB" in out  # 3 rounds x 12 KiB down; 3 + 2 + 3 replies x 4 KiB up
    assert f"{round_metrics(3)['train-loss']:.4f}" in out
    assert "round 1, round 2, round 3" in out
    assert "q_proj,v_proj" in _line_with(out, "lora-target-modules")


def test_rounds_show_losses_participation_and_bytes(filled: Filled) -> None:
    result = ops("rounds", str(filled.run_id), db=filled.url)
    assert result.exit_code == 0, result.output
    for number in (1, 2, 3):
        cells = _cells(_line_starting_with(result.stdout, str(number)))
        failed = 1 if number == 2 else 0
        assert cells[:4] == [str(number), "3", str(3 - failed), str(failed)]
        metrics = round_metrics(number)
        assert cells[4:7] == [f"{metrics[k]:.4f}" for k in ("train-loss", "eval-loss-before", "eval-loss")]
        assert cells[7:9] == ["12.0 KiB", "8.00 KiB" if failed else "12.0 KiB"]


def test_clients_of_a_round_show_each_result_and_errors_verbatim(filled: Filled) -> None:
    result = ops("clients", str(filled.run_id), "--round", "2", db=filled.url)
    assert result.exit_code == 0, result.output
    assert "round 2" in result.stdout
    lady = _cells(_line_with(result.stdout, "LADY MACBETH"))
    assert lady[:6] == ["100", USERS[0], "tragedy", "train", "ok", "10"]
    metrics = train_metrics(2, 0)
    assert lady[6:8] == [f"{metrics['train-loss']:.4f}", f"{metrics['eval-loss']:.4f}"]
    assert lady[8:10] == ["4.00 KiB", "1.50 s"]
    failed = _cells(_line_with(result.stdout, "102"))
    assert failed[4] == "failed" and failed[-1] == "code 2: [red]gone[/red]"  # rich markup shown, not applied


def test_clients_default_to_the_last_round_and_filter_by_phase(filled: Filled) -> None:
    result = ops("clients", filled.flower_run_id, "--phase", "evaluate", "--metrics", "eval-loss,base-loss,x",
                 db=filled.url)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "round 3" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "evaluate" in line]
    assert len(rows) == 3 and not any(" train " in line for line in result.stdout.splitlines())
    assert "[bold]ARIEL[/bold]" in result.stdout
    assert _cells(_line_with(result.stdout, "ARIEL"))[6:9] == ["1.1000", "4.5000", "-"]  # "x": no such metric


def test_a_narrow_terminal_loses_no_column(filled: Filled) -> None:
    arguments = ["clients", str(filled.run_id), "--round", "2", "--db", filled.url,
                 "--metrics", "train-loss,eval-loss-before,eval-loss,base-loss"]  # fmt: skip
    result = CliRunner().invoke(app, arguments, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    failed = _cells(_line_with(result.stdout, " 102 "))
    assert len(failed) == 13 and failed[4] == "failed" and failed[-1].startswith("code 2:")
    lady = _cells(_line_with(result.stdout, "LADY"))
    assert lady[6] == f"{train_metrics(2, 0)['train-loss']:.4f}" and lady[-2] == "1.50 s"


def test_events_are_listed(filled: Filled) -> None:
    result = ops("events", str(filled.run_id), db=filled.url)
    assert result.exit_code == 0, result.output
    cells = _cells(_line_with(result.stdout, "client-failed"))
    assert cells[1:] == ["2", "client-failed", "102", "node 102 vanished"]


def test_a_run_is_found_by_its_flower_run_id(filled: Filled) -> None:
    by_flower = ops("run", filled.flower_run_id, db=filled.url)
    by_ledger = ops("run", str(filled.run_id), db=filled.url)
    assert by_flower.exit_code == 0 and by_flower.stdout == by_ledger.stdout
    assert ops("rounds", "12345", db=filled.url).exit_code == 0


def test_the_default_ledger_is_the_one_in_fedgraft_home(filled: Filled, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path(filled.url.removeprefix("sqlite:///")).parent
    monkeypatch.setenv("FEDGRAFT_HOME", str(home))
    result = ops("runs")
    assert result.exit_code == 0 and filled.flower_run_id in result.stdout


# --- errors -------------------------------------------------------------------------------------


def test_an_unknown_run_is_a_clear_error(filled: Filled) -> None:
    for command in ("run", "rounds", "clients", "events"):
        result = ops(command, "999", db=filled.url)
        assert result.exit_code == 1
        assert "no run 999 in the ledger" in result.stderr and result.stdout == ""
    assert "not a run id" in ops("run", "latest", db=filled.url).stderr


def test_an_ambiguous_reference_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as ledger:
        ledger.start_run("2", CONFIG, "tiny-llama", BASE_HASH)  # ledger id 1, Flower id 2
        ledger.start_run("77", CONFIG, "tiny-llama", BASE_HASH)  # ledger id 2
    result = ops("run", "2", db=url)
    assert result.exit_code == 1 and "ambiguous" in result.stderr
    assert "ledger id 1 (Flower run 2)" in result.stderr and "ledger id 2 (Flower run 77)" in result.stderr
    assert ops("run", "77", db=url).exit_code == 0


def test_a_missing_ledger_is_a_clear_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "ledger.db"
    result = ops("runs", db=f"sqlite:///{path}")
    assert result.exit_code == 1 and "no such file" in result.stderr and str(path) in result.stderr
    assert not path.parent.exists()  # read-only: the CLI never creates a ledger


def test_an_unreachable_database_is_a_clear_error() -> None:
    result = ops("runs", db="postgresql+psycopg://postgres@127.0.0.1:1/test")
    assert result.exit_code == 1
    assert "cannot open the ledger at postgresql+psycopg://postgres@127.0.0.1:1/test" in result.stderr
    assert "refused" in result.stderr.lower()


def test_an_empty_ledger_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()  # created, migrated, no runs
    for args in (["runs"], ["run", "1"]):
        result = ops(*args, db=url)
        assert result.exit_code == 1 and "holds no runs yet" in result.stderr


def test_a_file_without_ledger_tables_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE unrelated (x INTEGER)"))
    engine.dispose()
    result = ops("runs", db=f"sqlite:///{path}")
    assert result.exit_code == 1 and "has no tables yet" in result.stderr


# --- exports ------------------------------------------------------------------------------------


def test_json_export_parses_back_to_the_ledger_values(filled: Filled, tmp_path: Path) -> None:
    output = tmp_path / "run.json"
    result = ops("export", str(filled.run_id), "--format", "json", "--output", str(output), db=filled.url)
    assert result.exit_code == 0, result.output
    assert "wrote 3 rounds and 12 client results" in result.stdout
    document = json.loads(output.read_text())
    with Ledger(filled.url, read_only=True) as ledger:
        rounds, results = ledger.rounds(filled.run_id), ledger.client_results(filled.run_id)
    assert document["run"]["flower_run_id"] == filled.flower_run_id and document["run"]["config"] == CONFIG
    assert [r["metrics"] for r in document["rounds"]] == [r.metrics for r in rounds]
    assert [r["started_at"] for r in document["rounds"]] == [r.started_at.isoformat() for r in rounds]
    exported = [(r["round_number"], r["node_id"], r["phase"], r["status"], r["user_id"], r["metrics"], r["error"])
                for r in document["client_results"]]  # fmt: skip
    assert exported == [(r.round_number, r.node_id, r.phase, r.status, r.user_id, r.metrics, r.error) for r in results]


def test_csv_export_parses_back_to_the_ledger_values(filled: Filled, tmp_path: Path) -> None:
    output = tmp_path / "run.csv"  # the format comes from the suffix
    assert ops("export", filled.flower_run_id, "-o", str(output), db=filled.url).exit_code == 0
    with output.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0])[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    round_rows = [row for row in rows if row["record"] == "round"]
    client_rows = [row for row in rows if row["record"] == "client"]
    assert [int(row["round"]) for row in round_rows] == [1, 2, 3] and len(client_rows) == 12
    for row in round_rows:
        expected = round_metrics(int(row["round"]))
        assert {key: float(row[METRIC_PREFIX + key]) for key in expected} == expected  # exact: repr round-trips
        assert int(row["clients_failed"]) == (1 if row["round"] == "2" else 0)
    lady_2 = next(r for r in client_rows if r["round"] == "2" and r["user_id"] == USERS[0] and r["phase"] == "train")
    assert float(lady_2[METRIC_PREFIX + "train-loss"]) == train_metrics(2, 0)["train-loss"]
    assert int(lady_2["bytes_up"]) == 4096 and float(lady_2["seconds"]) == 1.5
    failed = next(r for r in client_rows if r["status"] == "failed")
    assert failed["error"] == "code 2: [red]gone[/red]" and failed[METRIC_PREFIX + "train-loss"] == ""


def test_export_needs_a_known_format(filled: Filled, tmp_path: Path) -> None:
    result = ops("export", str(filled.run_id), "-o", str(tmp_path / "run.txt"), db=filled.url)
    assert result.exit_code == 1 and "choose --format csv or json" in result.stderr


# --- adapter export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    """A ledger whose run 1 has, as round 2's checkpoint, a peft LoRA state with random values."""
    import torch

    from shared.adapters import adapter_state, attach_adapter, lora_config
    from shared.base_model import load_model
    from shared.config import FederationConfig

    config = FederationConfig(base_model=str(tiny_base), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = attach_adapter(load_model(str(tiny_base)), lora_config(config), seed=3)
    torch.manual_seed(4)
    tensors = {name: torch.randn_like(value).numpy() for name, value in adapter_state(model).items()}
    url = f"sqlite:///{tmp_path_factory.mktemp('adapter-ledger') / 'ledger.db'}"
    with Ledger(url) as ledger:
        run_id = ledger.start_run(42, config.as_run_config(), str(tiny_base), BASE_HASH)
        for number in (1, 2):
            ledger.start_round(run_id, number, clients_sampled=1, bytes_down=0)
        ledger.save_checkpoint(run_id, 1, {name: np.zeros_like(value) for name, value in tensors.items()})
        ledger.save_checkpoint(run_id, 2, tensors)
    return url, tensors


def test_adapter_export_loads_with_plain_peft_and_equals_the_checkpoint(
    trained_adapter: tuple[str, dict[str, np.ndarray]], tiny_base: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    url, tensors = trained_adapter
    output = tmp_path / "adapter"
    result = ops("adapter", "1", "--round", "2", "--output", str(output), db=url)
    assert result.exit_code == 0, result.output
    assert "round 2" in result.stdout and f"{len(tensors)} tensors" in result.stdout and BASE_HASH in result.stdout
    assert sorted(p.name for p in output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved_config = json.loads((output / "adapter_config.json").read_text())
    assert (saved_config["r"], saved_config["lora_alpha"], saved_config["peft_type"]) == (4, 8, "LORA")

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), output)
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(tensors)
    for name, expected in tensors.items():
        assert torch.equal(loaded[name], torch.from_numpy(expected)), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_adapter_export_defaults_to_the_latest_round_and_refuses_to_overwrite(
    trained_adapter: tuple[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    url, _ = trained_adapter
    output = tmp_path / "adapter"
    first = ops("adapter", "42", "-o", str(output), db=url)  # Flower run id; no --round: the latest
    assert first.exit_code == 0 and "round 2" in first.stdout
    again = ops("adapter", "42", "-o", str(output), db=url)
    assert again.exit_code == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert ops("adapter", "42", "-o", str(output), "--round", "1", "--force", db=url).exit_code == 0


def test_adapter_export_of_a_missing_checkpoint_is_a_clear_error(filled: Filled, tmp_path: Path) -> None:
    result = ops("adapter", str(filled.run_id), "--round", "7", "-o", str(tmp_path / "a"), db=filled.url)
    assert result.exit_code == 1
    assert "no checkpoint for round 7" in result.stderr and "stored: round 1 domain ''" in result.stderr
    assert not (tmp_path / "a").exists()
    other = ops("adapter", str(filled.run_id), "--domain", "comedy", "-o", str(tmp_path / "a"), db=filled.url)
    assert other.exit_code == 1 and "domain 'comedy'" in other.stderr


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL server, dropped afterwards."""
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
    try:
        with admin.connect():
            pass
    except OperationalError as error:
        admin.dispose()
        reason = f"PostgreSQL at {POSTGRES_URL} cannot be reached: {' '.join(str(error.orig).split())}"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    schema = f"fedgraft_ops_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.postgres
def test_the_operator_queries_work_on_postgresql(postgres_schema: str, tmp_path: Path) -> None:
    from server.operator.export import export_run
    from server.operator.queries import checkpoints, resolve_run, run_overviews

    filled = fill_ledger(POSTGRES_URL, schema=postgres_schema)
    with Ledger(POSTGRES_URL, schema=postgres_schema, read_only=True) as ledger:
        assert [(o.run.id, o.rounds) for o in run_overviews(ledger)] == [(filled.run_id, 3), (filled.running_id, 0)]
        run = resolve_run(ledger, filled.flower_run_id)
        assert run.id == filled.run_id
        assert [c.round_number for c in checkpoints(ledger, run.id)] == [1, 2, 3]
        assert export_run(ledger, run, "json", tmp_path / "run.json") == (3, 12)
    rounds = json.loads((tmp_path / "run.json").read_text())["rounds"]
    assert all(math.isclose(r["metrics"]["train-loss"], 3.0 / r["number"]) for r in rounds)


# --- helpers ------------------------------------------------------------------------------------


def _line_with(output: str, needle: str) -> str:
    lines = [line for line in output.splitlines() if needle in line]
    assert len(lines) == 1, f"{needle!r} on {len(lines)} lines of:\n{output}"
    return lines[0]


def _line_starting_with(output: str, first_cell: str) -> str:
    lines = [line for line in output.splitlines() if _cells(line)[:1] == [first_cell]]
    assert len(lines) == 1, f"{first_cell!r} starts {len(lines)} rows of:\n{output}"
    return lines[0]


def _cells(line: str) -> list[str]:
    """The cells of one rich table row (box-drawing separators)."""
    return [cell.strip() for cell in line.split("│")[1:-1]] if "│" in line else []

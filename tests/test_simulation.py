"""End to end: a real `flwr run` on the Simulation Engine with a tiny base built in the test."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from server.ledger import Ledger
from shared.base_model import load_model
from simulations.report import per_user_table, write_report
from simulations.run import run_simulation

pytestmark = pytest.mark.simulation

ROUNDS, USERS = 2, 3


@pytest.fixture(scope="module")
def finished_run(tiny_base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("simulation")
    run_config = {
        "base-model": str(tiny_base), "base-dtype": "float32", "num-server-rounds": ROUNDS, "min-train-nodes": USERS,
        "local-steps": 15, "batch-size": 4, "seq-len": 32, "learning-rate": 0.01, "lora-dropout": 0.0,
        "max-eval-blocks": 16, "min-speeches": 60, "node-wait-seconds": 120, "round-timeout": 300,
    }
    return run_simulation(USERS, run_config, workdir, cpus_per_client=2, timeout=600)


def test_run_completes_and_the_ledger_holds_every_round(finished_run):
    with Ledger(finished_run.ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == finished_run.flower_run_id]
        assert run.status == "completed" and run.finished_at is not None
        assert len(run.base_hash) == 64
        rounds = ledger.rounds(run.id)
        assert [r.number for r in rounds] == list(range(1, ROUNDS + 1))
        for round_ in rounds:
            assert (round_.clients_sampled, round_.clients_replied, round_.clients_failed) == (USERS, USERS, 0)
            assert round_.bytes_down > 0 and round_.bytes_up > 0
            train = [c for c in ledger.client_results(run.id, round_.number) if c.phase == "train"]
            assert len(train) == USERS and all(c.status == "ok" for c in train)
            assert len({c.user_id for c in train}) == USERS and all(c.domain for c in train)
            assert all(c.num_examples > 0 and c.bytes_up > 0 for c in train)
        final = [c for c in ledger.client_results(run.id, ROUNDS) if c.phase == "evaluate"]
        assert len(final) == USERS
        assert ledger.load_checkpoint(run.id, ROUNDS)  # the aggregate of the last round is kept


def test_federated_adapter_lowers_held_out_loss(finished_run):
    table = per_user_table(finished_run.ledger_url, finished_run.flower_run_id)
    assert len(table.rows) == USERS
    # a random tiny base learns the corpus' token statistics fast: every user must gain
    assert all(row.adapter_perplexity < row.base_perplexity for row in table.rows)
    with Ledger(finished_run.ledger_url, read_only=True) as ledger:
        run = [r for r in ledger.runs() if r.flower_run_id == finished_run.flower_run_id][0]
        first, last = ledger.rounds(run.id)[0], ledger.rounds(run.id)[-1]
    assert last.metrics["eval-loss"] < first.metrics["eval-loss-before"]


def test_report_and_global_adapter_are_written(finished_run, tiny_base):
    report = write_report(finished_run.ledger_url, finished_run.flower_run_id, finished_run.workdir / "report.md")
    text = report.read_text()
    assert "## Rounds" in text and text.count("| 1 |") + text.count("| 2 |") >= 2
    adapter_dir = finished_run.workdir / "outputs" / f"run-{finished_run.flower_run_id}" / "global-adapter"
    model = PeftModel.from_pretrained(load_model(str(tiny_base)), adapter_dir)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_the_main_job_command_runs_end_to_end(tiny_base, tmp_path):
    """`python -m simulations.run` as the README's `make run` calls it, on a tiny base."""
    from simulations.run import main

    overrides = "base-dtype=\"float32\" local-steps=4 seq-len=32 batch-size=2 max-eval-blocks=4 min-speeches=60"
    workdir = tmp_path / "work folder"  # paths with spaces travel in the run config
    code = main(["--users", "2", "--rounds", "1", "--base", str(tiny_base), "--workdir", str(workdir),
                 "--run-config", overrides])
    assert code == 0
    report = (workdir / "report.md").read_text()
    assert "## Held-out perplexity per user" in report and report.count("| ") > 10
    # the default method personalizes (fedavg-knn): each user's model beside the base and the shared adapter
    assert "| user | domain | tokens | base | shared adapter | personal model | change |" in report
    with Ledger(f"sqlite:///{workdir / 'ledger.db'}", read_only=True) as ledger:
        (run,) = ledger.runs()
        assert run.status == "completed" and run.config["exclude-plays"] == ""
        # the run config the server received: the job's own values, the overrides, the pyproject defaults
        assert (run.config["state-dir"], run.config["output-dir"]) == (str(workdir / "devices"), str(workdir / "outputs"))
        assert (run.config["base-dtype"], run.config["local-steps"], run.config["learning-rate"]) == ("float32", 4, 0.002)


def test_the_main_job_fails_when_every_client_failed(tiny_base, tmp_path, capsys):
    """Flower calls a run whose every client raised 'completed'; the main job must not call it a success."""
    from simulations.run import main

    overrides = "base-dtype=\"float32\" min-speeches=100000"  # no character has that many: every client raises
    code = main(["--users", "2", "--rounds", "1", "--base", str(tiny_base), "--workdir", str(tmp_path / "work"),
                 "--run-config", overrides])
    assert code == 1
    assert "No user was evaluated" in capsys.readouterr().out
    with Ledger(f"sqlite:///{tmp_path / 'work' / 'ledger.db'}", read_only=True) as ledger:
        (run,) = ledger.runs()
        assert {result.status for result in ledger.client_results(run.id)} == {"failed"}


def test_the_per_user_table_shows_the_personal_model_beside_the_base_and_the_shared_adapter():
    from simulations.report import PerUserTable, UserRow

    personal = PerUserTable(None, [UserRow("play/A", "comedies", 100, 120.0, 90.0, 100.0),
                                   UserRow("play/B", "comedies", 80, 110.0, 99.0, 99.5)])
    text = personal.to_markdown()
    assert "| user | domain | tokens | base | shared adapter | personal model | change |" in text
    assert "| play/A | comedies | 100 | 120.0 | 100.0 | 90.0 | -25.0% |" in text
    shared_only = PerUserTable(None, [UserRow("play/A", "comedies", 100, 120.0, 90.0)])
    assert "| play/A | comedies | 100 | 120.0 | 90.0 | -25.0% |" in shared_only.to_markdown()
    assert "federated adapter" in shared_only.to_markdown() and "shared adapter" not in shared_only.to_markdown()

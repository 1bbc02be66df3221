"""The personalization comparison end to end on a tiny base: runs, ledgers, report and plots."""

from __future__ import annotations

import json

import pytest

from server.ledger import Ledger
from simulations.compare import EXPERIMENTS, Experiment, main

pytestmark = pytest.mark.simulation


def test_experiment_files_are_valid_and_errors_name_the_problem(tmp_path):
    full = Experiment.load(EXPERIMENTS / "personalization.toml")
    assert {"local", "fedavg", "dual", "ditto", "fedsa", "domain", "fedavg-ft"} <= set(full.methods)
    for path in EXPERIMENTS.glob("*.toml"):  # every shipped experiment loads, and keeps the two bars
        assert {"local", "fedavg"} <= set(Experiment.load(path).methods), path
    bad = tmp_path / "bad.toml"
    bad.write_text('users = 2\nrounds = 1\nmethods = ["fedavg", "magic"]\n')
    with pytest.raises(ValueError, match="unknown methods \\['magic'\\]"):
        Experiment.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        Experiment.load(tmp_path / "missing.toml")


def test_quick_comparison_writes_the_report(tiny_base, tmp_path):
    assert main(["--quick", "--base", str(tiny_base), "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "report"
    text = (folder / "report.md").read_text()
    for method in ("local", "fedavg", "dual"):
        assert f"| {method} |" in text
    assert (folder / "curves.png").stat().st_size > 1000 and (folder / "user_deltas.png").stat().st_size > 1000
    results = json.loads((folder / "results.json").read_text())
    assert set(results["per_user"]) == {"local", "fedavg", "dual"}
    assert all(len(users) == 3 for users in results["per_user"].values())
    # the tiny random base learns fast, so every method must beat the base alone for every user
    for users in results["per_user"].values():
        assert all(ppl < results["base"][user] for user, ppl in users.items())
    # quick.toml sets validation-fraction: dual's personal training kept its best step, and the server
    # recorded it without rejecting a reply
    with Ledger(f"sqlite:///{tmp_path / 'out' / 'dual' / 'ledger.db'}", read_only=True) as ledger:
        results = ledger.client_results(ledger.runs()[-1].id)
    assert results and all(r.status == "ok" for r in results)
    assert all("personal-best-step" in r.metrics for r in results if r.phase == "train")

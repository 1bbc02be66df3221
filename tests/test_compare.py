"""The personalization comparison: experiment files, validation scoring, and the whole run on a tiny base."""

from __future__ import annotations

import json

import pytest

import client.runtime as runtime
from server.ledger import Ledger
from shared.config import ConfigError, FederationConfig
from shared.data import UserData, split_texts
from shared.data.users import user_seed
from simulations.compare import EXPERIMENTS, Experiment, main

pytestmark = pytest.mark.simulation


def test_experiment_files_are_valid_and_errors_name_the_problem(tmp_path):
    full = Experiment.load(EXPERIMENTS / "personalization.toml")
    assert {"local", "fedavg-knn"} <= set(full.methods) and len(full.seeds) >= 2 and full.users >= 30
    assert (full.seeds, full.splits, full.budgets) == ([0, 1], ["random", "temporal"], [3, 6])
    assert full.tune is not None and (full.tune.users, full.tune.rounds) == (10, 3)
    assert full.tune.points("fedavg-knn") == [{"learning-rate": 0.002}, {"learning-rate": 0.006}]
    product = tmp_path / "product.toml"  # a grid over two keys is their cartesian product
    product.write_text('users = 2\nrounds = 1\nmethods = ["local", "fedavg", "ditto"]\n[tune]\nusers = 2\nrounds = 1\n'
                       '[tune.grid.ditto]\npersonal-learning-rate = [0.002, 0.006]\nditto-lambda = [0.1, 1.0]\n')
    assert Experiment.load(product).tune.points("ditto") == [{"personal-learning-rate": lr, "ditto-lambda": lam}
                                                             for lr in (0.002, 0.006) for lam in (0.1, 1.0)]
    for path in EXPERIMENTS.glob("*.toml"):  # every shipped experiment loads, and keeps the two bars
        methods = set(Experiment.load(path).methods)  # fedavg itself, or a retrieval run that scores it too
        assert "local" in methods and ("fedavg" in methods or "fedavg-knn" in methods), path
    bad = tmp_path / "bad.toml"
    head = 'users = 2\nrounds = 2\nmethods = ["fedavg", "dual"]\n'
    for body, message in [
        ('users = 2\nrounds = 1\nmethods = ["fedavg", "magic"]\n', "unknown methods \\['magic'\\]"),
        (head + "seed = 3\n", "unknown keys \\['seed'\\] in the experiment"),
        (head + "[tune]\nusers = 1\nrounds = 1\nsteps = 2\n", "unknown keys \\['steps'\\] in \\[tune\\]"),
        (head + "[tune]\nusers = 1\nrounds = 1\n[tune.grid.dual]\npersonal-lr = [0.1]\n",
         "\\[tune.grid.dual\\] personal-lr: unknown run-config key"),
        (head + "[tune]\nusers = 1\nrounds = 1\n[tune.grid.ditto]\nditto-lambda = [0.1]\n",
         "\\[tune.grid.ditto\\] names a method the experiment does not run"),
        (head + "[tune]\nusers = 1\nrounds = 1\n[tune.grid.dual]\nseed = [1, 2]\n", "seed: set by the comparison"),
        (head + "[tune]\nusers = 1\nrounds = 1\n[tune.grid.dual]\nlocal-steps = []\n", "non-empty list"),
        (head + "[tune]\nusers = 1\nrounds = 1\n[tune.grid.dual]\nlocal-steps = [2, 0]\n",
         "local-steps must be > 0, got 0 \\(tune grid point \\{'local-steps': 0\\}\\)"),
        (head + "[tune]\nrounds = 1\n", "\\[tune\\] needs users >= 1"),
        (head + "seeds = [0, 1]\nsplits = [\"random\"]\n", "2 seeds and 1 splits"),
        (head + "seeds = [1, 1]\n", "seeds repeat"),
        (head + "seeds = [0]\nsplits = [\"by-act\"]\n", "unknown splits \\['by-act'\\]"),
        (head + "seeds = [0]\n[run-config]\nseed = 2\n", "both `seeds` and run-config `seed`"),
        (head + "budgets = [3]\n", "budget 3 is not a round"),
        (head + "budgets = [1]\n[run-config]\nevaluate-every = 0\n", "budget 1 is never evaluated"),
        (head + "[run-config]\nlocal-steps = 0\n", "bad.toml: local-steps must be > 0"),
    ]:
        bad.write_text(body)
        with pytest.raises(ValueError, match=message):
            Experiment.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        Experiment.load(tmp_path / "missing.toml")


USER = UserData("play/A", "comedies", [f"train {i}" for i in range(10)], ["test 0", "test 1"])


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_validation_scoring_splits_the_training_speeches_and_never_reads_the_test_ones(split, monkeypatch):
    config = FederationConfig(score_split="validation", split=split, seed=4)
    fit, held = runtime.scored_texts(USER, config)
    assert (fit, held) == split_texts(USER.train, 0.2, split, user_seed(5, "play/A"))
    assert len(fit) == 8 and len(held) == 2 and sorted(fit + held) == sorted(USER.train)
    if split == "temporal":
        assert held == ["train 8", "train 9"]
    assert runtime.scored_texts(USER, FederationConfig(split=split)) == (USER.train, USER.test)
    tokenized = []
    monkeypatch.setattr(runtime, "_blocks_cache", {})
    monkeypatch.setattr(runtime, "tokenize_blocks", lambda tokenizer, texts, seq_len: tokenized.append(list(texts)) or [])
    runtime.user_blocks(USER, object(), config)
    assert tokenized == [fit, held]
    with pytest.raises(ConfigError, match="score-split must be one of \\['test', 'validation'\\], got 'train'"):
        FederationConfig.from_run_config({"score-split": "train"})
    with pytest.raises(ValueError, match="'play/B' has 1 training text"):
        runtime.scored_texts(UserData("play/B", "comedies", ["x"], ["y"]), config)


def test_quick_comparison_writes_the_report(tiny_base, tmp_path):
    assert main(["--quick", "--base", str(tiny_base), "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "report"
    text = (folder / "report.md").read_text()
    for method in ("local", "fedavg", "fedavg-knn", "dual"):
        assert f"| {method} |" in text
    assert "`fedavg` is `fedavg-knn`'s user models without the cache" in text
    for part in ("## Tuning", "## All seeds pooled (6 users)", "## Seed 0 (split random)", "## Seed 1 (split temporal)",
                 "vs fedavg: mean change [95% CI]", "| dual | 1 | 3 |", "| dual | 2 | 6 |", "train steps / client round"):
        assert part in text, part
    for plot in ("curves.png", "user_deltas.png", "forest.png"):
        assert (folder / plot).stat().st_size > 1000, plot
    results = json.loads((folder / "results.json").read_text())
    assert set(results["per_user"]) == {"local", "fedavg", "fedavg-knn", "dual"}
    # pooled: three users per seed, each qualified by its seed
    assert all(len(users) == 6 for users in results["per_user"].values())
    assert {user.split("/")[0] for user in results["per_user"]["dual"]} == {"seed0", "seed1"}
    assert set(results["scopes"]) == {"seed 0", "seed 1", "pooled"}
    # the tiny random base learns fast, so every method must beat the base alone for every user
    for users in results["per_user"].values():
        assert all(ppl < results["base"][user] for user, ppl in users.items())
    # one row per method and budget, every row against each baseline with its interval around the mean
    for scope in results["scopes"].values():
        assert sorted((r["method"], r["round"]) for r in scope["rows"]) == sorted(
            (m, n) for m in ("local", "fedavg", "fedavg-knn", "dual") for n in (1, 2))
        for row in scope["rows"]:
            if row["method"] != "fedavg":
                assert row["vs_fedavg_low"] <= row["vs_fedavg"] <= row["vs_fedavg_high"]
        assert scope["compute"]["fedavg"]["train_steps"] == 4.0  # local-steps
        assert scope["compute"]["fedavg"]["train_tokens"] == 4.0 * 2 * 32  # x batch-size x seq-len
        assert scope["compute"]["dual"]["train_steps"] == 4.0 + 4.0  # local-steps + personal-steps
    assert {r["method"] for r in results["summary"]} == {"local", "fedavg", "fedavg-knn", "dual"}
    # fedavg's row is fedavg-knn's user models without the cache, read from the same ledger
    with Ledger(f"sqlite:///{tmp_path / 'out' / 'seed-0' / 'fedavg-knn' / 'ledger.db'}", read_only=True) as ledger:
        evaluated = [r for r in ledger.client_results(ledger.runs()[-1].id) if r.phase == "evaluate"]
    last = max(r.round_number for r in evaluated)
    assert {f"seed0/{r.user_id}": r.metrics["model-perplexity"] for r in evaluated if r.round_number == last} == {
        u: v for u, v in results["per_user"]["fedavg"].items() if u.startswith("seed0/")}
    assert all(r["round"] == 2 for r in results["summary"])
    # the tune stage: both dual points scored on validation, the lower one chosen and used by the final runs
    tuning = results["tuning"]
    assert [p["values"] for p in tuning] == [{"personal-learning-rate": 0.005}, {"personal-learning-rate": 0.02}]
    best = min(tuning, key=lambda p: p["score"])
    assert [p["chosen"] for p in tuning] == [p is best for p in tuning]
    with Ledger(f"sqlite:///{tmp_path / 'out' / 'tune' / 'dual' / 'point-0' / 'ledger.db'}", read_only=True) as ledger:
        tuned = ledger.runs()[-1]
    assert (tuned.config["score-split"], tuned.config["num-server-rounds"], tuned.config["min-train-nodes"]) == (
        "validation", 1, 2)
    for seed, split in ((0, "random"), (1, "temporal")):
        with Ledger(f"sqlite:///{tmp_path / 'out' / f'seed-{seed}' / 'dual' / 'ledger.db'}", read_only=True) as ledger:
            run = ledger.runs()[-1]
            client_results = ledger.client_results(run.id)
        assert (run.config["seed"], run.config["split"], run.config["score-split"]) == (seed, split, "test")
        assert run.config["personal-learning-rate"] == best["values"]["personal-learning-rate"]
        # quick.toml sets validation-fraction: dual's personal training kept its best step, and the server
        # recorded it without rejecting a reply
        assert client_results and all(r.status == "ok" for r in client_results)
        assert all("personal-best-step" in r.metrics for r in client_results if r.phase == "train")

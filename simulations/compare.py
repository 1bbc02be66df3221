"""Compare personalization methods on Shakespeare federations over several seeds and write a per-user report.

    python -m simulations.compare                                   # simulations/experiments/personalization.toml
    python -m simulations.compare --experiment simulations/experiments/quick.toml --out runs/quick

Each method is its own ``flwr run`` on the Simulation Engine with the same users, seed, rounds and
local budget. An experiment may first tune each method's grid of run-config values on validation
speeches (``score-split = "validation"``: part of each user's training speeches, never the test ones)
and run the final comparison with each method's best point, once per seed. Every number in the
report is read back from the runs' round ledgers.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from compressor import prepare_base
from deploy.flower import PROJECT_ROOT, FlowerError, exit_on_sigterm
from shared.config import ConfigError, FederationConfig
from shared.data import SPLIT_MODES
from shared.methods import METHODS
from simulations.personalization_report import MethodRun, Scores, TunePoint, write_personalization_report
from simulations.run import run_simulation

console = Console()
EXPERIMENTS = PROJECT_ROOT / "simulations" / "experiments"
TOP_KEYS = {"users", "rounds", "methods", "run-config", "reference", "seeds", "splits", "budgets", "tune"}
TUNE_KEYS = {"users", "rounds", "grid"}
# Set by the comparison itself for every run: a grid over them would change what is compared.
CONTROLLED_KEYS = {"method", "seed", "split", "score-split", "num-server-rounds", "min-available-nodes", "base-model",
                   "state-dir", "ledger-url", "output-dir"}
RUN_CONFIG_KEYS = set(FederationConfig().as_run_config())


@dataclass(frozen=True)
class Tune:
    """The tune stage: every point of each method's grid, on ``users`` users of the first seed for ``rounds`` rounds."""

    users: int
    rounds: int
    grid: dict[str, dict[str, list[object]]]  # method -> run-config key -> candidate values

    def points(self, method: str) -> list[dict[str, object]]:
        """The cartesian product of the method's grid, in the order the keys and values are written."""
        keys = list(self.grid[method])
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[method][k] for k in keys))]

    @classmethod
    def parse(cls, path: Path, data: dict, methods: list[str]) -> "Tune":
        _refuse_unknown(path, "[tune]", data, TUNE_KEYS)
        grid = {str(m): dict(keys) for m, keys in data.get("grid", {}).items()}
        for method_name, keys in grid.items():
            if method_name not in methods:
                raise ValueError(f"{path}: [tune.grid.{method_name}] names a method the experiment does not run; "
                                 f"methods: {methods}")
            for key, values in keys.items():
                _check_grid_key(path, method_name, key, values)
        tune = cls(int(data.get("users", 0)), int(data.get("rounds", 0)), grid)
        if tune.users < 1 or tune.rounds < 1:
            raise ValueError(f"{path}: [tune] needs users >= 1 and rounds >= 1, got users={tune.users}, rounds={tune.rounds}")
        return tune


def _check_grid_key(path: Path, method_name: str, key: str, values: object) -> None:
    where = f"{path}: [tune.grid.{method_name}] {key}"
    if key not in RUN_CONFIG_KEYS:
        raise ValueError(f"{where}: unknown run-config key (docs/run-config.md)")
    if key in CONTROLLED_KEYS:
        raise ValueError(f"{where}: set by the comparison itself, cannot be tuned")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: needs a non-empty list of values, got {values!r}")


def _refuse_unknown(path: Path, section: str, data: dict, known: set[str]) -> None:
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} in {section}; known: {sorted(known)}")


@dataclass(frozen=True)
class Experiment:
    """One comparison: methods x seeds (users, rounds, run config), an optional tune stage and reference row."""

    users: int
    rounds: int
    methods: list[str]
    run_config: dict[str, object]
    reference: dict[str, object] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    splits: list[str] = field(default_factory=lambda: ["random"])
    budgets: list[int] = field(default_factory=list)  # rounds reported besides the last
    tune: Tune | None = None

    @classmethod
    def load(cls, path: Path) -> "Experiment":
        if not path.is_file():
            raise FileNotFoundError(f"experiment file not found: {path}")
        data = tomllib.loads(path.read_text())
        _refuse_unknown(path, "the experiment", data, TOP_KEYS)
        bad = [m for m in data.get("methods", []) if m not in METHODS]
        if bad:
            raise ValueError(f"{path}: unknown methods {bad}; choose from {sorted(METHODS)}")
        run_config = dict(data.get("run-config", {}))
        seeds, splits = _seeds_and_splits(path, data, run_config)
        rounds = int(data["rounds"])
        budgets = [int(b) for b in data.get("budgets", [])]
        _check_budgets(path, budgets, rounds, int(run_config.get("evaluate-every", 1)))
        methods = list(data["methods"])
        tune = Tune.parse(path, data["tune"], methods) if "tune" in data else None
        _check_run_configs(path, run_config, tune)
        return cls(int(data["users"]), rounds, methods, run_config, dict(data.get("reference", {})), seeds, splits,
                   budgets, tune)

    def describe(self) -> dict[str, object]:
        """Plain data for the report and results.json."""
        return {"users": self.users, "rounds": self.rounds, "methods": self.methods, "run_config": self.run_config,
                "seeds": self.seeds, "splits": self.splits, "budgets": self.budgets, "reference": self.reference,
                "tune": None if self.tune is None else {"users": self.tune.users, "rounds": self.tune.rounds,
                                                        "grid": self.tune.grid}}


def _seeds_and_splits(path: Path, data: dict, run_config: dict[str, object]) -> tuple[list[int], list[str]]:
    """``seeds`` and ``splits`` (seed i uses split i); by default the run config's one seed and split."""
    for key in ("seeds", "splits"):
        if key in data and key[:-1] in run_config:
            raise ValueError(f"{path}: both `{key}` and run-config `{key[:-1]}` are set; keep only `{key}`")
    seeds = [int(s) for s in data.get("seeds", [run_config.get("seed", 0)])]
    splits = [str(s) for s in data.get("splits", [run_config.get("split", "random")] * len(seeds))]
    if not seeds or len(splits) != len(seeds):
        raise ValueError(f"{path}: seeds and splits must be equally long and not empty (seed i uses split i), "
                         f"got {len(seeds)} seeds and {len(splits)} splits")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: seeds repeat ({seeds}); a repeated seed would count the same users twice")
    bad = [s for s in splits if s not in SPLIT_MODES]
    if bad:
        raise ValueError(f"{path}: unknown splits {bad}; choose from {list(SPLIT_MODES)}")
    return seeds, splits


def _check_run_configs(path: Path, run_config: dict[str, object], tune: Tune | None) -> None:
    """Refuse a bad run-config value, or a grid point's, before any run starts."""
    points = [point for m in tune.grid for point in tune.points(m)] if tune else []
    for point in [{}, *points]:
        try:
            FederationConfig.from_run_config({**run_config, **point})
        except ConfigError as error:
            raise ValueError(f"{path}: {error}" + (f" (tune grid point {point})" if point else "")) from error


def _check_budgets(path: Path, budgets: list[int], rounds: int, evaluate_every: int) -> None:
    for budget in budgets:
        if not 1 <= budget <= rounds:
            raise ValueError(f"{path}: budget {budget} is not a round of this experiment (1 to {rounds})")
        if budget != rounds and (evaluate_every == 0 or budget % evaluate_every):
            raise ValueError(f"{path}: budget {budget} is never evaluated with run-config evaluate-every = "
                             f"{evaluate_every}; use evaluate-every = 1")


def run_method(name: str, experiment: Experiment, base: str, out: Path, *, seed: int, split: str,
               users: int | None = None, rounds: int | None = None, extra: dict[str, object] | None = None) -> MethodRun:
    """One method's federation under one seed; returns where its ledger is."""
    users, rounds = users or experiment.users, rounds or experiment.rounds
    # every user connects and is evaluated; with fraction-train < 1 a round trains a sample of them
    run_config = {"round-timeout": 3600, "evaluate-every": 1, "min-train-nodes": users, **experiment.run_config,
                  "base-model": base, "method": name, "num-server-rounds": rounds, "min-available-nodes": users,
                  "state-dir": str(out / "devices"),
                  "seed": seed, "split": split, **(extra or {})}
    console.rule(f"[bold]{name}[/]: {users} users, {rounds} rounds, seed {seed} ({split}), base {base}"
                 + (f", {extra}" if extra else ""))
    result = run_simulation(users, run_config, out, timeout=3 * 3600)
    return MethodRun(name, result.ledger_url, result.flower_run_id, result.seconds, str(run_config["base-model"]),
                     seed, split)


def validation_score(run: MethodRun) -> float:
    """Mean per-user validation perplexity after the run's last round; NaN (a diverged point) ranks last."""
    scores = Scores.read(run)
    score = statistics.mean(scores.at(scores.last).values())
    return score if math.isfinite(score) else math.inf


def tune_methods(experiment: Experiment, base: str, out: Path) -> tuple[dict[str, dict[str, object]], list[TunePoint]]:
    """Run every grid point on validation speeches; each method's best point, and every point's score."""
    chosen: dict[str, dict[str, object]] = {}
    points: list[TunePoint] = []
    if experiment.tune is None:
        return chosen, points
    tune = experiment.tune
    for method_name in tune.grid:
        candidates = tune.points(method_name)
        # only the last round is scored, so tune runs evaluate once
        scores = [validation_score(run_method(method_name, experiment, base, out / "tune" / method_name / f"point-{i}",
                                              seed=experiment.seeds[0], split=experiment.splits[0], users=tune.users,
                                              rounds=tune.rounds,
                                              extra={**values, "score-split": "validation", "evaluate-every": 0}))
                  for i, values in enumerate(candidates)]
        best = min(range(len(scores)), key=scores.__getitem__)
        chosen[method_name] = candidates[best]
        points += [TunePoint(method_name, values, score, i == best) for i, (values, score) in
                   enumerate(zip(candidates, scores))]
    return chosen, points


def run_reference(experiment: Experiment, out: Path) -> MethodRun:
    """The reference row (e.g. the uncompressed teacher under fedavg) on the first seed."""
    spec = dict(experiment.reference)
    ref_base = str(prepare_base(str(spec.pop("base-model", "smollm2")))[0])
    ref_method, ref_users, ref_rounds = str(spec.pop("method", "fedavg")), spec.pop("users", None), spec.pop("rounds", None)
    return run_method(ref_method, experiment, ref_base, out / f"reference-{ref_method}", seed=experiment.seeds[0],
                      split=experiment.splits[0], users=ref_users, rounds=ref_rounds, extra=spec)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", type=Path, default=EXPERIMENTS / "personalization.toml")
    parser.add_argument("--base", default="compressed", help="the base every method shares (see simulations.run)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--report", type=Path, default=None, help="report folder (default: OUT/report)")
    parser.add_argument("--quick", action="store_true", help="use simulations/experiments/quick.toml")
    parser.add_argument("--no-reference", action="store_true", help="skip the teacher reference row")
    args = parser.parse_args(argv)
    experiment = Experiment.load(EXPERIMENTS / "quick.toml" if args.quick else args.experiment)
    folder, excluded = prepare_base(args.base)
    base = str(folder)
    experiment.run_config.setdefault("exclude-plays", ",".join(excluded))
    started = time.monotonic()
    runs, reference = [], None
    try:
        chosen, tuning = tune_methods(experiment, base, args.out)
        for seed, split in zip(experiment.seeds, experiment.splits):
            for name in experiment.methods:
                runs.append(run_method(name, experiment, base, args.out / f"seed-{seed}" / name, seed=seed, split=split,
                                       extra=chosen.get(name)))
        if experiment.reference and not args.no_reference:
            reference = run_reference(experiment, args.out)
    except FlowerError as error:
        console.print(f"[bold red]A run failed:[/] {error}")
        return 1
    command = "python -m simulations.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {_cores()} cores, Python {platform.python_version()}"
    report = write_personalization_report(runs, reference, args.report or args.out / "report", command=command,
                                          machine=machine, experiment=experiment.describe(),
                                          wall_seconds=time.monotonic() - started, tuning=tuning)
    console.print(f"Report: {report}")
    return 0


def _cores() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())

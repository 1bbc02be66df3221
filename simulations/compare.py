"""Compare personalization methods on one Shakespeare federation and write a per-user report.

    python -m simulations.compare                                   # the full comparison (~30 min)
    python -m simulations.compare --experiment simulations/experiments/quick.toml --out runs/quick

Each method is its own ``flwr run`` on the Simulation Engine with the same users, seed, rounds and
local budget; every number in the report is read back from the runs' round ledgers.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from compressor import prepare_base
from deploy.flower import PROJECT_ROOT, FlowerError, exit_on_sigterm
from shared.methods import METHODS
from simulations.personalization_report import MethodRun, write_personalization_report
from simulations.run import run_simulation

console = Console()
EXPERIMENTS = PROJECT_ROOT / "simulations" / "experiments"


@dataclass(frozen=True)
class Experiment:
    """One comparison: methods x (users, rounds, run config), plus an optional reference row."""

    users: int
    rounds: int
    methods: list[str]
    run_config: dict[str, object]
    reference: dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Experiment":
        if not path.is_file():
            raise FileNotFoundError(f"experiment file not found: {path}")
        data = tomllib.loads(path.read_text())
        unknown = set(data) - {"users", "rounds", "methods", "run-config", "reference"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        bad = [m for m in data.get("methods", []) if m not in METHODS]
        if bad:
            raise ValueError(f"{path}: unknown methods {bad}; choose from {sorted(METHODS)}")
        return cls(int(data["users"]), int(data["rounds"]), list(data["methods"]), dict(data.get("run-config", {})),
                   dict(data.get("reference", {})))


def run_method(name: str, experiment: Experiment, base: str, out: Path, users: int | None = None,
               rounds: int | None = None, extra: dict[str, object] | None = None) -> MethodRun:
    """One method's federation; returns where its ledger is."""
    users, rounds = users or experiment.users, rounds or experiment.rounds
    run_config = {"round-timeout": 3600, **experiment.run_config, "base-model": base, "method": name,
                  "num-server-rounds": rounds, "min-train-nodes": users, "state-dir": str(out / "devices"), **(extra or {})}
    console.rule(f"[bold]{name}[/]: {users} users, {rounds} rounds, base {base}")
    result = run_simulation(users, run_config, out, timeout=3 * 3600)
    return MethodRun(name, result.ledger_url, result.flower_run_id, result.seconds, str(run_config["base-model"]))


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
        for name in experiment.methods:
            runs.append(run_method(name, experiment, base, args.out / name))
        if experiment.reference and not args.no_reference:
            spec = dict(experiment.reference)
            ref_base = str(prepare_base(str(spec.pop("base-model", "smollm2")))[0])
            ref_method, ref_users, ref_rounds = str(spec.pop("method", "fedavg")), spec.pop("users", None), spec.pop("rounds", None)
            reference = run_method(ref_method, experiment, ref_base, args.out / f"reference-{ref_method}",
                                   users=ref_users, rounds=ref_rounds, extra=spec)
    except FlowerError as error:
        console.print(f"[bold red]A run failed:[/] {error}")
        return 1
    command = "python -m simulations.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {_cores()} cores, Python {platform.python_version()}"
    report = write_personalization_report(runs, reference, args.report or args.out / "report", command=command,
                                          machine=machine, experiment=experiment.__dict__,
                                          wall_seconds=time.monotonic() - started)
    console.print(f"Report: {report}")
    return 0


def _cores() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())

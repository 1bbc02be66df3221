"""Poisoning with and without the defence: per-user held-out perplexity of FedAvg when 30% of clients attack.

One federation (same users, seed, rounds and budget) run once per case:

| case | attack | defence |
|---|---|---|
| clean | none | off |
| clean, defended | none | on (what the defence costs honest clients) |
| <attack> | `scale`, `sign-flip`, `inflate-examples` by a seeded 30% of the nodes | off |
| <attack>, defended | the same | on |

The defence is ``DEFENCE`` below: updates clipped to 3x the round's median norm of change, every
accepted reply weighing the same. Each row: mean per-user held-out perplexity after the last round,
its mean per-user change against the clean run with a 95% paired-bootstrap interval over users, and
what the server did (replies accepted, clipped, rejected) from the ledger.

    python benchmarks/trust.py                                  # 10 users, 3 rounds, every user trains each round
    python benchmarks/trust.py --users 6 --rounds 2 --out /tmp/trust.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import prepare_base  # noqa: E402
from server.ledger import Ledger  # noqa: E402
from simulations.personalization_report import MethodRun, Scores, paired_bootstrap  # noqa: E402
from simulations.report import find_run  # noqa: E402
from simulations.run import run_simulation  # noqa: E402

DEFENCE = {"norm-bound-relative": 3.0, "norm-bound-mode": "clip", "example-weights": "uniform"}
# how hard each attack pushes (run-config attack-scale): a sign flip at the honest length slips under any
# norm bound; a scaled update and an inflated claim are the loud ones
ATTACKS = {"scale": 10.0, "sign-flip": 1.0, "inflate-examples": 100.0}
RUN_CONFIG = {"method": "fedavg", "base-dtype": "float32", "local-steps": 4, "batch-size": 4, "seq-len": 128,
              "learning-rate": 0.006, "max-eval-blocks": 8, "min-speeches": 60, "fraction-train": 1.0,
              "evaluate-every": 0, "round-timeout": 3600}


@dataclass(frozen=True)
class Case:
    """One federation of the benchmark: an attack (or none) with the defence on or off."""

    attack: str
    defended: bool

    @property
    def name(self) -> str:
        return ("clean" if self.attack == "none" else self.attack) + (", defended" if self.defended else "")

    def run_config(self, fraction: float) -> dict[str, object]:
        attack = {} if self.attack == "none" else {"attack": self.attack, "attack-fraction": fraction,
                                                   "attack-scale": ATTACKS[self.attack]}
        return {**attack, **(DEFENCE if self.defended else {})}


def cases(attacks: list[str]) -> list[Case]:
    return [Case(attack, defended) for attack in ["none", *attacks] for defended in (False, True)]


def server_actions(run: MethodRun) -> dict[str, int]:
    """Train replies accepted, clipped and rejected over the run, from its ledger."""
    with Ledger(run.ledger_url, read_only=True) as ledger:
        record = find_run(ledger, run.flower_run_id)
        trains = [r for r in ledger.client_results(record.id) if r.phase == "train"]
    return {"accepted": sum(r.status == "ok" for r in trains),
            "clipped": sum(r.status == "ok" and "update-clipped-to" in r.metrics for r in trains),
            "rejected": sum(r.status == "rejected" for r in trains)}


def markdown(rows: list[dict[str, object]], header: str) -> str:
    lines = [header, "",
             "| case | mean ppl | vs clean: mean change [95% CI] | train replies accepted | clipped | rejected |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        change = ("–" if row["change"] is None else
                  "{:+.1%} [{:+.1%}, {:+.1%}]".format(*row["change"]))
        lines.append(f"| {row['case']} | {row['mean']:.2f} | {change} | {row['accepted']} | {row['clipped']} | "
                     f"{row['rejected']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.3, help="share of nodes that attack")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / f"trust-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trust" / "poisoning.md")
    args = parser.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    if unknown := sorted(set(attacks) - set(ATTACKS)):
        parser.error(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    base = str(prepare_base("compressed")[0])
    started = time.monotonic()
    scores: dict[Case, Scores] = {}
    actions: dict[Case, dict[str, int]] = {}
    for case in cases(attacks):
        print(f"== {case.name}", flush=True)
        config = {**RUN_CONFIG, "base-model": base, "num-server-rounds": args.rounds, "seed": args.seed,
                  "min-available-nodes": args.users, "min-train-nodes": args.users,
                  "state-dir": str(args.workdir / case.name / "devices"), **case.run_config(args.fraction)}
        result = run_simulation(args.users, config, args.workdir / case.name.replace(", ", "-"), timeout=3 * 3600)
        run = MethodRun(case.name, result.ledger_url, result.flower_run_id, result.seconds, base, args.seed)
        scores[case], actions[case] = Scores.read(run), server_actions(run)
    clean = scores[Case("none", False)]
    users = sorted(clean.at(clean.last))
    rows = []
    for case, score in scores.items():
        ppl = score.at(score.last)
        change = None if case == Case("none", False) else paired_bootstrap([ppl[u] for u in users],
                                                                           [clean.at(clean.last)[u] for u in users])
        rows.append({"case": case.name, "mean": statistics.mean(ppl[u] for u in users), "change": change,
                     **actions[case]})
    header = (f"# Poisoning: FedAvg with {args.fraction:.0%} of clients attacking, without and with the defence\n\n"
              f"Command: `python benchmarks/trust.py {' '.join(argv if argv is not None else sys.argv[1:])}`  \n"
              f"Machine: {platform.node()}: {platform.processor() or platform.machine()}, "
              f"Python {platform.python_version()}, float32  \n"
              f"Wall time: {(time.monotonic() - started) / 60:.1f} min  \n"
              f"Federation: {args.users} users (all train every round), {args.rounds} rounds, seed {args.seed}; "
              f"run config `{json.dumps(RUN_CONFIG)}`  \n"
              f"Defence: `{json.dumps(DEFENCE)}`; attack scales `{json.dumps(ATTACKS)}`")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, header))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

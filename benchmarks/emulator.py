"""Train on the emulator, run on the teacher: how much of the teacher's adaptability the plug-in keeps.

Four federations with the same users, seed, rounds and budget (FedAvg, the pyproject defaults), one
per base the clients train on, then every user's held-out perplexity per *teacher* token on the
model each row runs on (all of the user's test speeches, whatever tokenizer the model has):

| row | trains on | runs on |
|---|---|---|
| reference (FlowerTune-like: LoRA on q,v of every block) | teacher | teacher |
| zero-shot | - | teacher |
| same edge adapter trained on the teacher (the plug-in's ceiling) | teacher, emulator's edge blocks | teacher |
| emulator, plug-in | emulator | teacher |
| emulator, on device | emulator | emulator |
| today's default compressed base | compressed base | compressed base |

Client round time and peak memory come from the ledger (each client's own ``seconds`` and
``peak-rss-mb`` in its train replies).

    python benchmarks/emulator.py                       # 6 users, 3 rounds (the main job's shape)
    python benchmarks/emulator.py --users 4 --rounds 2  # smaller
    python benchmarks/emulator.py --emulator compressed:my-emulator.toml --out /tmp/mine.md
"""

from __future__ import annotations

import argparse
import json
import math
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
from shared.base_files import EmulatorLayout  # noqa: E402
from shared.base_model import load_model, load_tokenizer  # noqa: E402
from shared.config import FederationConfig  # noqa: E402
from shared.data import UserData, select_users, shakespeare_users  # noqa: E402
from shared.plugin import plug_into_teacher  # noqa: E402
from shared.training import evaluate, tokenize_blocks  # noqa: E402
from simulations.report import find_run  # noqa: E402
from simulations.run import run_simulation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "emulator.md"
EVAL_SEQ_LEN, EVAL_BATCH = 128, 8


@dataclass
class Trained:
    """One federation: the base its clients trained on and what it left."""

    name: str
    base: str
    adapter: Path
    round_seconds: float  # median over clients and rounds of one client's train message
    peak_mib: float  # the largest client process peak


def teacher_with_edge_adapters(teacher: Path, layout: EmulatorLayout, folder: Path) -> Path:
    """The teacher's own files, declared an 'emulator' of itself whose adapter blocks are the emulator's edges.

    Clients then put LoRA exactly where the emulator has it, on the teacher: the plug-in's ceiling.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for file in teacher.iterdir():
        link = folder / file.name
        if not link.exists():
            link.symlink_to(file.resolve())
    total = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    EmulatorLayout(str(teacher), tuple(range(total)), tuple(layout.teacher_index(i) for i in layout.adapter_layers)
                   ).save(folder)
    return folder


def federate(name: str, base: str, run_config: dict, users: int, workdir: Path) -> Trained:
    print(f"[{time.strftime('%H:%M:%S')}] federating on {name} ({base})", flush=True)
    result = run_simulation(users, {**run_config, "base-model": base}, workdir / name)
    with Ledger(result.ledger_url, read_only=True) as ledger:
        run = find_run(ledger, result.flower_run_id)
        train = [r for r in ledger.client_results(run.id) if r.phase == "train" and r.status == "ok"]
    adapter = workdir / name / "outputs" / f"run-{result.flower_run_id}" / "global-adapter"
    print(f"[{time.strftime('%H:%M:%S')}]   done in {result.seconds / 60:.1f} min", flush=True)
    return Trained(name, base, adapter, statistics.median(r.seconds for r in train),
                   max(r.metrics["peak-rss-mb"] for r in train))


def per_user_perplexity(model_folder: str, adapter: Path | None, users: list[UserData],
                        teacher_tokens: dict[str, int]) -> dict[str, float]:
    """Each user's held-out perplexity per teacher token, on ``model_folder`` (+ ``adapter``), in bf16."""
    from peft import PeftModel

    model = load_model(model_folder, "bfloat16")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tokenizer = load_tokenizer(model_folder)
    scores = {}
    for user in users:
        result = evaluate(model, tokenize_blocks(tokenizer, user.test, EVAL_SEQ_LEN), EVAL_BATCH)
        scores[user.user_id] = math.exp(result["loss"] * result["tokens"] / teacher_tokens[user.user_id])
    return scores


def summary(scores: dict[str, float]) -> dict[str, float]:
    values = sorted(scores.values())
    worst = values[-max(1, round(len(values) / 10)):]
    return {"mean": statistics.mean(values), "median": statistics.median(values), "worst10": statistics.mean(worst)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / f"emulator-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--emulator", default="emulator", help="the emulator base spec (compressed:<recipe.toml>)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()

    teacher = Path(prepare_base("smollm2")[0])
    compressed, public_plays = prepare_base("compressed")
    emulator = Path(prepare_base(args.emulator)[0])
    layout = EmulatorLayout.load(emulator)
    assert layout is not None, f"{emulator} has no emulator layout"
    edge_teacher = teacher_with_edge_adapters(teacher, layout, args.workdir / "teacher-edges-base")

    # every federation: the same users (the default base's public plays kept out of all of them)
    run_config = {"num-server-rounds": args.rounds, "min-train-nodes": min(args.users, 2), "round-timeout": 3600,
                  "exclude-plays": ",".join(public_plays), "method": "fedavg"}
    config = FederationConfig.from_run_config(run_config)
    users = select_users(shakespeare_users(min_speeches=config.min_speeches, split=config.split,
                                           test_fraction=config.test_fraction, seed=config.seed,
                                           exclude_plays=config.excluded_plays), args.users, seed=config.seed)
    teacher_tokenizer = load_tokenizer(str(teacher))
    teacher_tokens = {u.user_id: tokenize_blocks(teacher_tokenizer, u.test, EVAL_SEQ_LEN).num_tokens for u in users}

    trained = {name: federate(name, base, run_config, args.users, args.workdir) for name, base in (
        ("reference", str(teacher)), ("teacher-edges", str(edge_teacher)), ("emulator", str(emulator)),
        ("compressed", str(compressed)))}
    plugged = plug_into_teacher(trained["emulator"].adapter, args.workdir / "plugged", layout, str(teacher))

    print(f"[{time.strftime('%H:%M:%S')}] scoring every user on every model", flush=True)
    rows = [  # (row, trains on, runs on, scores, federation whose client cost it pays)
        ("reference: LoRA q,v on every block, FedAvg", "teacher", "teacher",
         per_user_perplexity(str(teacher), trained["reference"].adapter, users, teacher_tokens), "reference"),
        ("zero-shot", "-", "teacher", per_user_perplexity(str(teacher), None, users, teacher_tokens), None),
        ("same edge adapter trained on the teacher", "teacher (edge blocks)", "teacher",
         per_user_perplexity(str(teacher), trained["teacher-edges"].adapter, users, teacher_tokens), "teacher-edges"),
        ("emulator, plug-in", "emulator", "teacher",
         per_user_perplexity(str(teacher), plugged, users, teacher_tokens), "emulator"),
        ("emulator, on device", "emulator", "emulator",
         per_user_perplexity(str(emulator), trained["emulator"].adapter, users, teacher_tokens), "emulator"),
        ("today's default compressed base", "compressed base", "compressed base",
         per_user_perplexity(str(compressed), trained["compressed"].adapter, users, teacher_tokens), "compressed"),
    ]
    write(args, rows, trained, users, time.monotonic() - started)
    return 0


def write(args: argparse.Namespace, rows: list, trained: dict[str, Trained], users: list[UserData],
          seconds: float) -> None:
    summaries = {row[0]: summary(row[3]) for row in rows}
    zero = summaries["zero-shot"]["mean"]
    ceiling = zero - summaries["same edge adapter trained on the teacher"]["mean"]
    plug_gain = zero - summaries["emulator, plug-in"]["mean"]
    reference = trained["reference"]
    lines = [
        "# Emulator base: train on the emulator, run on the teacher",
        "",
        f"Command: `python benchmarks/emulator.py --users {args.users} --rounds {args.rounds} "
        f"--emulator {args.emulator}` "
        f"({seconds / 60:.0f} min). Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}.",
        f"{len(users)} users ({', '.join(u.user_id for u in users)}), {args.rounds} rounds of FedAvg with the "
        "pyproject defaults, seed 0. Held-out perplexity per teacher token on all of each user's test speeches, "
        "bf16.",
        "",
        "| row | trains on | runs on | mean | median | worst 10% | client round (s) | vs reference | "
        "client peak (MiB) | vs reference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, trains_on, runs_on, _, federation in rows:
        s = summaries[name]
        cost = ["-"] * 4
        if federation is not None:
            t = trained[federation]
            cost = [f"{t.round_seconds:.1f}", f"{t.round_seconds / reference.round_seconds:.2f}x",
                    f"{t.peak_mib:,.0f}", f"{t.peak_mib / reference.peak_mib:.2f}x"]
        lines.append(f"| {name} | {trains_on} | {runs_on} | {s['mean']:.1f} | {s['median']:.1f} | "
                     f"{s['worst10']:.1f} | " + " | ".join(cost) + " |")
    lines += [
        "",
        f"Plug-in captures **{plug_gain / ceiling:.0%}** of the mean perplexity gain of the same edge adapter "
        f"trained on the teacher ({zero:.1f} -> {summaries['emulator, plug-in']['mean']:.1f}, against "
        f"{zero:.1f} -> {summaries['same edge adapter trained on the teacher']['mean']:.1f}); plug-in mean is "
        f"{summaries['emulator, plug-in']['mean'] / summaries[rows[0][0]]['mean'] - 1:+.1%} against the reference.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({
        "users": [u.user_id for u in users], "rounds": args.rounds,
        "rows": {name: {"trains_on": t, "runs_on": r, "per_user": scores, **summaries[name]}
                 for name, t, r, scores, _ in rows},
        "federations": {k: {"base": v.base, "round_seconds": v.round_seconds, "peak_mib": v.peak_mib}
                        for k, v in trained.items()},
    }, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

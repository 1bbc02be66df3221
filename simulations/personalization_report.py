"""The per-user comparison report of personalization methods (markdown + PNG plots), from the ledgers."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from server.ledger import Ledger  # noqa: E402
from simulations.report import find_run  # noqa: E402


@dataclass(frozen=True)
class MethodRun:
    """Where one method's run is recorded."""

    method: str
    ledger_url: str
    flower_run_id: str
    seconds: float
    base: str


@dataclass
class MethodResults:
    """Per-user held-out perplexity of one method, per round and at the end, read from its ledger."""

    run: MethodRun
    final: dict[str, float]  # user -> perplexity of the user's model after the last round
    base: dict[str, float]  # user -> perplexity of the base alone
    domains: dict[str, str]  # user -> domain
    curve: dict[int, float]  # round -> mean per-user perplexity
    round_seconds: float
    peak_rss_mb: float

    @classmethod
    def read(cls, run: MethodRun) -> "MethodResults":
        with Ledger(run.ledger_url, read_only=True) as ledger:
            record = find_run(ledger, run.flower_run_id)
            rounds = ledger.rounds(record.id)
            results = [r for r in ledger.client_results(record.id) if r.status == "ok"]
        evaluations = [r for r in results if r.phase == "evaluate"]
        last = max(r.round_number for r in evaluations)
        final = {r.user_id: r.metrics["eval-perplexity"] for r in evaluations if r.round_number == last}
        base = {r.user_id: r.metrics["base-perplexity"] for r in evaluations if r.round_number == last}
        domains = {r.user_id: r.domain for r in evaluations}
        curve = {n: statistics.mean(r.metrics["eval-perplexity"] for r in evaluations if r.round_number == n)
                 for n in sorted({r.round_number for r in evaluations})}
        durations = [(r.finished_at - r.started_at).total_seconds() for r in rounds if r.finished_at]
        rss = [r.metrics.get("peak-rss-mb") or 0.0 for r in results if r.phase == "train"]
        return cls(run, final, base, domains, curve, statistics.mean(durations) if durations else float("nan"),
                   max(rss, default=float("nan")))

    @property
    def users(self) -> list[str]:
        return sorted(self.final)

    def mean(self, users: list[str] | None = None) -> float:
        return statistics.mean(self.final[u] for u in (users or self.users))

    def worst_decile(self) -> float:
        values = sorted(self.final.values(), reverse=True)
        return statistics.mean(values[: max(1, len(values) // 10)])

    def share_better_than(self, other: "MethodResults") -> float:
        common = [u for u in self.users if u in other.final]
        return sum(self.final[u] < other.final[u] for u in common) / len(common)


def summary_rows(results: dict[str, MethodResults]) -> list[dict[str, object]]:
    fedavg, local = results.get("fedavg"), results.get("local")
    rows = []
    for name, r in results.items():
        row: dict[str, object] = {"method": name, "mean": r.mean(), "median": statistics.median(r.final.values()),
                                  "worst10": r.worst_decile(), "round_s": r.round_seconds}
        for label, other in (("fedavg", fedavg), ("local", local)):
            if other is not None and other is not r:
                row[f"vs_{label}"] = r.mean() / other.mean() - 1
                row[f"better_{label}"] = r.share_better_than(other)
        rows.append(row)
    return rows


def _pct(value: object) -> str:
    return f"{value:+.1%}" if isinstance(value, float) else "–"


def _share(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, float) else "–"


def summary_markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| method | mean ppl | median ppl | worst 10% ppl | mean vs fedavg | users better than fedavg | "
             "mean vs local | users better than local | s / round |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['mean']:.1f} | {row['median']:.1f} | {row['worst10']:.1f} | "
                     f"{_pct(row.get('vs_fedavg'))} | {_share(row.get('better_fedavg'))} | {_pct(row.get('vs_local'))} | "
                     f"{_share(row.get('better_local'))} | {row['round_s']:.0f} |")
    return "\n".join(lines)


def domain_markdown(results: dict[str, MethodResults]) -> str:
    any_result = next(iter(results.values()))
    domains = sorted(set(any_result.domains.values()))
    lines = ["| method | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for name, r in results.items():
        cells = [r.mean([u for u in r.users if r.domains.get(u) == d]) if any(r.domains.get(u) == d for u in r.users)
                 else float("nan") for d in domains]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def plot_curves(results: dict[str, MethodResults], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, r in results.items():
        axis.plot(list(r.curve), list(r.curve.values()), marker="o", label=name)
    axis.set_xlabel("round")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("mean per-user held-out perplexity")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_user_deltas(results: dict[str, MethodResults], path: Path) -> None:
    fedavg = results["fedavg"]
    users = fedavg.users
    others = [name for name in results if name != "fedavg"]
    figure, axis = plt.subplots(figsize=(7, 3.8), dpi=100)
    width = 0.8 / max(len(others), 1)
    for i, name in enumerate(others):
        deltas = [100 * (results[name].final[u] / fedavg.final[u] - 1) if u in results[name].final else 0 for u in users]
        axis.bar([x + i * width for x in range(len(users))], deltas, width=width, label=name)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(users))], [u.split("/")[-1][:12] for u in users],
                    rotation=60, fontsize=6)
    axis.set_ylabel("held-out perplexity vs fedavg (%)")
    axis.legend(fontsize=6, ncol=3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def reference_markdown(reference: MethodResults, results: dict[str, MethodResults]) -> str:
    users = reference.users
    lines = [f"The uncompressed teacher with `{reference.run.method}` (the FlowerTune recipe as it would run here) on "
             f"{len(users)} of the users ({', '.join(users)}), against the same users under each method on the shared "
             "base:", "", "| setting | base | mean ppl on these users | s / round | client peak RSS (MB) |",
             "|---|---|---:|---:|---:|",
             f"| teacher + {reference.run.method} | `{Path(reference.run.base).name}` | {reference.mean():.1f} | "
             f"{reference.round_seconds:.0f} | {reference.peak_rss_mb:.0f} |"]
    for name, r in results.items():
        common = [u for u in users if u in r.final]
        if common:
            lines.append(f"| {name} | `{Path(r.run.base).name}` | {r.mean(common):.1f} | {r.round_seconds:.0f} | "
                         f"{r.peak_rss_mb:.0f} |")
    lines.append("")
    lines.append("Round times differ in user count (the reference has fewer users per round); compare per-user "
                 "perplexity on the same users and the client peak memory.")
    return "\n".join(lines)


def write_personalization_report(runs: list[MethodRun], reference: MethodRun | None, folder: Path, *, command: str,
                                 machine: str, experiment: dict, wall_seconds: float) -> Path:
    """Write report.md, results.json, curves.png and user_deltas.png into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {run.method: MethodResults.read(run) for run in runs}
    rows = summary_rows(results)
    plot_curves(results, folder / "curves.png")
    parts = [
        "# Personalization methods on the Shakespeare federation", "",
        f"Command: `{command}`  ", f"Machine: {machine}  ", f"Wall time: {wall_seconds / 60:.1f} min  ",
        f"Base: `{runs[0].base}`  ",
        f"Users: {experiment['users']} (Shakespeare characters, spread over genres), rounds: {experiment['rounds']}, "
        f"run config: `{json.dumps(experiment['run_config'])}`", "",
        "Held-out perplexity of each user's model under each method, after the last round (lower is better).", "",
        summary_markdown(rows), "",
        "## Per domain (mean per-user perplexity)", "", domain_markdown(results), "",
        "## Round by round", "", "![mean per-user perplexity per round](curves.png)", "",
    ]
    if "fedavg" in results:
        plot_user_deltas(results, folder / "user_deltas.png")
        parts += ["## Per user, against fedavg", "", "![per-user change against fedavg](user_deltas.png)", ""]
    if reference is not None:
        parts += ["## Reference: the uncompressed teacher", "", reference_markdown(MethodResults.read(reference), results), ""]
    (folder / "report.md").write_text("\n".join(parts))
    (folder / "results.json").write_text(json.dumps({"summary": rows, "per_user": {n: r.final for n, r in results.items()},
                                                     "base": next(iter(results.values())).base}, indent=1))
    return folder / "report.md"

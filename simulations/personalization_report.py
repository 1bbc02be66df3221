"""The per-user comparison report of personalization methods (markdown, JSON, PNG plots), from the ledgers.

Every number comes from the runs' round ledgers. A user is qualified by the seed of its run
(``seed0/macbeth/MACBETH``), so pooling seeds counts the same character drawn by two seeds twice.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from server.ledger import ClientResultRecord, Ledger, RoundRecord, RunRecord  # noqa: E402
from shared.methods import METHODS, method, without_retrieval  # noqa: E402
from simulations.report import find_run  # noqa: E402

BASELINES = ("fedavg", "local")
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
POOLED = "pooled"


class ReportError(ValueError):
    """The ledgers do not hold what the report needs (a round not evaluated, no users in common)."""


@dataclass(frozen=True)
class MethodRun:
    """Where one method's run under one seed is recorded."""

    method: str
    ledger_url: str
    flower_run_id: str
    seconds: float
    base: str
    seed: int = 0
    split: str = "random"


@dataclass(frozen=True)
class TunePoint:
    """One grid point of the tune stage: its run-config values and its mean per-user validation perplexity."""

    method: str
    values: dict[str, object]
    score: float
    chosen: bool


# ---------------------------------------------------------------- statistics (pure)


def relative_changes(method: dict[str, float], baseline: dict[str, float]) -> np.ndarray:
    """ppl_method / ppl_baseline - 1 per user both scored, in sorted user order."""
    users = sorted(set(method) & set(baseline))
    if not users:
        raise ReportError("the method and its baseline have no user in common")
    return np.array([method[u] / baseline[u] - 1 for u in users])


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high) of the per-user relative change a/b - 1, with a 95% percentile interval.

    Users are resampled with replacement, each draw keeping a user's pair together, so the interval
    reflects how much the mean depends on which users happened to be drawn.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty 1-D arrays, got shapes {a.shape} and {b.shape}")
    change = a / b - 1
    draws = np.random.default_rng(seed).integers(0, len(change), size=(resamples, len(change)))
    low, high = np.percentile(change[draws].mean(axis=1), [2.5, 97.5])
    return float(change.mean()), float(low), float(high)


def worst_share(values: Sequence[float], share: float = 0.1) -> float:
    """The mean of the worst (highest) ceil(share x n) values: the users a method serves worst."""
    if not len(values):
        raise ValueError("worst_share of no values")
    count = math.ceil(share * len(values))
    return float(statistics.mean(sorted(values, reverse=True)[:count]))


# ---------------------------------------------------------------- reading the ledgers


@dataclass(frozen=True)
class Compute:
    """Client cost per message, as the clients reported it; lists so seeds pool by concatenation."""

    train_steps: list[float]  # shared + personal optimizer steps per train message
    eval_steps: list[float]  # steps at evaluation (fedavg-ft tunes the global adapter there)
    train_seconds: list[float]
    eval_seconds: list[float]
    block_tokens: int  # batch-size x seq-len: the block tokens one step trains on
    round_seconds: list[float]  # server-side round durations
    peak_rss_mb: float
    personal_reported: bool = False  # some reply carried ``personal-steps``

    @classmethod
    def read(cls, record: RunRecord, rounds: Sequence[RoundRecord], results: Sequence[ClientResultRecord]) -> "Compute":
        """From a run's accepted client results and its rounds."""
        trains = [r for r in results if r.phase == "train"]
        evaluations = [r for r in results if r.phase == "evaluate"]
        return cls([_steps(r.metrics) for r in trains], [_steps(r.metrics) for r in evaluations],
                   [r.metrics["seconds"] for r in trains if "seconds" in r.metrics],
                   [r.metrics["seconds"] for r in evaluations if "seconds" in r.metrics],
                   int(record.config["batch-size"]) * int(record.config["seq-len"]),
                   [(r.finished_at - r.started_at).total_seconds() for r in rounds if r.finished_at],
                   max((r.metrics.get("peak-rss-mb") or 0.0 for r in trains), default=float("nan")),
                   any("personal-steps" in r.metrics for r in results))

    @staticmethod
    def pool(parts: Sequence["Compute"]) -> "Compute":
        return Compute(*(sum((getattr(p, name) for p in parts), []) for name in
                         ("train_steps", "eval_steps", "train_seconds", "eval_seconds")),
                       parts[0].block_tokens, sum((p.round_seconds for p in parts), []),
                       max(p.peak_rss_mb for p in parts), any(p.personal_reported for p in parts))

    def row(self) -> dict[str, float]:
        steps = _mean(self.train_steps)
        return {"train_steps": steps, "train_tokens": steps * self.block_tokens, "train_s": _mean(self.train_seconds),
                "eval_steps": _mean(self.eval_steps), "eval_s": _mean(self.eval_seconds),
                "round_s": _mean(self.round_seconds), "peak_rss_mb": self.peak_rss_mb}


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def _steps(metrics: dict[str, float]) -> float:
    return float(metrics.get("train-steps", 0.0)) + float(metrics.get("personal-steps", 0.0))


@dataclass
class Scores:
    """Per-user perplexity of one method at every evaluated round, over one seed's users or pooled seeds."""

    rounds: dict[int, dict[str, float]]  # round -> qualified user -> perplexity of the user's model
    base: dict[str, float]  # qualified user -> perplexity of the base alone
    domains: dict[str, str]
    compute: Compute

    @classmethod
    def read(cls, run: MethodRun, metric: str = "eval-perplexity") -> "Scores":
        """The run's scores of the user's model (``metric``: ``model-perplexity`` is a retrieval run's without its cache)."""
        with Ledger(run.ledger_url, read_only=True) as ledger:
            record = find_run(ledger, run.flower_run_id)
            round_records = ledger.rounds(record.id)
            results = [r for r in ledger.client_results(record.id) if r.status == "ok"]
        evaluations = [r for r in results if r.phase == "evaluate"]
        if not evaluations:
            raise ReportError(f"{run.method} (seed {run.seed}): the ledger holds no evaluation")
        user = {r.user_id: f"seed{run.seed}/{r.user_id}" for r in evaluations}
        rounds: dict[int, dict[str, float]] = {}
        for r in sorted(evaluations, key=lambda r: r.round_number):
            rounds.setdefault(r.round_number, {})[user[r.user_id]] = r.metrics[metric]
        last = max(rounds)
        base = {user[r.user_id]: r.metrics["base-perplexity"] for r in evaluations if r.round_number == last}
        return cls(rounds, base, {user[r.user_id]: r.domain or "" for r in evaluations},
                   Compute.read(record, round_records, results))

    @classmethod
    def pool(cls, parts: Sequence["Scores"]) -> "Scores":
        common = set.intersection(*(set(p.rounds) for p in parts))
        return cls({n: {u: v for p in parts for u, v in p.rounds[n].items()} for n in sorted(common)},
                   {u: v for p in parts for u, v in p.base.items()}, {u: v for p in parts for u, v in p.domains.items()},
                   Compute.pool([p.compute for p in parts]))

    @property
    def last(self) -> int:
        return max(self.rounds)

    def at(self, round_number: int) -> dict[str, float]:
        if round_number not in self.rounds:
            raise ReportError(f"round {round_number} was not evaluated (evaluated: {sorted(self.rounds)}); "
                              "set run-config evaluate-every = 1")
        return self.rounds[round_number]

    def curve(self) -> dict[int, float]:
        return {n: statistics.mean(users.values()) for n, users in self.rounds.items()}


# ---------------------------------------------------------------- tables


def summary_rows(scores: dict[str, Scores], budgets: Sequence[int]) -> list[dict[str, object]]:
    """Per method and budget round: per-user perplexity, and the paired change against each baseline."""
    rows = []
    for round_number in budgets:
        for name, s in scores.items():
            ppl = s.at(round_number)
            row: dict[str, object] = {"method": name, "round": round_number, "users": len(ppl),
                                      "mean": statistics.mean(ppl.values()), "median": statistics.median(ppl.values()),
                                      "worst10": worst_share(list(ppl.values()))}
            for baseline in BASELINES:
                if baseline in scores and baseline != name:
                    row.update(_against(ppl, scores[baseline].at(round_number), baseline))
            rows.append(row)
    return rows


def _against(ppl: dict[str, float], baseline: dict[str, float], label: str) -> dict[str, object]:
    users = sorted(set(ppl) & set(baseline))
    mean, low, high = paired_bootstrap([ppl[u] for u in users], [baseline[u] for u in users])
    change = relative_changes(ppl, baseline)
    return {f"vs_{label}": mean, f"vs_{label}_low": low, f"vs_{label}_high": high,
            f"better_{label}": float((change < 0).mean()), f"worst10_vs_{label}": worst_share(list(change))}


def _pct(value: object) -> str:
    return f"{value:+.1%}" if isinstance(value, float) else "–"


def _share(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, float) else "–"


def _ci(row: dict[str, object], label: str) -> str:
    if f"vs_{label}" not in row:
        return "–"
    return f"{_pct(row[f'vs_{label}'])} [{_pct(row[f'vs_{label}_low'])}, {_pct(row[f'vs_{label}_high'])}]"


def perplexity_markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| method | round | users | mean ppl | median ppl | worst 10% ppl |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['round']} | {row['users']} | {row['mean']:.1f} | {row['median']:.1f} | "
                     f"{row['worst10']:.1f} |")
    return "\n".join(lines)


def change_markdown(rows: list[dict[str, object]]) -> str:
    header = ["method", "round"]
    for label in BASELINES:
        header += [f"vs {label}: mean change [95% CI]", f"users better than {label}", f"worst 10% change vs {label}"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [str(row["method"]), str(row["round"])]
        for label in BASELINES:
            cells += [_ci(row, label), _share(row.get(f"better_{label}")), _pct(row.get(f"worst10_vs_{label}"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def domain_markdown(scores: dict[str, Scores]) -> str:
    """Mean per-user perplexity per domain at the last round, with the mean per-user change against fedavg."""
    any_scores = next(iter(scores.values()))
    domains = sorted(set(any_scores.domains.values()))
    fedavg = scores["fedavg"].at(any_scores.last) if "fedavg" in scores else None
    lines = ["| method | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for name, s in scores.items():
        final = s.at(s.last)
        cells = []
        for domain in domains:
            users = {u: v for u, v in final.items() if s.domains.get(u) == domain}
            cell = f"{statistics.mean(users.values()):.1f}" if users else "–"
            if users and fedavg is not None and name != "fedavg":
                cell += f" ({_pct(float(relative_changes(users, fedavg).mean()))})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _personal_uncounted(name: str, compute: Compute) -> bool:
    """A method that trains a personal adapter beyond its train-steps, whose clients did not report those steps."""
    known = METHODS.get(name)
    trains_more = known is not None and ((known.trains_personal and not known.personal_steps_from_local)
                                         or known.tunes_at_evaluation)
    return trains_more and not compute.personal_reported


def compute_markdown(scores: dict[str, Scores]) -> str:
    lines = ["| method | train steps / client round | block tokens trained / client round | s / train message | "
             "steps / evaluation | s / evaluate message | s / round | client peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in scores.items():
        c = s.compute.row()
        mark = "*" if _personal_uncounted(name, s.compute) else ""
        lines.append(f"| {name}{mark} | {c['train_steps']:.1f} | {c['train_tokens']:.0f} | {c['train_s']:.1f} | "
                     f"{c['eval_steps']:.1f} | {c['eval_s']:.1f} | {c['round_s']:.0f} | {c['peak_rss_mb']:.0f} |")
    if any(_personal_uncounted(name, s.compute) for name, s in scores.items()):
        lines += ["", "\\* its clients did not report `personal-steps`: the steps count only the shared adapter's; "
                  "the seconds include the personal training."]
    return "\n".join(lines)


def tuning_markdown(points: Sequence[TunePoint], users: int, rounds: int) -> str:
    lines = [f"Each grid point ran on the first seed's first {users} users, rounds: {rounds}, with `score-split = "
             "\"validation\"` (trained on part of each user's training speeches, scored on the rest; the test "
             "speeches never read). Score: mean per-user validation perplexity after the last round.", "",
             "| method | values | validation ppl | chosen |", "|---|---|---:|:---:|"]
    for point in points:
        values = ", ".join(f"`{k} = {v}`" for k, v in point.values.items())
        lines.append(f"| {point.method} | {values} | {point.score:.2f} | {'✔' if point.chosen else ''} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _panels(count: int, width: float = 5.0, height: float = 3.4):
    figure, axes = plt.subplots(1, count, figsize=(width * count, height), dpi=100, squeeze=False)
    return figure, list(axes[0])


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_curves(by_seed: dict[str, dict[str, Scores]], path: Path) -> None:
    figure, axes = _panels(len(by_seed))
    for axis, (scope, scores) in zip(axes, by_seed.items()):
        for name, s in scores.items():
            curve = s.curve()
            axis.plot(list(curve), list(curve.values()), marker="o", label=name)
        axis.set_title(scope, fontsize=9)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean per-user held-out perplexity")
    axes[0].legend(fontsize=7)
    _save(figure, path)


def plot_user_deltas(by_seed: dict[str, dict[str, Scores]], path: Path) -> None:
    figure, axes = _panels(len(by_seed), width=6.0, height=3.8)
    for axis, (scope, scores) in zip(axes, by_seed.items()):
        fedavg = scores["fedavg"].at(scores["fedavg"].last)
        users, others = sorted(fedavg), [name for name in scores if name != "fedavg"]
        width = 0.8 / max(len(others), 1)
        for i, name in enumerate(others):
            final = scores[name].at(scores[name].last)
            deltas = [100 * (final[u] / fedavg[u] - 1) if u in final else 0 for u in users]
            axis.bar([x + i * width for x in range(len(users))], deltas, width=width, label=name)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks([x + 0.4 - width / 2 for x in range(len(users))], [u.split("/")[-1][:12] for u in users],
                        rotation=60, fontsize=6)
        axis.set_title(scope, fontsize=9)
    axes[0].set_ylabel("held-out perplexity vs fedavg (%)")
    axes[0].legend(fontsize=6, ncol=3)
    _save(figure, path)


def plot_forest(rows_by_scope: dict[str, list[dict[str, object]]], last: int, path: Path) -> None:
    """Per scope, each method's mean per-user change against fedavg after the last round, with its 95% CI."""
    shown_by_scope = {scope: [r for r in rows if r["round"] == last and "vs_fedavg" in r]
                      for scope, rows in rows_by_scope.items()}
    count = max(len(shown) for shown in shown_by_scope.values())
    figure, axes = _panels(len(rows_by_scope), width=4.0, height=1.3 + 0.35 * count)
    for axis, (scope, shown) in zip(axes, shown_by_scope.items()):
        y = list(range(len(shown)))[::-1]
        means = [100 * float(r["vs_fedavg"]) for r in shown]
        errors = [[m - 100 * float(r["vs_fedavg_low"]) for m, r in zip(means, shown)],
                  [100 * float(r["vs_fedavg_high"]) - m for m, r in zip(means, shown)]]
        axis.errorbar(means, y, xerr=errors, fmt="o", capsize=3)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(y, [str(r["method"]) for r in shown], fontsize=7)
        axis.set_ylim(-0.6, count - 0.4)
        axis.set_title(scope, fontsize=9)
        axis.set_xlabel("perplexity vs fedavg (%), 95% CI")
        axis.grid(alpha=0.3, axis="x")
    _save(figure, path)


# ---------------------------------------------------------------- the reference row


def reference_markdown(reference: Scores, method: str, base: str, scores: dict[str, Scores]) -> str:
    users = sorted(reference.at(reference.last))
    lines = [f"The uncompressed teacher with `{method}` (the FlowerTune recipe as it would run here) on {len(users)} of "
             f"the first seed's users ({', '.join(users)}), against the same users under each method on the shared "
             "base:", "", "| setting | base | mean ppl on these users | s / round | client peak RSS (MB) |",
             "|---|---|---:|---:|---:|",
             _reference_row(f"teacher + {method}", base, reference, users)]
    for name, s in scores.items():
        if set(users) & set(s.at(s.last)):
            lines.append(_reference_row(name, "shared", s, users))
    lines += ["", "Round times differ in user count (the reference has fewer users per round); compare per-user "
              "perplexity on the same users and the client peak memory."]
    return "\n".join(lines)


def _reference_row(label: str, base: str, s: Scores, users: list[str]) -> str:
    final = s.at(s.last)
    common = [u for u in users if u in final]
    c = s.compute.row()
    return (f"| {label} | `{base}` | {statistics.mean(final[u] for u in common):.1f} | {c['round_s']:.0f} | "
            f"{c['peak_rss_mb']:.0f} |")


# ---------------------------------------------------------------- the report


def _scope(run: MethodRun) -> str:
    return f"seed {run.seed}"


def read_scopes(runs: Sequence[MethodRun]) -> dict[str, dict[str, Scores]]:
    """{"seed N": {method: Scores}} in run order, then "pooled" over every seed."""
    by_seed: dict[str, dict[str, Scores]] = {}
    for run in runs:
        scores = by_seed.setdefault(_scope(run), {})
        ablated = without_retrieval(method(run.method))
        if ablated is not None and ablated.name not in {r.method for r in runs}:
            # the same adapters scored without the cache: the ablated method's row, paired user by user
            scores[ablated.name] = Scores.read(run, metric="model-perplexity")
        scores[run.method] = Scores.read(run)
    methods = list(next(iter(by_seed.values())))
    pooled = {m: Scores.pool([scores[m] for scores in by_seed.values()]) for m in methods}
    return {**by_seed, POOLED: pooled}


def scope_section(title: str, scores: dict[str, Scores], rows: list[dict[str, object]], level: str = "##") -> list[str]:
    return [f"{level} {title}", "", "Per-user held-out perplexity (lower is better):", "", perplexity_markdown(rows), "",
            "Mean over users of ppl_method / ppl_baseline - 1, with a 95% paired bootstrap interval over users "
            f"({RESAMPLES} resamples); worst 10%: the mean change of the ceil(10%) users it hurts most:", "",
            change_markdown(rows), "", f"{level}# Per domain (mean per-user ppl after the last round; change vs fedavg)",
            "", domain_markdown(scores), "", f"{level}# Client compute", "", compute_markdown(scores), ""]


def write_personalization_report(runs: list[MethodRun], reference: MethodRun | None, folder: Path, *, command: str,
                                 machine: str, experiment: dict, wall_seconds: float,
                                 tuning: Sequence[TunePoint] = ()) -> Path:
    """Write report.md, results.json, curves.png, user_deltas.png and forest.png into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    scopes = read_scopes(runs)
    by_seed = {k: v for k, v in scopes.items() if k != POOLED}
    last = scopes[POOLED][runs[0].method].last
    budgets = sorted({*experiment.get("budgets", ()), last})
    rows = {scope: summary_rows(scores, budgets) for scope, scores in scopes.items()}
    plot_curves(by_seed, folder / "curves.png")
    parts = _header(runs, command, machine, experiment, wall_seconds)
    if tuning:
        tune = experiment["tune"]
        parts += ["## Tuning (validation speeches, never test)", "", tuning_markdown(tuning, tune["users"], tune["rounds"]), ""]
    parts += scope_section(f"All seeds pooled ({len(scopes[POOLED][runs[0].method].at(last))} users)", scopes[POOLED],
                           rows[POOLED])
    if "fedavg" in scopes[POOLED]:
        plot_forest(rows, last, folder / "forest.png")
        plot_user_deltas(by_seed, folder / "user_deltas.png")
        parts += ["## Against fedavg, per seed and pooled", "", "![change against fedavg with 95% CI](forest.png)", "",
                  "![per-user change against fedavg](user_deltas.png)", ""]
    parts += ["## Round by round", "", "![mean per-user perplexity per round](curves.png)", ""]
    for scope, scores in by_seed.items():
        split = next(r.split for r in runs if _scope(r) == scope)
        parts += scope_section(f"{scope.capitalize()} (split {split})", scores, rows[scope])
    if reference is not None:
        parts += ["## Reference: the uncompressed teacher", "",
                  reference_markdown(Scores.read(reference), reference.method, Path(reference.base).name,
                                     scopes[_scope(reference)]), ""]
    (folder / "report.md").write_text("\n".join(parts))
    (folder / "results.json").write_text(json.dumps(_results(scopes, rows, tuning, runs), indent=1))
    return folder / "report.md"


def _header(runs: Sequence[MethodRun], command: str, machine: str, experiment: dict, wall_seconds: float) -> list[str]:
    seeds = ", ".join(f"{seed} ({split})" for seed, split in zip(experiment["seeds"], experiment["splits"]))
    return ["# Personalization methods on the Shakespeare federation", "",
            f"Command: `{command}`  ", f"Machine: {machine}  ", f"Wall time: {wall_seconds / 60:.1f} min  ",
            f"Base: `{runs[0].base}`  ",
            f"Users per seed: {experiment['users']} (Shakespeare characters, spread over genres), rounds: "
            f"{experiment['rounds']}, seeds (split): {seeds}  ",
            f"Run config: `{json.dumps(experiment['run_config'])}`", "",
            "Each seed draws its own users; pooled rows count every (seed, user) pair once.", "",
            *_derived_note(runs)]


def _derived_note(runs: Sequence[MethodRun]) -> list[str]:
    """Say which rows are a retrieval run's adapters scored without the cache (``read_scopes``)."""
    run_names = {r.method for r in runs}
    pairs = sorted({(ablated.name, r.method) for r in runs
                    if (ablated := without_retrieval(method(r.method))) and ablated.name not in run_names})
    if not pairs:
        return []
    return ["Rows scored from another method's runs: " + "; ".join(
        f"`{name}` is `{source}`'s user models without the cache (the same federation and adapters: the cache "
        "changes nothing in training, so the pair differs only by the cache)" for name, source in pairs)
        + ". Their compute columns are the retrieval run's.", ""]


def _results(scopes: dict[str, dict[str, Scores]], rows: dict[str, list[dict[str, object]]],
             tuning: Sequence[TunePoint], runs: Sequence[MethodRun]) -> dict[str, object]:
    pooled = scopes[POOLED]
    last = pooled[runs[0].method].last
    per_scope = {scope: {"rows": rows[scope],
                         "per_user": {n: s.at(s.last) for n, s in scores.items()},
                         "curves": {n: s.curve() for n, s in scores.items()},
                         "compute": {n: s.compute.row() for n, s in scores.items()}}
                 for scope, scores in scopes.items()}
    return {"summary": [r for r in rows[POOLED] if r["round"] == last],
            "per_user": {n: s.at(last) for n, s in pooled.items()},
            "base": next(iter(pooled.values())).base,
            "scopes": per_scope,
            "tuning": [asdict(p) for p in tuning],
            "runs": [asdict(r) for r in runs]}

"""Tables of a finished run, read back from the round ledger (never from the run's memory)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from server.ledger import Ledger, LedgerError
from server.ledger.records import RunRecord
from shared.methods import method


@dataclass(frozen=True)
class UserRow:
    user_id: str
    domain: str
    tokens: int
    base_perplexity: float
    adapter_perplexity: float  # the user's model under the run's method
    shared_perplexity: float | None = None  # the shared adapter alone, when the user's model is more than it

    @property
    def change(self) -> float:
        """Relative change of perplexity; negative is better."""
        return self.adapter_perplexity / self.base_perplexity - 1


@dataclass(frozen=True)
class PerUserTable:
    """Held-out perplexity per user: the base alone and with the final federated adapter."""

    run: RunRecord
    rows: list[UserRow]

    @property
    def improved(self) -> int:
        return sum(row.change < 0 for row in self.rows)

    def summary(self) -> str:
        if not self.rows:
            return "no user was evaluated"
        mean_change = statistics.mean(row.change for row in self.rows)
        return (f"{self.improved} of {len(self.rows)} users improved; mean change in perplexity "
                f"{mean_change:+.1%}; mean {statistics.mean(r.base_perplexity for r in self.rows):.1f} -> "
                f"{statistics.mean(r.adapter_perplexity for r in self.rows):.1f}")

    @property
    def personalized(self) -> bool:
        """Whether the users' models are more than the shared adapter (a personalizing method)."""
        return any(row.shared_perplexity is not None for row in self.rows)

    def columns(self) -> list[str]:
        if self.personalized:
            return ["user", "domain", "tokens", "base", "shared adapter", "personal model", "change"]
        return ["user", "domain", "tokens", "base", "federated adapter", "change"]

    def cells(self, row: UserRow) -> list[str]:
        shared = [f"{row.shared_perplexity:.1f}" if row.shared_perplexity is not None else "–"] if self.personalized else []
        return [row.user_id, row.domain, str(row.tokens), f"{row.base_perplexity:.1f}", *shared,
                f"{row.adapter_perplexity:.1f}"]

    def to_rich(self) -> Table:
        table = Table(title=f"Held-out perplexity per user (run {self.run.flower_run_id})", caption=self.summary())
        for column in self.columns():
            table.add_column(column, justify="left" if column in ("user", "domain") else "right")
        for row in self.rows:
            colour = "green" if row.change < 0 else "red"
            table.add_row(*self.cells(row), f"[{colour}]{row.change:+.1%}[/]")
        return table

    def to_markdown(self) -> str:
        columns = self.columns()
        lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
        lines += ["| " + " | ".join([*self.cells(r), f"{r.change:+.1%}"]) + " |" for r in self.rows]
        return "\n".join(lines + ["", self.summary()])


def find_run(ledger: Ledger, flower_run_id: str) -> RunRecord:
    for run in ledger.runs():
        if run.flower_run_id == str(flower_run_id):
            return run
    raise LedgerError(f"no run with Flower run id {flower_run_id} in {ledger.masked_url}")


def per_user_table(ledger_url: str, flower_run_id: str) -> PerUserTable:
    """The final evaluation of every user, from the ledger."""
    with Ledger(ledger_url, read_only=True) as ledger:
        run = find_run(ledger, flower_run_id)
        rounds = ledger.rounds(run.id)
        results = ledger.client_results(run.id, rounds[-1].number) if rounds else []
    rows = [
        UserRow(r.user_id or r.node_id, r.domain or "", int(r.metrics["eval-tokens"]),
                r.metrics["base-perplexity"], r.metrics["eval-perplexity"],
                r.metrics.get("shared-perplexity") if method(run.method).adds_to_shared else None)
        for r in results if r.phase == "evaluate" and r.status == "ok"
    ]
    return PerUserTable(run, sorted(rows, key=lambda row: (row.domain, row.user_id)))


def rounds_markdown(ledger_url: str, run_id: int) -> str:
    lines = ["| round | sampled | replied | failed | train loss | held-out loss before -> after local training | "
             "adapter KiB down / up per client | seconds |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with Ledger(ledger_url, read_only=True) as ledger:
        for r in ledger.rounds(run_id):
            m = r.metrics
            seconds = (r.finished_at - r.started_at).total_seconds() if r.finished_at else float("nan")
            per_client = max(r.clients_sampled, 1)
            lines.append(f"| {r.number} | {r.clients_sampled} | {r.clients_replied} | {r.clients_failed} | "
                         f"{m.get('train-loss', float('nan')):.3f} | {m.get('eval-loss-before', float('nan')):.3f} -> "
                         f"{m.get('eval-loss', float('nan')):.3f} | {r.bytes_down / per_client / 1024:.0f} / "
                         f"{r.bytes_up / max(r.clients_replied, 1) / 1024:.0f} | {seconds:.0f} |")
    return "\n".join(lines)


def write_report(ledger_url: str, flower_run_id: str, path: Path, wall_seconds: float | None = None) -> Path:
    """A markdown report of one run: configuration, rounds and the per-user table."""
    table = per_user_table(ledger_url, flower_run_id)
    run = table.run
    keys = ("base-model", "base-dtype", "num-server-rounds", "local-steps", "batch-size", "seq-len", "learning-rate",
            "lora-r", "lora-alpha", "lora-target-modules", "min-speeches", "split", "seed")
    config = ", ".join(f"{key}={run.config.get(key)}" for key in keys if key in run.config)
    parts = [f"# fedgraft run {run.flower_run_id}", "",
             f"Status: {run.status}. Base: `{run.base_model}` (content hash `{run.base_hash[:16]}`).",
             f"Wall time: {wall_seconds / 60:.1f} min." if wall_seconds else "", "", f"Config: {config}", "",
             "## Rounds", "", rounds_markdown(ledger_url, run.id), "",
             "## Held-out perplexity per user (final evaluation)", "", table.to_markdown(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path

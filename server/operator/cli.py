"""fedgraft-ops: read the round ledger from a terminal, export from it, and serve its dashboard.

Every command takes ``--db URL`` (default: the SQLite ledger the server writes by default,
``$FEDGRAFT_HOME/ledger.db``, ``~/.fedgraft/ledger.db`` without it) and opens it read-only. A run is
named by its ledger id or by its Flower run id. Problems (no ledger, an empty one, an unknown run)
end the command with exit status 1 and one line on stderr saying what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import DBAPIError

from server.ledger import Ledger, LedgerError
from server.ledger.records import RoundRecord, RunRecord

from . import formatting as fmt
from .export import FORMATS, export_run, write_adapter
from .queries import (
    CheckpointInfo,
    checkpoints,
    default_ledger_url,
    empty_ledger_message,
    open_ledger,
    resolve_run,
    round_seconds,
    run_duration,
    run_overviews,
    user_budget,
    users_privacy,
)

app = typer.Typer(
    name="fedgraft-ops",
    help="Read fedgraft's round ledger (read-only): runs, rounds, client results, events, privacy, exports, dashboard.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DB_HELP = "Ledger URL (sqlite:///path or postgresql://...). Default: $FEDGRAFT_HOME/ledger.db (~/.fedgraft)."
Db = Annotated[str | None, typer.Option("--db", help=DB_HELP, show_default=False)]
RunRef = Annotated[str, typer.Argument(metavar="RUN", help="Ledger run id, or Flower run id.", show_default=False)]
RoundOption = Annotated[int | None, typer.Option("--round", "-r", help="Round number. Default: the last one.")]
WIDE = 220  # columns when writing to a file or pipe: whole rows, never ellipses
UNLIMITED = 10_000  # measuring width: the true minimum of a table, not capped at the terminal's


# --- plumbing -----------------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """Say what is wrong on stderr and stop with exit status 1."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(f"error: {message}", style="red"))
    raise typer.Exit(1)


@contextmanager
def reading(db: str | None) -> Iterator[Ledger]:
    """The ledger at ``db``, read-only; ledger and database errors end the command cleanly."""
    url = db or default_ledger_url()
    try:
        with open_ledger(url) as ledger:
            yield ledger
    except (LedgerError, OSError) as error:  # OSError: an output that cannot be written, or exists
        fail(str(error))
    except DBAPIError as error:
        fail(f"reading the ledger failed: {' '.join(str(error.orig).split())}")


def stdout() -> Console:
    """Standard output; written to a file or pipe, as wide as $COLUMNS, or WIDE without it."""
    console = Console(highlight=False)
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(highlight=False, width=WIDE)


def show(*renderables: Table) -> None:
    """Print tables whole: one wider than the terminal overflows it rather than losing columns."""
    console = stdout()
    for renderable in renderables:
        needed = console.measure(renderable, options=console.options.update_width(UNLIMITED)).minimum
        wide_enough = console if needed <= console.width else Console(highlight=False, width=needed)
        wide_enough.print(renderable, crop=False)  # min_width columns can outgrow the measure by a few


def table(title: str, *columns: str, numeric: tuple[str, ...] = (), min_widths: dict[str, int] | None = None) -> Table:
    """A table whose ``numeric`` columns are right-aligned and never wrapped; text wraps, never cut.

    ``min_widths`` keeps some text columns readable when the terminal is narrow.
    """
    result = Table(title=title, title_justify="left")
    for column in columns:
        if column in numeric:
            result.add_column(column, justify="right", no_wrap=True)
        else:
            result.add_column(column, overflow="fold", min_width=(min_widths or {}).get(column))
    return result


def row(*cells: object) -> list[Text]:
    """Cells as plain text: ids and messages from the ledger are never read as rich markup."""
    return [Text(fmt.MISSING if cell is None else str(cell)) for cell in cells]


# --- commands -----------------------------------------------------------------------------------


@app.command()
def runs(db: Db = None) -> None:
    """List the runs, oldest first."""
    with reading(db) as ledger:
        overviews = run_overviews(ledger)
        if not overviews:
            raise LedgerError(empty_ledger_message(ledger))
        where = ledger.masked_url
    columns = ("id", "flower run id", "method", "base", "status", "started", "duration", "rounds")
    out = table(f"Runs in {where}", *columns, numeric=("id", "flower run id", "duration", "rounds"))
    for item in overviews:
        run = item.run
        out.add_row(*row(run.id, run.flower_run_id, run.method, run.base_model, run.status,
                         fmt.timestamp(run.started_at), fmt.duration(item.duration), item.rounds))  # fmt: skip
    show(out)


@app.command("run")
def show_run(run: RunRef, db: Db = None) -> None:
    """One run: status, base model identity, rounds summary, checkpoints and config."""
    with reading(db) as ledger:
        record = resolve_run(ledger, run)
        summary = run_summary(record, ledger.rounds(record.id), checkpoints(ledger, record.id),
                              num_events=len(ledger.events(record.id)))  # fmt: skip
    show(_key_values(f"Run {record.id}", summary), _key_values("Config", dict(sorted(record.config.items()))))


def run_summary(
    run: RunRecord, rounds: list[RoundRecord], stored: list[CheckpointInfo], num_events: int
) -> dict[str, object]:
    """What ``fedgraft-ops run`` shows about a run, label by label."""
    finished = sum(r.finished_at is not None for r in rounds)
    sampled, replied = sum(r.clients_sampled for r in rounds), sum(r.clients_replied for r in rounds)
    failed = sum(r.clients_failed for r in rounds)
    down, up = sum(r.bytes_down for r in rounds), sum(r.bytes_up for r in rounds)
    last = rounds[-1].metrics if rounds else {}
    return {
        "ledger id": run.id,
        "flower run id": run.flower_run_id,
        "status": run.status,
        "method": run.method,
        "base model": run.base_model,
        "base hash (sha256)": run.base_hash,
        "started": fmt.timestamp(run.started_at),
        "finished": fmt.timestamp(run.finished_at),
        "duration": fmt.duration(run_duration(run)),
        "rounds": f"{len(rounds)} ({finished} finished)",
        "client replies": f"{replied} of {sampled} sampled, {failed} failed",
        "bytes down / up": f"{fmt.size(down)} / {fmt.size(up)}",
        "last train-loss": fmt.number(last.get("train-loss")),
        "last eval-loss": fmt.number(last.get("eval-loss")),
        "checkpoints": ", ".join(_checkpoint_label(c) for c in stored) or fmt.MISSING,
        "events": num_events,
    }


def _checkpoint_label(checkpoint: CheckpointInfo) -> str:
    return f"round {checkpoint.round_number}" + (f" ({checkpoint.domain})" if checkpoint.domain else "")


def _key_values(title: str, values: dict[str, object]) -> Table:
    out = Table(title=title, title_justify="left", show_header=False)
    out.add_column("key", style="bold")
    out.add_column("value", overflow="fold")
    for key, value in values.items():
        out.add_row(*row(key, value))
    return out


@app.command()
def rounds(run: RunRef, db: Db = None) -> None:
    """The run's rounds: losses, clients sampled / replied / failed, bytes moved, wall time."""
    with reading(db) as ledger:
        record = resolve_run(ledger, run)
        records = ledger.rounds(record.id)
    columns = ("round", "sampled", "replied", "failed", "train-loss", "eval-loss-before", "eval-loss",
               "bytes down", "bytes up", "seconds")  # fmt: skip
    out = table(f"Rounds of run {record.id} (Flower run {record.flower_run_id})", *columns, numeric=columns)
    for r in records:
        out.add_row(*row(r.number, r.clients_sampled, r.clients_replied, r.clients_failed,
                         fmt.number(r.metrics.get("train-loss")), fmt.number(r.metrics.get("eval-loss-before")),
                         fmt.number(r.metrics.get("eval-loss")), fmt.size(r.bytes_down), fmt.size(r.bytes_up),
                         fmt.seconds(round_seconds(r))))  # fmt: skip
    if not records:
        out.caption = "no rounds recorded yet"
    show(out)


@app.command()
def clients(
    run: RunRef,
    round_number: RoundOption = None,
    phase: Annotated[str | None, typer.Option(help="Only this phase: train or evaluate.")] = None,
    metrics: Annotated[
        str, typer.Option(help="Metric columns, comma-separated (any metric name; see `export` for all).")
    ] = "train-loss,eval-loss",
    db: Db = None,
) -> None:
    """Per-client results of one round: node, user, domain, phase, status, metrics, bytes, error."""
    names = [name.strip() for name in metrics.split(",") if name.strip()]
    with reading(db) as ledger:
        record = resolve_run(ledger, run)
        number = round_number if round_number is not None else _last_round(ledger, record.id)
        results = [r for r in ledger.client_results(record.id, number) if phase in (None, r.phase)]
    numeric = ("node", "examples", *names, "bytes up", "seconds")
    columns = ("node", "user", "domain", "phase", "status", *numeric[1:], "error")
    out = table(f"Client results of run {record.id}, round {number}", *columns, numeric=numeric,
                min_widths={"user": 16, "domain": 9, "phase": 5, "status": 6})  # fmt: skip
    for r in results:
        values = [fmt.number(r.metrics.get(name)) for name in names]
        out.add_row(*row(r.node_id, r.user_id, r.domain, r.phase, r.status, r.num_examples, *values,
                         fmt.size(r.bytes_up), fmt.seconds(r.seconds), r.error))  # fmt: skip
    if not results:
        out.caption = f"no client results in round {number}"
    show(out)


def _last_round(ledger: Ledger, run_id: int) -> int:
    records = ledger.rounds(run_id)
    if not records:
        raise LedgerError(f"run {run_id} has no rounds yet")
    return records[-1].number


@app.command()
def events(run: RunRef, db: Db = None) -> None:
    """The run's events (failures, rejections, resumes) in the order they were recorded."""
    with reading(db) as ledger:
        record = resolve_run(ledger, run)
        records = ledger.events(record.id)
    out = table(f"Events of run {record.id}", "time", "round", "kind", "node", "message", numeric=("round",))
    for e in records:
        out.add_row(*row(fmt.timestamp(e.created_at), e.round_number, e.kind, e.node_id, e.message))
    if not records:
        out.caption = "no events"
    show(out)


@app.command()
def privacy(run: RunRef, db: Db = None) -> None:
    """The run's differential privacy: epsilon per round (the run's) and per user (their own), against the budget."""
    with reading(db) as ledger:
        record = resolve_run(ledger, run)
        releases, users = ledger.privacy_rounds(record.id), users_privacy(ledger.privacy_charges(record.id))
    columns = ("round", "noise multiplier", "clipping norm", "sampled", "available", "sampling rate", "round epsilon",
               "run epsilon")  # fmt: skip
    setting = f": dp = {releases[0].mode}, delta {releases[0].delta:g}" if releases else ""  # the run's own
    rounds_out = table(f"Private releases of run {record.id}{setting}", *columns, numeric=columns)
    for r in releases:
        rounds_out.add_row(*row(r.round_number, fmt.number(r.noise_multiplier), fmt.number(r.clipping_norm), r.sampled,
                                r.available, fmt.number(r.sampling_rate), fmt.number(r.round_epsilon),
                                fmt.number(r.epsilon)))  # fmt: skip
    if not releases:
        rounds_out.caption = "no private release recorded (run-config dp is off, or no round was aggregated)"
    budget = user_budget(record)
    users_out = table(f"Epsilon spent per user (budget: {fmt.number(budget)})", "user", "rounds", "last round",
                      "epsilon", "budget left", numeric=("rounds", "last round", "epsilon", "budget left"))
    for user in users:
        left = None if budget is None else budget - user.epsilon
        users_out.add_row(*row(user.user_id, user.rounds, user.last_round, fmt.number(user.epsilon), fmt.number(left)))
    if not users:
        users_out.caption = "no user charged"
    show(rounds_out, users_out)


@app.command()
def export(
    run: RunRef,
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.", show_default=False)],
    format_: Annotated[
        str | None, typer.Option("--format", "-f", help="csv or json. Default: from the output's suffix.")
    ] = None,
    db: Db = None,
) -> None:
    """Export the run's rounds and client results (all metrics) as JSON or CSV."""
    chosen = (format_ or output.suffix.lstrip(".")).lower()
    if chosen not in FORMATS:
        fail(f"choose --format csv or json (the output's suffix {output.suffix!r} does not say which)")
    with reading(db) as ledger:
        record = resolve_run(ledger, run)
        num_rounds, num_results = export_run(ledger, record, chosen, output)
    stdout().print(Text(f"wrote {num_rounds} rounds and {num_results} client results of run {record.id} to {output}"))


@app.command()
def adapter(
    run: RunRef,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to write the peft adapter to.", show_default=False)
    ],
    round_number: RoundOption = None,
    domain: Annotated[str, typer.Option(help="Domain of a per-domain checkpoint; empty: the global adapter.")] = "",
    force: Annotated[bool, typer.Option(help="Replace an adapter already in the folder.")] = False,
    on_teacher: Annotated[bool, typer.Option(
        help="The run's base is an emulator: write the adapter for its teacher (blocks renamed to the teacher's).")
    ] = False,
    teacher: Annotated[str | None, typer.Option(
        help="The teacher's spec or folder to name (default: the one the emulator names); implies --on-teacher.")
    ] = None,
    db: Db = None,
) -> None:
    """Write an aggregated adapter checkpoint as a peft folder (PeftModel.from_pretrained loads it)."""
    for_teacher = on_teacher or teacher is not None
    with reading(db) as ledger:
        record = resolve_run(ledger, run)
        written = write_adapter(ledger, record, output, round_number, domain, overwrite=force,
                                for_teacher=for_teacher, teacher=teacher)
    where = f"round {written.round_number}" + (f", domain {written.domain}" if written.domain else "")
    base = (f"teacher: {written.base_model} (the run's emulator base: {record.base_model})" if for_teacher
            else f"base model: {record.base_model} (weights sha256 {record.base_hash})")
    stdout().print(Text(
        f"wrote the adapter of run {record.id}, {where} ({written.num_tensors} tensors, sha256"
        f" {fmt.short_hash(written.content_hash)}) to {written.folder}\n"
        f"{base}; load it with PeftModel.from_pretrained(base, {str(written.folder)!r})"
    ))  # fmt: skip


@app.command()
def serve(
    db: Db = None,
    host: Annotated[str, typer.Option(help="Interface to bind. Anything but loopback wants --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(envvar="FEDGRAFT_DASHBOARD_TOKEN", help="Require 'Authorization: Bearer TOKEN' or ?token=TOKEN.",
                     show_default=False),
    ] = None,  # fmt: skip
) -> None:
    """Serve the web dashboard (read-only) until interrupted."""
    from .dashboard import serve as serve_dashboard  # uvicorn and templates: only this command needs them

    url = db or default_ledger_url()
    try:
        serve_dashboard(url, host=host, port=port, token=token or None)
    except LedgerError as error:
        fail(str(error))


if __name__ == "__main__":  # python -m server.operator.cli
    app(prog_name="fedgraft-ops")

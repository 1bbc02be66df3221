"""How fast the operator's ledger queries are on a big ledger, on SQLite and PostgreSQL.

Builds a ledger holding one run of 1,000 rounds x 50 clients (50,000 client results, an event every
tenth round, a small checkpoint every round) with bulk inserts, in a temporary SQLite file and in a
PostgreSQL schema of its own (dropped afterwards). Then, on a read-only ledger as ``fedgraft-ops``
opens it, times what the CLI commands and the dashboard pages run (the same functions), and writes
the medians to ``benchmarks/results/ledger.md`` with the command and the machine.

    python benchmarks/ledger_queries.py                 # both backends, writes the results file
    python benchmarks/ledger_queries.py --no-postgres   # SQLite only
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy
from sqlalchemy import create_engine, event, insert, select, text
from starlette.testclient import TestClient

from server.ledger import Checkpoint, ClientResult, Event, Ledger, Round
from server.operator.dashboard import create_app
from server.operator.export import export_run
from server.operator.queries import checkpoints, resolve_run, run_overviews

POSTGRES_URL = os.environ.get("FEDGRAFT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RESULTS = Path(__file__).resolve().parent / "results" / "ledger.md"
SLOW_MS = 100.0  # a query slower than this would deserve an index, if an index can help it
WHY_NO_INDEX = (
    "Every read goes through an index (plans below); what takes long reads every row of the run."
    " Compare the whole-run read through `Ledger.client_results` with the same SQL fetched as raw rows:"
    " most of the time is Python building ORM objects and records (and decoding the JSON metrics),"
    " then encoding the export, none of which an index shortens. No index was added."
)
BATCH = 5_000  # rows per executemany


@dataclass(frozen=True)
class Timing:
    name: str
    what: str  # the command or page it stands for
    rows: int
    median_ms: float
    min_ms: float
    repeats: int


# --- building the ledger ------------------------------------------------------------------------


def build(ledger: Ledger, num_rounds: int, num_clients: int) -> int:
    """Fill ``ledger`` with one big completed run by bulk inserts; returns its ledger id."""
    config = {"base-model": "smollm2", "lora-r": 8, "lora-alpha": 16, "lora-dropout": 0.05,
              "lora-target-modules": "q_proj,v_proj", "num-server-rounds": num_rounds}  # fmt: skip
    run_id = ledger.start_run(uuid.uuid4().int >> 64, config, "smollm2", "ab" * 32)
    start = datetime.now(UTC) - timedelta(seconds=60 * num_rounds)
    with ledger.engine.begin() as connection:
        connection.execute(insert(Round), [_round_row(run_id, n, num_clients, start) for n in range(1, num_rounds + 1)])
        round_ids = dict(connection.execute(select(Round.number, Round.id).where(Round.run_id == run_id)).all())
        rows = (_client_row(round_ids[n], n, c) for n in range(1, num_rounds + 1) for c in range(num_clients))
        for batch in _batches(rows, BATCH):
            connection.execute(insert(ClientResult), batch)
        connection.execute(insert(Event), [
            {"run_id": run_id, "round_number": n, "created_at": start + timedelta(seconds=60 * n),
             "kind": "client-failed", "node_id": str(10**18 + n), "message": "no reply before the round timeout"}
            for n in range(10, num_rounds + 1, 10)
        ])  # fmt: skip
        data = np.zeros((8, 64), np.float32).tobytes()
        connection.execute(insert(Checkpoint), [
            {"run_id": run_id, "round_number": n, "domain": "", "content_hash": "0" * 64, "num_bytes": len(data),
             "data": data, "created_at": start + timedelta(seconds=60 * n)}
            for n in range(1, num_rounds + 1)
        ])  # fmt: skip
    ledger.finish_run(run_id, "completed")
    return run_id


def _round_row(run_id: int, number: int, num_clients: int, start: datetime) -> dict[str, Any]:
    began = start + timedelta(seconds=60 * (number - 1))
    return {
        "run_id": run_id, "number": number, "started_at": began, "finished_at": began + timedelta(seconds=55),
        "clients_sampled": num_clients, "clients_replied": num_clients - (number % 10 == 0),
        "clients_failed": int(number % 10 == 0), "bytes_down": num_clients * 73_728,
        "bytes_up": (num_clients - (number % 10 == 0)) * 73_728,
        "metrics": {"train-loss": 3.0 / number**0.3, "eval-loss-before": 3.1 / number**0.3,
                    "eval-loss": 2.9 / number**0.3, "eval-perplexity": 18.2, "eval-accuracy": 0.31},
    }  # fmt: skip


def _client_row(round_id: int, number: int, client: int) -> dict[str, Any]:
    return {
        "round_id": round_id, "node_id": str(10**18 + client), "phase": "train", "status": "ok",
        "user_id": f"play-{client % 37}/CHARACTER {client}",
        "domain": ("comedies", "tragedies", "histories")[client % 3],
        "num_examples": 100 + client, "bytes_up": 73_728, "bytes_down": 73_728, "seconds": 12.5 + client / 10,
        "error": None,
        "metrics": {"num-examples": 100 + client, "train-loss": 3.0 / number**0.3 + client / 1000,
                    "train-steps": 12, "eval-loss-before": 3.1, "eval-loss": 2.9, "eval-perplexity": 18.2,
                    "eval-accuracy": 0.31, "eval-tokens": 4096, "seconds": 12.5},
    }  # fmt: skip


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- timing -------------------------------------------------------------------------------------


def measure(name: str, what: str, action: Callable[[], int], repeats: int) -> Timing:
    """Run ``action`` once to warm up, then ``repeats`` times; ``action`` returns its row count."""
    rows = action()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        samples.append((time.perf_counter() - began) * 1000)
    return Timing(name, what, rows, statistics.median(samples), min(samples), repeats)


def time_queries(url: str, schema: str | None, run_id: int, repeats: int, middle_round: int) -> list[Timing]:
    """The operator's reads, on a read-only ledger as the CLI and the dashboard open it."""
    with Ledger(url, schema=schema, read_only=True) as ledger, tempfile.TemporaryDirectory() as folder:
        run = resolve_run(ledger, run_id)

        def run_summary() -> int:
            resolve_run(ledger, run_id)
            rounds = ledger.rounds(run_id)
            checkpoints(ledger, run_id)
            ledger.events(run_id)
            return len(rounds)

        def exported(fmt: str) -> Callable[[], int]:
            return lambda: sum(export_run(ledger, run, fmt, Path(folder) / f"run.{fmt}"))

        (whole_run_sql,) = _captured_selects(ledger, lambda: ledger.client_results(run_id))

        def whole_run_rows() -> int:
            with ledger.engine.connect() as connection:
                return len(connection.exec_driver_sql(*whole_run_sql).fetchall())

        timings = [
            measure("runs list", "`fedgraft-ops runs`", lambda: len(run_overviews(ledger)), repeats),
            measure("run summary", "`fedgraft-ops run ID`", run_summary, repeats),
            measure("run rounds", "`fedgraft-ops rounds ID`", lambda: len(ledger.rounds(run_id)), repeats),
            measure("client results of one round", "`fedgraft-ops clients ID --round N`",
                    lambda: len(ledger.client_results(run_id, middle_round)), repeats),  # fmt: skip
            measure("events", "`fedgraft-ops events ID`", lambda: len(ledger.events(run_id)), repeats),
            measure("checkpoint list", "part of `run ID`, `adapter ID`", lambda: len(checkpoints(ledger, run_id)),
                    repeats),  # fmt: skip
            measure("export JSON (rounds + client results)", "`fedgraft-ops export ID -f json`", exported("json"),
                    max(3, repeats // 2)),  # fmt: skip
            measure("export CSV (rounds + client results)", "`fedgraft-ops export ID -f csv`", exported("csv"),
                    max(3, repeats // 2)),  # fmt: skip
            measure("all client results of the run: `Ledger.client_results`", "what the exports read",
                    lambda: len(ledger.client_results(run_id)), max(3, repeats // 2)),  # fmt: skip
            measure("the same, SQL only (raw rows, no records)", "the database's share", whole_run_rows,
                    max(3, repeats // 2)),  # fmt: skip
        ]
    timings += time_pages(url, schema, run_id, repeats, middle_round)
    return timings


def time_pages(url: str, schema: str | None, run_id: int, repeats: int, middle_round: int) -> list[Timing]:
    """The dashboard's pages, rendered in-process (no network); only without a schema (SQLite)."""
    if schema is not None:
        return []  # the dashboard opens the server's ledger, which has no schema; SQLite shows its cost
    with TestClient(create_app(url)) as client:

        def page(path: str) -> Callable[[], int]:
            def get() -> int:
                response = client.get(path)
                assert response.status_code == 200, response.text[:200]
                return len(response.content)

            return get

        return [
            measure("dashboard runs page", "`GET /` (bytes of HTML)", page("/"), repeats),
            measure("dashboard run page", f"`GET /runs/ID?round={middle_round}` (bytes of HTML)",
                    page(f"/runs/{run_id}?round={middle_round}"), max(3, repeats // 2)),  # fmt: skip
        ]


def sqlite_plans(url: str, run_id: int, middle_round: int) -> dict[str, list[str]]:
    """SQLite's plan for each SELECT the main reads send, captured as the ledger sends them."""
    with Ledger(url, read_only=True) as ledger:
        reads = {
            "client results of one round": lambda: ledger.client_results(run_id, middle_round),
            "client results of the run (export)": lambda: ledger.client_results(run_id),
            "run rounds": lambda: ledger.rounds(run_id),
            "events": lambda: ledger.events(run_id),
            "round counts (runs list)": lambda: run_overviews(ledger),
            "checkpoint list": lambda: checkpoints(ledger, run_id),
        }
        plans = {}
        for name, read in reads.items():
            statements = _captured_selects(ledger, read)
            with ledger.engine.connect() as connection:
                plans[name] = [row[-1] for sql, params in statements
                               for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]  # fmt: skip
        return plans


def _captured_selects(ledger: Ledger, read: Callable[[], Any]) -> list[tuple[str, Any]]:
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "alembic_version" not in statement:
            captured.append((statement, parameters))

    event.listen(ledger.engine, "before_cursor_execute", capture)
    try:
        read()
    finally:
        event.remove(ledger.engine, "before_cursor_execute", capture)
    return captured


# --- backends -----------------------------------------------------------------------------------


@contextmanager
def sqlite_ledger() -> Iterator[tuple[str, None]]:
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'ledger.db'}", None


@contextmanager
def postgres_ledger(url: str) -> Iterator[tuple[str, str]]:
    schema = f"fedgraft_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    try:
        yield url, schema
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@dataclass(frozen=True)
class Outcome:
    build_seconds: float
    timings: list[Timing]
    plans: dict[str, list[str]]  # SQLite only


def benchmark(backend: str, place: Any, args: argparse.Namespace) -> Outcome:
    """Build the big ledger there, then time the queries (and, on SQLite, show their plans)."""
    with place as (url, schema):
        began = time.perf_counter()
        with Ledger(url, schema=schema) as ledger:
            run_id = build(ledger, args.rounds, args.clients)
        built = time.perf_counter() - began
        print(f"{backend}: built {args.rounds} rounds x {args.clients} clients in {built:.1f} s", flush=True)
        timings = time_queries(url, schema, run_id, args.repeats, middle_round=args.rounds // 2)
        for timing in timings:
            print(f"  {timing.name:42s} {timing.median_ms:9.1f} ms  ({timing.rows} rows)", flush=True)
        plans = sqlite_plans(url, run_id, args.rounds // 2) if schema is None else {}
        return Outcome(built, timings, plans)


def postgres_version(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return str(connection.scalar(text("SHOW server_version")))
    finally:
        engine.dispose()


# --- report -------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    meminfo = Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []
    total_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")), 0)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)  # fmt: skip
    return {
        "CPU": f"{cpu}, nproc {os.cpu_count()}",
        "RAM": f"{total_kib / 2**20:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "SQLAlchemy": sqlalchemy.__version__,
        "SQLite": sqlite3.sqlite_version,
        "load average at the end": " / ".join(f"{load:.1f}" for load in os.getloadavg()) + " (1 / 5 / 15 min)",
    }


def report(args: argparse.Namespace, results: dict[str, Outcome], postgres: str | None) -> str:
    info = machine() | ({"PostgreSQL": postgres} if postgres else {})
    backends = list(results)
    lines = [
        "# Ledger query benchmark",
        "",
        f"One run of {args.rounds:,} rounds x {args.clients} clients ({args.rounds * args.clients:,} client results,"
        f" {args.rounds // 10} events, {args.rounds:,} checkpoint rows), built with bulk inserts; then each query"
        f" the operator tools run, on a read-only ledger, timed as the median of {args.repeats} repetitions"
        f" (exports and the run page: {max(3, args.repeats // 2)}) after one warm-up. Written by"
        " `benchmarks/ledger_queries.py`.",
        "",
        "Command:",
        "",
        "```bash",
        "python " + " ".join(shlex.quote(part) for part in [_relative(sys.argv[0]), *sys.argv[1:]]),
        "```",
        "",
        "Machine: " + "; ".join(f"{key} {value}" for key, value in info.items()) + ".",
        "",
        "Build (bulk insert): " + ", ".join(f"{b} {results[b].build_seconds:.1f} s" for b in backends) + ".",
        "",
        "| query | stands for | rows (pages: HTML bytes) | " + " | ".join(f"{b} median ms" for b in backends) + " |",
        "|---|---|---:|" + "---:|" * len(backends),
    ]
    by_name = {b: {t.name: t for t in results[b].timings} for b in backends}
    for timing in results[backends[0]].timings:
        cells = [f"{by_name[b][timing.name].median_ms:.1f}" if timing.name in by_name[b] else "-" for b in backends]
        lines.append(f"| {timing.name} | {timing.what} | {timing.rows:,} | " + " | ".join(cells) + " |")
    slow = sorted({t.name for b in backends for t in results[b].timings if t.median_ms > SLOW_MS})
    lines += ["", f"Over {SLOW_MS:.0f} ms: " + (", ".join(slow) if slow else "none") + ".", "", WHY_NO_INDEX, ""]
    plans = results[backends[0]].plans
    if plans:
        lines += ["SQLite query plans of the reads (`EXPLAIN QUERY PLAN` of the statements the ledger sends):", ""]
        lines += [f"- {name}: " + "; ".join(f"`{step}`" for step in steps) for name, steps in plans.items()]
        lines.append("")
    return "\n".join(lines)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Markdown results file")
    args = parser.parse_args(argv)

    results = {"SQLite": benchmark("SQLite", sqlite_ledger(), args)}
    version = None
    if not args.no_postgres:
        version = postgres_version(args.postgres_url)
        results["PostgreSQL"] = benchmark("PostgreSQL", postgres_ledger(args.postgres_url), args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(args, results, version))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

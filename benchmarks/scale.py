"""What the server's own work costs per round as the federation grows: 10, 100 and 1,000 users.

Each size is one simulated federation (``simulations.run.run_simulation``: ``flwr run`` on a private
SuperLink) that samples a fixed number of clients per round (``fraction-train`` set to sampled/users
and ``min-train-nodes`` to sampled). Per size, from the round ledger and the ServerApp process:

- round wall time: the ledger's round start (configure_train) to finish (aggregate_train), median
  over rounds 2 onwards (round 1 pays the Ray actors' imports);
- server share: the round metric ``server-seconds`` (the strategy's own work: sampling, payloads,
  validation, aggregation, ledger writes; the round's final commit aside) over the round wall time;
- ledger bytes per round: the ledger file (with its WAL) after the run, over the rounds;
- server peak memory: the ServerApp process's peak RSS (VmHWM), polled while it runs;
- results per round: the train results the ledger holds for each round (every sampled client's).

    python benchmarks/scale.py                                # the issue's table: 10/10, 100/20, 1000/20
    python benchmarks/scale.py --sizes 10:10 --rounds 2       # one size
    python benchmarks/scale.py --base path/to/hf-folder --sizes 4:2 --rounds 2 --no-write

``--base`` defaults to ``smollm2`` (the teacher): the compressed base keeps its twelve public plays
out of the federation, which leaves 768 users at most (``python -m shared.data users``), too few for
the 1,000-user row. ``min-speeches`` is the highest threshold that gives each size enough users.
The final evaluation after the last round visits every user (1,000 at the largest size); it is not
part of any round's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import prepare_base  # noqa: E402
from server.ledger import Ledger  # noqa: E402
from server.strategy import SERVER_SECONDS  # noqa: E402
from shared.data import users_per_threshold  # noqa: E402
from simulations.run import run_simulation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scale.md"
SIZES = ((10, 10), (100, 20), (1000, 20))  # (users in the federation, sampled per round)
THRESHOLDS = (60, 40, 20, 10, 5, 3, 2)  # min-speeches tried, highest first


@dataclass
class ScaleRow:
    users: int
    sampled: int
    rounds: int
    min_speeches: int
    round_seconds: float
    server_seconds: float
    server_share: float
    ledger_bytes_per_round: int
    server_peak_mib: float
    results_per_round: list[int]
    wall_seconds: float


def min_speeches_for(users: int, exclude_plays: list[str]) -> int:
    """The highest threshold that yields at least ``users`` users; ValueError if none does."""
    counts = users_per_threshold(THRESHOLDS, exclude_plays=exclude_plays)
    enough = [threshold for threshold, count in counts.items() if count >= users]
    if not enough:
        raise ValueError(f"{users} users is more than the corpus has without plays {exclude_plays} "
                         f"({counts[THRESHOLDS[-1]]} at min-speeches 2); use a base that excludes fewer plays")
    return max(enough)


SERVER_PROCESSES = ("flwr-simulation", "flwr-serverapp")


class ServerMemory:
    """The peak RSS of the process running the ServerApp under this FLWR_HOME, polled in a thread.

    In a simulation that is ``flwr-simulation`` (the ServerApp and Ray's driver; clients run in Ray
    actors, other processes); in a deployment, ``flwr-serverapp``.
    """

    def __init__(self, flwr_home: Path, interval: float = 0.5) -> None:
        self.flwr_home, self.interval = str(flwr_home), interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ServerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            for process in psutil.process_iter(["cmdline"]):
                try:
                    if any(name in part for part in process.info["cmdline"] or () for name in SERVER_PROCESSES) \
                            and process.environ().get("FLWR_HOME") == self.flwr_home:
                        self.peak_mib = max(self.peak_mib, _peak_mib(process.pid))
                except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, FileNotFoundError):
                    continue


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(users: int, sampled: int, rounds: int, base: str, workdir: Path, min_speeches: int,
            extra: dict[str, object] | None = None, excluded: list[str] | None = None,
            cpus_per_client: int | None = None) -> ScaleRow:
    """One federation of ``users`` users sampling ``sampled`` per round for ``rounds`` rounds."""
    run_config = {"base-model": base, "exclude-plays": ",".join(excluded or []), "num-server-rounds": rounds,
                  "min-speeches": min_speeches, "fraction-train": sampled / users, "min-train-nodes": sampled,
                  "node-wait-seconds": 600, "round-timeout": 3600, "state-dir": str(workdir / "devices"),
                  **(extra or {})}
    workdir.mkdir(parents=True, exist_ok=True)
    with ServerMemory(workdir.resolve() / "flwr-home") as memory:
        cpus = cpus_per_client or os.cpu_count() or 1
        result = run_simulation(users, run_config, workdir, cpus_per_client=cpus, timeout=24 * 3600)
    return round_row(result.ledger_url, result.flower_run_id, users, sampled, min_speeches, memory.peak_mib,
                     result.seconds)


def round_row(ledger_url: str, flower_run_id: str, users: int, sampled: int, min_speeches: int, peak_mib: float,
              wall_seconds: float) -> ScaleRow:
    """The row of one finished run, from its round ledger (a SQLite file)."""
    with Ledger(ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == flower_run_id]
        ledger_rounds = ledger.rounds(run.id)
        results = [sum(1 for c in ledger.client_results(run.id, r.number) if c.phase == "train") for r in ledger_rounds]
    timed = ledger_rounds[1:] or ledger_rounds  # round 1 pays the actors' imports
    round_seconds = statistics.median((r.finished_at - r.started_at).total_seconds() for r in timed)
    server_seconds = statistics.median(float(r.metrics[SERVER_SECONDS]) for r in timed)
    db = Path(ledger_url.removeprefix("sqlite:///"))
    ledger_bytes = sum(path.stat().st_size for path in (db, db.with_name(db.name + "-wal")) if path.exists())
    return ScaleRow(users, sampled, len(ledger_rounds), min_speeches, round_seconds, server_seconds,
                    server_seconds / round_seconds, ledger_bytes // max(len(ledger_rounds), 1), peak_mib,
                    results, wall_seconds)


def table(rows: list[ScaleRow], command: str, base: str) -> str:
    lines = [
        "# Scale: the server's share of a round at 10, 100 and 1,000 users",
        "",
        f"`{command}` on {platform.node() or 'this machine'} ({os.cpu_count()} cores), base `{base}`; "
        "medians over rounds 2 onwards.",
        "",
        "| users | sampled per round | min-speeches | rounds | round wall time (s) | server work (s) | server share "
        "| ledger bytes per round | server peak memory (MiB) | train results per round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row.users} | {row.sampled} | {row.min_speeches} | {row.rounds} | {row.round_seconds:.1f} "
                     f"| {row.server_seconds:.3f} | {row.server_share:.2%} | {row.ledger_bytes_per_round:,} "
                     f"| {row.server_peak_mib:.0f} | {', '.join(map(str, row.results_per_round))} |")
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    try:
        users, sampled = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is USERS:SAMPLED, e.g. 100:20; got {text!r}") from None
    if not 1 <= sampled <= users:
        raise argparse.ArgumentTypeError(f"need 1 <= sampled <= users, got {text!r}")
    return users, sampled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_size, nargs="+", default=list(SIZES), help="USERS:SAMPLED ...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base", default="smollm2", help="as simulations.run --base")
    parser.add_argument("--cpus-per-client", type=int, default=None, help="as simulations.run (default: all cores)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--no-write", action="store_true", help=f"print the table, do not write {RESULTS.name}")
    args = parser.parse_args(argv)
    folder, excluded = prepare_base(args.base)
    rows = []
    for users, sampled in args.sizes:
        row = measure(users, sampled, args.rounds, str(folder), args.workdir / f"{users}-{sampled}",
                      min_speeches_for(users, excluded), excluded=excluded, cpus_per_client=args.cpus_per_client)
        print(json.dumps(asdict(row)), flush=True)
        rows.append(row)
    text = table(rows, "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]), args.base)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A live bar per round of a simulated federation, read from its round ledger.

While ``flwr run`` streams, the runner polls the ledger the ServerApp writes (read-only: a SQLite
ledger runs in WAL mode, so a poll never holds the server up). Per round it shows the clients done
(answered, well or not) of those sampled and how many failed, as the server counts replies arriving
(server/progress.py; its validation may then turn a reply into a rejection, in the final count), the
round's elapsed time, and what is left of the round and of the run, estimated from the mean training
time of the rounds finished so far (evaluation, after the last round by default, comes on top). On a
terminal that is a ``rich.progress`` display; elsewhere (CI logs) a plain line when a round starts
and when it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from sqlalchemy.exc import SQLAlchemyError

from server.ledger import Ledger, LedgerError, RoundRecord

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class RoundView:
    """One round as the progress display shows it."""

    number: int
    total: int  # the run's rounds
    sampled: int
    done: int  # answered so far, accepted or not
    failed: int  # failed so far; once finished: failed, rejected or missing
    elapsed: float  # seconds
    finished: bool
    round_left: float | None  # seconds; None while no round has finished to estimate from
    run_left: float | None

    def line(self) -> str:
        """The plain-text line for a log."""
        if not self.finished:
            return f"round {self.number}/{self.total}: {self.sampled} clients sampled"
        left = f"; about {_duration(self.run_left)} left" if self.run_left else ""
        return (f"round {self.number}/{self.total}: {self.done}/{self.sampled} clients done, {self.failed} failed, "
                f"{_duration(self.elapsed)}{left}")

    def estimate(self) -> str:
        """What is left, for the live bar."""
        if self.round_left is None or self.run_left is None:
            return "estimating..."
        return f"round ~{_duration(self.round_left)} left, run ~{_duration(self.run_left)} left"


def round_views(rounds: Sequence[RoundRecord], total: int, now: datetime) -> list[RoundView]:
    """The rounds (as ``Ledger.rounds`` lists them) at time ``now``, with estimates from the finished ones."""
    durations = [(r.finished_at - r.started_at).total_seconds() for r in rounds if r.finished_at is not None]
    mean = sum(durations) / len(durations) if durations else None
    views = []
    for round_ in rounds:
        finished = round_.finished_at is not None
        elapsed = ((round_.finished_at if finished else now) - round_.started_at).total_seconds()
        round_left = run_left = None
        if mean is not None:
            round_left = 0.0 if finished else max(mean - elapsed, 0.0)
            run_left = round_left + mean * max(total - round_.number, 0)
        views.append(RoundView(round_.number, total, round_.clients_sampled,
                               round_.clients_replied + round_.clients_failed, round_.clients_failed,
                               max(elapsed, 0.0), finished, round_left, run_left))
    return views


class LedgerProgress:
    """Follows one Flower run in a ledger from a background thread; a context manager.

    ``follow`` names the Flower run once its id is known; before that, and while the ledger does not
    exist yet, nothing is shown. Any error reading the ledger skips that poll: the display never
    stops a run.
    """

    def __init__(self, ledger_url: str, total_rounds: int, console: Console) -> None:
        self.ledger_url, self.total_rounds, self.console = ledger_url, total_rounds, console
        self.flower_run_id: str | None = None
        self._ledger: Ledger | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ledger-progress", daemon=True)
        self._printed: set[tuple[int, bool]] = set()  # plain mode: (round, finished) already logged
        self._bars: Progress | None = None
        self._tasks: dict[int, TaskID] = {}
        if console.is_terminal:
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("clients, {task.fields[failed]} failed, {task.fields[elapsed]}"),
                                  TextColumn("[dim]{task.fields[estimate]}"), console=console)

    def __enter__(self) -> LedgerProgress:
        if self._bars is not None:
            self._bars.start()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last round's end, which the thread may have missed
        if self._bars is not None:
            self._bars.stop()
        if self._ledger is not None:
            self._ledger.close()

    def follow(self, flower_run_id: str) -> None:
        self.flower_run_id = flower_run_id

    def poll(self) -> None:
        """Look at the ledger once and update the display."""
        try:
            views = self._views()
        except (LedgerError, SQLAlchemyError):
            return
        for view in views:
            if self._bars is not None:
                self._show(view)
            elif (view.number, view.finished) not in self._printed:
                self._printed.add((view.number, view.finished))
                self.console.print(view.line(), highlight=False)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def _views(self) -> list[RoundView]:
        if self.flower_run_id is None:
            return []
        if self._ledger is None:
            self._ledger = Ledger(self.ledger_url, read_only=True)  # LedgerError until the server has created it
        runs = [run for run in self._ledger.runs() if run.flower_run_id == self.flower_run_id]
        if not runs:
            return []
        return round_views(self._ledger.rounds(runs[-1].id), self.total_rounds, datetime.now(timezone.utc))

    def _show(self, view: RoundView) -> None:
        fields = {"failed": view.failed, "elapsed": _duration(view.elapsed), "estimate": view.estimate()}
        if view.number not in self._tasks:
            self._tasks[view.number] = self._bars.add_task(f"round {view.number}/{view.total}",
                                                           total=max(view.sampled, 1), **fields)
        self._bars.update(self._tasks[view.number], completed=view.done, **fields)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"

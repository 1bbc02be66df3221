"""Read-only queries the CLI and the dashboard share: opening the ledger, finding runs, summaries.

The ``Ledger`` read methods cover most needs; the few summaries they lack (round counts of every
run, the list of checkpoints without their bytes) are single grouped queries here, so listing runs
stays one query however many rounds they have.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Select, func, select

from server.ledger import Checkpoint, Ledger, LedgerError, Round
from server.ledger.records import PrivacyChargeRecord, RoundRecord, RunRecord
from shared.config import fedgraft_home


def default_ledger_url() -> str:
    """The ledger the server writes unless told otherwise: ``$FEDGRAFT_HOME/ledger.db``."""
    return Ledger.default_url(fedgraft_home())


def open_ledger(url: str) -> Ledger:
    """The ledger at ``url``, read-only; LedgerError (with the reason) if it cannot be opened."""
    return Ledger(url, read_only=True)


@dataclass(frozen=True, slots=True)
class RunOverview:
    """A run with the counts a listing shows next to it."""

    run: RunRecord
    rounds: int

    @property
    def duration(self) -> timedelta:
        return run_duration(self.run)


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A stored adapter checkpoint, without its bytes."""

    round_number: int
    domain: str
    num_bytes: int
    content_hash: str


def run_duration(run: RunRecord, now: datetime | None = None) -> timedelta:
    """How long the run took, or has been going for while it is still running."""
    end = run.finished_at or now or datetime.now(timezone.utc)
    return end - run.started_at


def round_seconds(round_: RoundRecord) -> float | None:
    """Wall time of a finished round; None while it runs."""
    if round_.finished_at is None:
        return None
    return (round_.finished_at - round_.started_at).total_seconds()


def run_overviews(ledger: Ledger) -> list[RunOverview]:
    """Every run, oldest first, with its number of rounds."""
    runs = ledger.runs()
    counts = _scalar_pairs(ledger, select(Round.run_id, func.count()).group_by(Round.run_id))
    return [RunOverview(run, counts.get(run.id, 0)) for run in runs]


def resolve_run(ledger: Ledger, reference: str | int) -> RunRecord:
    """The run ``reference`` names: a ledger id, or a Flower run id if that is unambiguous.

    LedgerError naming the problem when the ledger is empty, nothing matches, or more than one run
    matches (a ledger id that is also another run's Flower id, or a Flower id used twice).
    """
    text = str(reference).strip()
    if not text.isdecimal():
        raise LedgerError(f"{text!r} is not a run id: use a ledger run id or a Flower run id (digits)")
    runs = ledger.runs()
    if not runs:
        raise LedgerError(empty_ledger_message(ledger))
    matches = [run for run in runs if run.id == int(text) or run.flower_run_id == text]
    if not matches:
        known = ", ".join(str(run.id) for run in runs[-10:])
        raise LedgerError(
            f"no run {text} in the ledger at {ledger.masked_url}: it is neither a ledger run id"
            f" nor a Flower run id there (latest ledger ids: {known})"
        )
    if len(matches) > 1:
        described = "; ".join(f"ledger id {run.id} (Flower run {run.flower_run_id})" for run in matches)
        raise LedgerError(f"run {text} is ambiguous in the ledger at {ledger.masked_url}: {described}")
    return matches[0]


@dataclass(frozen=True, slots=True)
class UserPrivacy:
    """What one user has spent in a run: their latest charge."""

    user_id: str
    rounds: int
    last_round: int
    epsilon: float


def users_privacy(charges: list[PrivacyChargeRecord]) -> list[UserPrivacy]:
    """Each charged user's epsilon so far, most spent first (then by user)."""
    latest: dict[str, PrivacyChargeRecord] = {}
    for charge in charges:  # by round: the last one seen is the user's latest
        latest[charge.user_id] = charge
    users = [UserPrivacy(c.user_id, c.rounds, c.round_number, c.epsilon) for c in latest.values()]
    return sorted(users, key=lambda user: (-user.epsilon, user.user_id))


def user_budget(run: RunRecord) -> float | None:
    """The run's ``dp-user-budget`` (epsilon), None when it set none."""
    return float(run.config.get("dp-user-budget") or 0) or None


def checkpoints(ledger: Ledger, run_id: int) -> list[CheckpointInfo]:
    """The run's stored adapter checkpoints by round, then domain ("" is the global adapter)."""
    query = (
        select(Checkpoint.round_number, Checkpoint.domain, Checkpoint.num_bytes, Checkpoint.content_hash)
        .where(Checkpoint.run_id == run_id)
        .order_by(Checkpoint.round_number, Checkpoint.domain)
    )
    with ledger.engine.connect() as connection:
        return [CheckpointInfo(*row) for row in connection.execute(query)]


def empty_ledger_message(ledger: Ledger) -> str:
    return f"the ledger at {ledger.masked_url} holds no runs yet"


def _scalar_pairs(ledger: Ledger, query: Select[tuple[int, int]]) -> dict[int, int]:
    with ledger.engine.connect() as connection:
        return {key: value for key, value in connection.execute(query)}

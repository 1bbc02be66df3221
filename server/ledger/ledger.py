"""The round ledger: what the server records about runs, rounds, clients, events and checkpoints.

Every write is its own short transaction, committed before the method returns: a crash loses at
most the write in flight, and readers in other processes (a second, read-only ``Ledger``) see each
round as soon as it is written. Inside ``batch()`` the writes share one transaction instead (the
server writes a round's client results, events, checkpoints and outcome so: one commit a round,
whatever the number of clients), each write still all-or-nothing on its own. SQLite files run in
WAL mode so such readers never block the writer, and SQLite transactions (migrations included) are
begun explicitly, so they are all-or-nothing.

Reads return frozen dataclasses (``RunRecord``, ``RoundRecord``, ``ClientResultRecord``,
``EventRecord``, ``PrivacyRoundRecord``, ``PrivacyChargeRecord``), detached copies that stay valid
after the ledger is closed.

Non-finite metric and config values (NaN, +inf, -inf) are stored as JSON ``null`` and read back as
None: JSON has no spelling for them, and PostgreSQL rejects the ``NaN`` token Python's json writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy
import safetensors.numpy
from alembic.util import CommandError
from sqlalchemy import URL, Connection, Engine, create_engine, event, func, make_url, select, text
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from . import migrate
from .models import (CLIENT_PHASES, CLIENT_STATUSES, RUN_STATUSES, Checkpoint, ClientResult, Event, PrivacyCharge,
                     PrivacyRound, Round, Run, utcnow)
from .records import (ClientResultRecord, EventRecord, PrivacyChargeRecord, PrivacyRoundRecord, RoundRecord,
                      RunRecord)

FINISHED_RUN_STATUSES = tuple(status for status in RUN_STATUSES if status != "running")
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
SQLITE_BUSY_TIMEOUT_MS = 5000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Unquoted PostgreSQL identifiers are folded to lower case: allowing only these avoids surprises.
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
FLOWER_ID_MAX_LENGTH = 32
# Any constant works; it only has to be the same in every process migrating the same database.
MIGRATION_LOCK_KEY = 0x66656467726166


class LedgerError(RuntimeError):
    """The ledger cannot be opened, or an operation refers to something that is not in it."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """The rounds whose adapters (and server-optimizer state) the server stores: every ``every``-th and the last.

    A resumed run continues after its latest checkpoint (``Ledger.resume_run``), so ``every`` trades
    ledger bytes per round against rounds run again after a crash.
    """

    every: int = 1
    last: int = 0  # the run's last round; 0: none known

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoints every {self.every} rounds: must be at least 1")

    def due(self, round_number: int) -> bool:
        """Whether round ``round_number`` stores a checkpoint."""
        return round_number % self.every == 0 or round_number == self.last


class Ledger:
    """The server's round ledger in a SQLite file or a PostgreSQL database."""

    def __init__(self, url: str, *, schema: str | None = None, read_only: bool = False) -> None:
        """Open the ledger at ``url``, bringing its schema up to date unless ``read_only``.

        ``schema`` (PostgreSQL only) puts the ledger's tables in that schema, created if missing.
        A read-only ledger never migrates and refuses writes, also at the database level; it needs
        a ledger already created, at the current schema revision. LedgerError if it cannot be opened.
        """
        parsed = _parse_url(url)
        self.schema = _check_schema(parsed, schema)
        self.read_only = read_only
        self.engine = _create_engine(parsed, self.schema, read_only)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._batch: Session | None = None  # the open batch's session (see ``batch``)
        try:
            self._open()
        except BaseException:
            self.engine.dispose()
            raise

    @staticmethod
    def default_url(folder: Path) -> str:
        """The URL of a SQLite ledger file ``ledger.db`` in ``folder`` (made absolute)."""
        return f"sqlite:///{(Path(folder) / 'ledger.db').resolve()}"

    @property
    def masked_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Ledger({self.masked_url!r}, schema={self.schema!r}, read_only={self.read_only})"

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # --- writes -------------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Make the writes inside one transaction, committed on exit; on an exception none of them is kept.

        Each write inside stays all-or-nothing (a savepoint), so one that fails and is caught leaves
        the others in the batch. Readers see the batch's writes only once it commits; reading this
        ledger inside a batch is not supported (an in-memory ledger has a single connection).
        Batches do not nest: LedgerError.
        """
        if self._batch is not None:
            raise LedgerError("a ledger batch is already open; batches do not nest")
        with self._write() as session:
            self._batch = session
            try:
                yield
            finally:
                self._batch = None

    def start_run(
        self,
        flower_run_id: str | int,
        config: Mapping[str, Any],
        base_model: str,
        base_hash: str,
        method: str = "fedavg",
    ) -> int:
        """Record a new run as "running"; returns the ledger's id for it (not Flower's)."""
        run = Run(
            flower_run_id=_flower_id(flower_run_id),
            config=_json_safe(config),
            base_model=base_model,
            base_hash=base_hash,
            method=method,
            status="running",
            started_at=utcnow(),
        )
        with self._write() as session:
            session.add(run)
            session.flush()
            return run.id

    def start_round(self, run_id: int, number: int, clients_sampled: int, bytes_down: int) -> None:
        """Record that round ``number`` started; LedgerError if the run already has that round."""
        with self._write() as session:
            _get_run(session, run_id)
            session.add(
                Round(
                    run_id=run_id,
                    number=number,
                    started_at=utcnow(),
                    clients_sampled=clients_sampled,
                    bytes_down=bytes_down,
                )
            )
            try:
                session.flush()
            except IntegrityError as error:
                raise LedgerError(f"round {number} of run {run_id} is already in the ledger") from error

    def record_client_result(
        self,
        run_id: int,
        round_number: int,
        *,
        node_id: str | int,
        status: str,
        phase: str = "train",
        user_id: str | None = None,
        domain: str | None = None,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
        bytes_up: int = 0,
        bytes_down: int = 0,
        seconds: float | None = None,
        error: str | None = None,
    ) -> None:
        """Record one client's reply (or failure) in a started round; status: ok, failed, rejected."""
        _check_one_of(status, CLIENT_STATUSES, "client result status")
        _check_one_of(phase, CLIENT_PHASES, "client result phase")
        result = ClientResult(
            node_id=_flower_id(node_id),
            phase=phase,
            status=status,
            user_id=user_id,
            domain=domain,
            num_examples=num_examples,
            metrics=_json_safe(metrics or {}),
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            seconds=seconds,
            error=error,
        )
        with self._write() as session:
            result.round_id = _get_round(session, run_id, round_number).id
            session.add(result)

    def record_round_progress(self, run_id: int, number: int, *, replied: int, failed: int) -> None:
        """While round ``number`` runs: the replies it has had so far (``finish_round`` then writes the outcome).

        A round already finished is left as it is.
        """
        with self._write() as session:
            round_ = _get_round(session, run_id, number)
            if round_.finished_at is None:
                round_.clients_replied, round_.clients_failed = replied, failed

    def finish_round(
        self,
        run_id: int,
        number: int,
        *,
        clients_replied: int,
        clients_failed: int,
        metrics: Mapping[str, float],
        bytes_up: int,
    ) -> None:
        """Record a started round's outcome: reply counts, aggregated metrics, bytes received."""
        with self._write() as session:
            round_ = _get_round(session, run_id, number)
            round_.finished_at = utcnow()
            round_.clients_replied = clients_replied
            round_.clients_failed = clients_failed
            round_.metrics = _json_safe(metrics)
            round_.bytes_up = bytes_up

    def record_event(
        self,
        run_id: int,
        kind: str,
        message: str,
        *,
        round_number: int | None = None,
        node_id: str | int | None = None,
    ) -> None:
        """Record an event such as "client-failed", "update-rejected", "resume" or "run-failed"."""
        event_ = Event(
            run_id=run_id,
            kind=kind,
            message=message,
            round_number=round_number,
            node_id=None if node_id is None else _flower_id(node_id),
            created_at=utcnow(),
        )
        with self._write() as session:
            _get_run(session, run_id)
            session.add(event_)

    def record_privacy(self, release: PrivacyRoundRecord, charges: Sequence[PrivacyChargeRecord]) -> None:
        """Record a round's private release and each user's charge for it, together; LedgerError if recorded already."""
        with self._write() as session:
            round_id = _get_round(session, release.run_id, release.round_number).id
            fields = {field.name: getattr(release, field.name) for field in dataclasses.fields(release)
                      if field.name not in ("run_id", "round_number")}
            session.add(PrivacyRound(round_id=round_id, **fields))
            for charge in charges:
                if (charge.run_id, charge.round_number) != (release.run_id, release.round_number):
                    raise ValueError(f"a charge of round {charge.round_number} of run {charge.run_id} is not one of "
                                     f"round {release.round_number} of run {release.run_id}")
                session.add(PrivacyCharge(round_id=round_id, user_id=charge.user_id, devices=charge.devices,
                                          noise_multiplier=charge.noise_multiplier, rounds=charge.rounds,
                                          epsilon=charge.epsilon))
            try:
                session.flush()
            except IntegrityError as error:
                raise LedgerError(f"round {release.round_number} of run {release.run_id} already has a private "
                                  "release in the ledger") from error

    def save_checkpoint(
        self, run_id: int, round_number: int, tensors: Mapping[str, numpy.ndarray], domain: str = ""
    ) -> str:
        """Store ``tensors`` as safetensors bytes; returns their sha256 (hex).

        Saving the same (run, round, domain) again replaces the earlier checkpoint.
        """
        data = safetensors.numpy.save({name: _c_contiguous(array) for name, array in tensors.items()})
        content_hash = hashlib.sha256(data).hexdigest()
        with self._write() as session:
            _get_run(session, run_id)
            checkpoint = session.scalars(
                _checkpoint_query(select(Checkpoint), run_id, domain, round_number)
            ).one_or_none()
            if checkpoint is None:
                checkpoint = Checkpoint(run_id=run_id, round_number=round_number, domain=domain)
                session.add(checkpoint)
            checkpoint.content_hash = content_hash
            checkpoint.num_bytes = len(data)
            checkpoint.data = data
            checkpoint.created_at = utcnow()
        return content_hash

    def load_checkpoint(
        self, run_id: int, round_number: int | None = None, domain: str = ""
    ) -> dict[str, numpy.ndarray]:
        """The tensors saved for that round (the latest saved round if None); LedgerError if none."""
        query = select(Checkpoint.round_number, Checkpoint.content_hash, Checkpoint.data)
        with self._sessions() as session:
            row = session.execute(_checkpoint_query(query, run_id, domain, round_number)).first()
        which = "any round" if round_number is None else f"round {round_number}"
        if row is None:
            raise LedgerError(f"no checkpoint of run {run_id}, {which}, domain {domain!r} in the ledger")
        data = bytes(row.data)
        if hashlib.sha256(data).hexdigest() != row.content_hash:
            raise LedgerError(
                f"checkpoint of run {run_id}, round {row.round_number}, domain {domain!r} is corrupted"
                " (its bytes do not match the stored hash)"
            )
        return safetensors.numpy.load(data)

    def resume_run(self, run_id: int, flower_run_id: str | int, *, from_checkpoint: bool = False) -> int:
        """Reopen a crashed run; returns the round it continues after.

        That is the last round whose aggregate was committed; with ``from_checkpoint`` (the run's state
        is its checkpointed adapters, as for every method that sends them) the latest of those rounds
        that has a checkpoint, 0 if none: under ``checkpoint-every`` k > 1 the rounds since the last
        checkpoint are run again. Rounds after it (a round cut short by the crash, rounds past the
        checkpoint) are removed with their client results and checkpoints, so the resumed run counts no
        round twice; a "resume" event says what happened.
        """
        with self._write() as session:
            run = _get_run(session, run_id)
            finished = session.scalars(select(Round.number).where(Round.run_id == run_id, Round.finished_at.is_not(None))
                                       .order_by(Round.number)).all()
            last = 0
            for number in finished:  # the committed prefix 1..last, with no gap
                if number != last + 1:
                    break
                last = number
            if from_checkpoint:
                last = session.scalar(select(func.max(Checkpoint.round_number)).where(
                    Checkpoint.run_id == run_id, Checkpoint.round_number <= last)) or 0
            dropped = session.scalars(select(Round).where(Round.run_id == run_id, Round.number > last)).all()
            for round_ in dropped:
                session.delete(round_)
            for checkpoint in session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id,
                                                                       Checkpoint.round_number > last)):
                session.delete(checkpoint)
            run.status, run.finished_at = "running", None
            session.add(Event(run_id=run_id, kind="resume", created_at=utcnow(), round_number=last,
                              node_id=None, message=f"resumed as Flower run {flower_run_id} after round {last}; "
                              f"discarded rounds {[r.number for r in dropped]} (unfinished, or run after the "
                              "latest checkpoint)"))
            return last

    def checkpoint_domains(self, run_id: int, round_number: int) -> list[str]:
        """The domains ("" for global) that have a checkpoint at this round."""
        with self._sessions() as session:
            return list(session.scalars(select(Checkpoint.domain).where(
                Checkpoint.run_id == run_id, Checkpoint.round_number == round_number).order_by(Checkpoint.domain)))

    def finish_run(self, run_id: int, status: str) -> None:
        """Mark a run completed, failed or interrupted."""
        _check_one_of(status, FINISHED_RUN_STATUSES, "finished run status")
        with self._write() as session:
            run = _get_run(session, run_id)
            run.status = status
            run.finished_at = utcnow()

    # --- reads --------------------------------------------------------------------------------

    def runs(self) -> list[RunRecord]:
        """All runs, oldest first."""
        with self._sessions() as session:
            return [RunRecord.of(run) for run in session.scalars(select(Run).order_by(Run.id))]

    def run(self, run_id: int) -> RunRecord:
        """One run; LedgerError if there is no such run."""
        with self._sessions() as session:
            return RunRecord.of(_get_run(session, run_id))

    def rounds(self, run_id: int) -> list[RoundRecord]:
        """The run's rounds by number, finished or not (``finished_at`` is None while running)."""
        query = select(Round).where(Round.run_id == run_id).order_by(Round.number)
        with self._sessions() as session:
            return [RoundRecord.of(round_) for round_ in session.scalars(query)]

    def client_results(self, run_id: int, round_number: int | None = None) -> list[ClientResultRecord]:
        """The run's client results (of one round if given), by round, then in recording order."""
        query = (
            select(ClientResult, Round.number)
            .join(ClientResult.round)
            .where(Round.run_id == run_id)
            .order_by(Round.number, ClientResult.id)
        )
        if round_number is not None:
            query = query.where(Round.number == round_number)
        with self._sessions() as session:
            rows = session.execute(query)
            return [ClientResultRecord.of(result, run_id, number) for result, number in rows]

    def privacy_rounds(self, run_id: int) -> list[PrivacyRoundRecord]:
        """The run's private releases by round."""
        query = (select(PrivacyRound, Round.number).join(Round, PrivacyRound.round_id == Round.id)
                 .where(Round.run_id == run_id).order_by(Round.number))
        with self._sessions() as session:
            return [PrivacyRoundRecord.of(row, run_id, number) for row, number in session.execute(query)]

    def privacy_charges(self, run_id: int) -> list[PrivacyChargeRecord]:
        """The run's charges to users, by round, then user."""
        query = (select(PrivacyCharge, Round.number).join(Round, PrivacyCharge.round_id == Round.id)
                 .where(Round.run_id == run_id).order_by(Round.number, PrivacyCharge.user_id))
        with self._sessions() as session:
            return [PrivacyChargeRecord.of(row, run_id, number) for row, number in session.execute(query)]

    def events(self, run_id: int) -> list[EventRecord]:
        """The run's events in recording order."""
        query = select(Event).where(Event.run_id == run_id).order_by(Event.id)
        with self._sessions() as session:
            return [EventRecord.of(event_) for event_ in session.scalars(query)]

    # --- internals ----------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            with self.engine.begin() as connection:
                if self.read_only:
                    self._check_up_to_date(connection)
                else:
                    self._migrate(connection)
        except DBAPIError as error:
            raise LedgerError(f"cannot open the ledger at {self.masked_url}: {_reason(error)}") from error
        except CommandError as error:
            raise LedgerError(f"cannot migrate the ledger at {self.masked_url}: {error}") from error

    def _migrate(self, connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            # Two servers starting at once would otherwise both try to create the tables.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            if self.schema is not None:
                _create_schema(connection, self.schema)
        migrate.upgrade(connection)

    def _check_up_to_date(self, connection: Connection) -> None:
        current, head = migrate.current_revision(connection), migrate.head_revision()
        if current is None:
            raise LedgerError(
                f"the ledger at {self.masked_url} has no tables yet: open it once without read_only"
            )
        if current != head:
            raise LedgerError(
                f"the ledger at {self.masked_url} is at schema revision {current}, this code needs {head}"
            )

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A session in its own transaction, committed on exit (rolled back on an exception).

        Inside ``batch()``: the batch's session, this write in a savepoint of the batch's transaction.
        """
        if self.read_only:
            raise LedgerError(f"the ledger at {self.masked_url} was opened read-only")
        if self._batch is not None:
            with self._batch.begin_nested():
                yield self._batch
            return
        with self._sessions.begin() as session:
            yield session


# --- opening ------------------------------------------------------------------------------------


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as error:  # ValueError: say, a port that is not a number
        raise LedgerError(f"malformed ledger URL {_mask(url)!r}: {error}") from error
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise LedgerError(
            f"unsupported ledger URL {_mask(url)!r}: the backend must be one of"
            f" {', '.join(SUPPORTED_BACKENDS)}, not {backend!r}"
        )
    if parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; fedgraft depends on psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _mask(url: str) -> str:
    """``url`` with any password hidden, even when it does not parse."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _check_schema(url: URL, schema: str | None) -> str | None:
    if schema is None:
        return None
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"schema={schema!r} is only supported for PostgreSQL ledgers")
    if not SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema {schema!r} must be lower-case letters, digits and _, not led by a digit")
    return schema


def _create_engine(url: URL, schema: str | None, read_only: bool) -> Engine:
    # allow_nan=False: a NaN slipping past _json_safe must fail loudly, not write invalid JSON.
    json_serializer = partial(json.dumps, allow_nan=False)
    try:
        if url.get_backend_name() == "sqlite":
            return _sqlite_engine(url, read_only, json_serializer)
        return _postgres_engine(url, schema, read_only, json_serializer)
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        raise LedgerError(f"cannot use ledger URL {url.render_as_string()!r}: {error}") from error


def _sqlite_engine(url: URL, read_only: bool, json_serializer: Callable[[Any], str]) -> Engine:
    if _sqlite_in_memory(url):
        # One shared connection: otherwise each thread would see its own, empty, database.
        engine = create_engine(
            url,
            json_serializer=json_serializer,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
    else:
        _prepare_sqlite_file(url, read_only)
        engine = create_engine(url, json_serializer=json_serializer)
    event.listen(engine, "connect", _sqlite_on_connect(read_only))
    event.listen(engine, "begin", _sqlite_on_begin(read_only))
    return engine


def _sqlite_in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _prepare_sqlite_file(url: URL, read_only: bool) -> None:
    """Create the file's folder for a writer; insist the file exists for a reader."""
    if url.query.get("uri"):
        return  # a "file:" URI: SQLite resolves it, not a plain path
    path = Path(url.database or "")
    if read_only and not path.is_file():
        raise LedgerError(f"cannot open the ledger at {url.render_as_string()}: no such file {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        where = url.render_as_string()
        raise LedgerError(f"cannot create the folder of the ledger at {where}: {error}") from error


def _sqlite_on_connect(read_only: bool) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun by _sqlite_on_begin
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if read_only:
                cursor.execute("PRAGMA query_only = ON")
            else:
                # WAL: readers in other processes see committed rounds without blocking the writer.
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    return on_connect


def _sqlite_on_begin(read_only: bool) -> Callable[[Connection], None]:
    # The driver alone begins transactions only before INSERT/UPDATE/DELETE, so a migration's DDL
    # would commit statement by statement and a failure would leave half a schema. IMMEDIATE takes
    # the write lock up front, waiting busy_timeout for another writer, instead of failing with
    # "database is locked" when a read turns into a write.
    statement = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(statement)

    return on_begin


def _postgres_engine(
    url: URL, schema: str | None, read_only: bool, json_serializer: Callable[[Any], str]
) -> Engine:
    options = []
    if schema is not None:
        options.append(f"-csearch_path={schema}")
    if read_only:
        options.append("-cdefault_transaction_read_only=on")
    connect_args: dict[str, Any] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    if options:
        connect_args["options"] = " ".join(options)
    # pre-ping: the server idles between rounds, long enough for connections to be dropped.
    return create_engine(url, json_serializer=json_serializer, pool_pre_ping=True, connect_args=connect_args)


def _create_schema(connection: Connection, schema: str) -> None:
    # Look first: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege on the database.
    exists = connection.scalar(text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": schema})
    if not exists:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))


def _reason(error: DBAPIError) -> str:
    return " ".join(str(error.orig).split())


# --- values -------------------------------------------------------------------------------------


def _check_one_of(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}, not {value!r}")


def _flower_id(value: str | int) -> str:
    """A Flower run or node id as a decimal string: unsigned 64-bit ids overflow integer columns."""
    text_ = str(value)
    if isinstance(value, bool) or not text_ or len(text_) > FLOWER_ID_MAX_LENGTH:
        raise ValueError(f"not a Flower id: {value!r}")
    return text_


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON data, with every non-finite float (NaN, +-inf) replaced by None."""
    if isinstance(value, numpy.generic):
        return _json_safe(value.item())
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    raise TypeError(f"cannot store {type(value).__name__} value {value!r} in the ledger's JSON")


def _c_contiguous(array: numpy.ndarray) -> numpy.ndarray:
    # safetensors copies the raw buffer: a strided view (say a transpose) would be saved scrambled.
    array = numpy.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


# --- lookups ------------------------------------------------------------------------------------


def _get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise LedgerError(f"no run {run_id} in the ledger")
    return run


def _get_round(session: Session, run_id: int, number: int) -> Round:
    query = select(Round).where(Round.run_id == run_id, Round.number == number)
    round_ = session.scalars(query).one_or_none()
    if round_ is None:
        raise LedgerError(f"round {number} of run {run_id} was never started in the ledger")
    return round_


def _checkpoint_query(query: Any, run_id: int, domain: str, round_number: int | None) -> Any:
    """``query`` narrowed to one checkpoint: that round, or the latest one saved."""
    query = query.where(Checkpoint.run_id == run_id, Checkpoint.domain == domain)
    if round_number is None:
        return query.order_by(Checkpoint.round_number.desc()).limit(1)
    return query.where(Checkpoint.round_number == round_number)

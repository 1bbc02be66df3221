"""ORM models of the round ledger.

The schema itself is created only by the Alembic migrations in ``migrations/``; these classes must
stay in step with them (``tests/test_ledger.py`` compares the two).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

RUN_STATUSES = ("running", "completed", "failed", "interrupted")
CLIENT_STATUSES = ("ok", "failed", "rejected")
CLIENT_PHASES = ("train", "evaluate")

# Flower run and node ids are unsigned 64-bit: they overflow signed BIGINT and SQLite INTEGER.
FLOWER_ID = String(32)

# Deterministic constraint names, so later migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime, stored as UTC and always read back with ``tzinfo=UTC``.

    SQLite keeps no time zone: values are converted to UTC before storing so they compare and sort
    correctly, and the zone is re-attached on load.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores timezone-aware times only")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    allowed = ", ".join(f"'{value}'" for value in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """One federated training run (one Flower run)."""

    __tablename__ = "runs"
    __table_args__ = (_one_of("status", RUN_STATUSES, "status"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    flower_run_id: Mapped[str] = mapped_column(FLOWER_ID)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_model: Mapped[str] = mapped_column(String(255))
    base_hash: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32), default="fedavg")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="running")

    rounds: Mapped[list[Round]] = relationship(
        back_populates="run", order_by="Round.number", cascade="all, delete-orphan", passive_deletes=True
    )
    events: Mapped[list[Event]] = relationship(
        back_populates="run", order_by="Event.id", cascade="all, delete-orphan", passive_deletes=True
    )


class Round(Base):
    """One server round of a run, with its aggregated outcome."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    clients_sampled: Mapped[int] = mapped_column(default=0)
    clients_replied: Mapped[int] = mapped_column(default=0)
    clients_failed: Mapped[int] = mapped_column(default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=lambda: {})
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)

    run: Mapped[Run] = relationship(back_populates="rounds")
    client_results: Mapped[list[ClientResult]] = relationship(
        back_populates="round", order_by="ClientResult.id", cascade="all, delete-orphan", passive_deletes=True
    )


class ClientResult(Base):
    """What one client sent back (or failed to) in one round."""

    __tablename__ = "client_results"
    __table_args__ = (
        _one_of("status", CLIENT_STATUSES, "status"),
        _one_of("phase", CLIENT_PHASES, "phase"),
        Index(None, "round_id", "node_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    node_id: Mapped[str] = mapped_column(FLOWER_ID)
    phase: Mapped[str] = mapped_column(String(16), default="train")  # train, or evaluate of the aggregate
    user_id: Mapped[str | None] = mapped_column(String(255))
    domain: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    num_examples: Mapped[int] = mapped_column(default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=lambda: {})
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float | None] = mapped_column(Float)  # as in 0001; SQLAlchemy 2.1 infers Double
    error: Mapped[str | None] = mapped_column(Text)

    round: Mapped[Round] = relationship(back_populates="client_results")


class Event(Base):
    """Something worth keeping that happened during a run: a failure, a rejection, a resume."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round_number: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    node_id: Mapped[str | None] = mapped_column(FLOWER_ID)
    message: Mapped[str] = mapped_column(Text)

    run: Mapped[Run] = relationship(back_populates="events")


class PrivacyRound(Base):
    """A round's differentially private release: its mechanism, sampling and the run's epsilon after it."""

    __tablename__ = "privacy_rounds"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    # Hangs off its round: a resumed run drops an unfinished round's release with it.
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), unique=True)
    mode: Mapped[str] = mapped_column(String(32))
    noise_multiplier: Mapped[float] = mapped_column(Float)
    clipping_norm: Mapped[float] = mapped_column(Float)  # the one this round's updates were clipped to
    sampled: Mapped[int]
    available: Mapped[int]  # nodes that could be sampled: connected and within their budget
    sampling_rate: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    round_epsilon: Mapped[float] = mapped_column(Float)  # this release alone
    epsilon: Mapped[float] = mapped_column(Float)  # the run's, composed over its releases so far


class PrivacyCharge(Base):
    """What one user spent by taking part in one round's release (their epsilon so far)."""

    __tablename__ = "privacy_charges"
    __table_args__ = (UniqueConstraint("round_id", "user_id"), Index(None, "user_id"))

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(255))
    devices: Mapped[int]  # nodes of this user sampled in the round
    noise_multiplier: Mapped[float] = mapped_column(Float)  # of the round's mechanism for this user
    rounds: Mapped[int]  # rounds taken part in so far
    epsilon: Mapped[float] = mapped_column(Float)


class Checkpoint(Base):
    """An adapter's weights after a round, as safetensors bytes; ``domain == ""`` is the global one."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "round_number", "domain"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_number: Mapped[int]
    domain: Mapped[str] = mapped_column(String(255), default="")
    content_hash: Mapped[str] = mapped_column(String(64))
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    # Deferred: listing or updating checkpoints must not drag every adapter's bytes along.
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

"""What the ledger's read methods return: frozen, plain snapshots, detached from any session.

They hold copies of the row values, so they stay valid after the session (or the ledger) is closed
and never trigger lazy loads. Times are timezone-aware UTC; Flower ids are decimal strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .models import ClientResult, Event, PrivacyCharge, PrivacyRound, Round, Run


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    flower_run_id: str
    config: dict[str, Any]
    base_model: str
    base_hash: str
    method: str
    status: str
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, run: Run) -> RunRecord:
        return cls(
            id=run.id,
            flower_run_id=run.flower_run_id,
            config=dict(run.config),
            base_model=run.base_model,
            base_hash=run.base_hash,
            method=run.method,
            status=run.status,
            started_at=run.started_at,
            finished_at=run.finished_at,
        )


@dataclass(frozen=True, slots=True)
class RoundRecord:
    run_id: int
    number: int
    started_at: datetime
    finished_at: datetime | None
    clients_sampled: int
    clients_replied: int
    clients_failed: int
    metrics: dict[str, Any]
    bytes_down: int
    bytes_up: int

    @classmethod
    def of(cls, round_: Round) -> RoundRecord:
        return cls(
            run_id=round_.run_id,
            number=round_.number,
            started_at=round_.started_at,
            finished_at=round_.finished_at,
            clients_sampled=round_.clients_sampled,
            clients_replied=round_.clients_replied,
            clients_failed=round_.clients_failed,
            metrics=dict(round_.metrics),
            bytes_down=round_.bytes_down,
            bytes_up=round_.bytes_up,
        )


@dataclass(frozen=True, slots=True)
class ClientResultRecord:
    run_id: int
    round_number: int
    node_id: str
    phase: str
    status: str
    user_id: str | None
    domain: str | None
    num_examples: int
    metrics: dict[str, Any]
    bytes_up: int
    bytes_down: int
    seconds: float | None
    error: str | None

    @classmethod
    def of(cls, result: ClientResult, run_id: int, round_number: int) -> ClientResultRecord:
        return cls(
            run_id=run_id,
            round_number=round_number,
            node_id=result.node_id,
            phase=result.phase,
            status=result.status,
            user_id=result.user_id,
            domain=result.domain,
            num_examples=result.num_examples,
            metrics=dict(result.metrics),
            bytes_up=result.bytes_up,
            bytes_down=result.bytes_down,
            seconds=result.seconds,
            error=result.error,
        )


@dataclass(frozen=True, slots=True)
class EventRecord:
    run_id: int
    kind: str
    message: str
    created_at: datetime
    round_number: int | None
    node_id: str | None

    @classmethod
    def of(cls, event: Event) -> EventRecord:
        return cls(
            run_id=event.run_id,
            kind=event.kind,
            message=event.message,
            created_at=event.created_at,
            round_number=event.round_number,
            node_id=event.node_id,
        )


@dataclass(frozen=True, slots=True)
class PrivacyRoundRecord:
    """A round's differentially private release (server/privacy.py says what each number means)."""

    run_id: int
    round_number: int
    mode: str
    noise_multiplier: float
    clipping_norm: float
    sampled: int
    available: int
    sampling_rate: float
    delta: float
    round_epsilon: float
    epsilon: float

    @classmethod
    def of(cls, row: PrivacyRound, run_id: int, round_number: int) -> PrivacyRoundRecord:
        return cls(run_id=run_id, round_number=round_number, mode=row.mode, noise_multiplier=row.noise_multiplier,
                   clipping_norm=row.clipping_norm, sampled=row.sampled, available=row.available,
                   sampling_rate=row.sampling_rate, delta=row.delta, round_epsilon=row.round_epsilon,
                   epsilon=row.epsilon)


@dataclass(frozen=True, slots=True)
class PrivacyChargeRecord:
    """One user's charge for one round's release: their devices in it, and their epsilon so far."""

    run_id: int
    round_number: int
    user_id: str
    devices: int
    noise_multiplier: float
    rounds: int
    epsilon: float

    @classmethod
    def of(cls, row: PrivacyCharge, run_id: int, round_number: int) -> PrivacyChargeRecord:
        return cls(run_id=run_id, round_number=round_number, user_id=row.user_id, devices=row.devices,
                   noise_multiplier=row.noise_multiplier, rounds=row.rounds, epsilon=row.epsilon)

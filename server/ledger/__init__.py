"""The server's round ledger: runs, rounds, client results, events, adapter checkpoints and privacy spent, in SQL."""

from .ledger import CheckpointPolicy, Ledger, LedgerError
from .models import Base, Checkpoint, ClientResult, Event, PrivacyCharge, PrivacyRound, Round, Run
from .records import (ClientResultRecord, EventRecord, PrivacyChargeRecord, PrivacyRoundRecord, RoundRecord,
                      RunRecord)

__all__ = [
    "Base",
    "Checkpoint",
    "CheckpointPolicy",
    "ClientResult",
    "ClientResultRecord",
    "Event",
    "EventRecord",
    "Ledger",
    "LedgerError",
    "PrivacyCharge",
    "PrivacyChargeRecord",
    "PrivacyRound",
    "PrivacyRoundRecord",
    "Round",
    "RoundRecord",
    "Run",
    "RunRecord",
]

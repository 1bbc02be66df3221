"""The server's round ledger: runs, rounds, client results, events and adapter checkpoints in SQL."""

from .ledger import Ledger, LedgerError
from .models import Base, Checkpoint, ClientResult, Event, Round, Run
from .records import ClientResultRecord, EventRecord, RoundRecord, RunRecord

__all__ = [
    "Base",
    "Checkpoint",
    "ClientResult",
    "ClientResultRecord",
    "Event",
    "EventRecord",
    "Ledger",
    "LedgerError",
    "Round",
    "RoundRecord",
    "Run",
    "RunRecord",
]

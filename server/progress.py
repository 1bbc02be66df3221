"""A train round's replies counted as they arrive, so its progress is in the ledger before its results are.

The runners' progress bars (simulations/progress.py) read the ledger. A round's results are written in
one transaction once every reply is in; before that, ``ProgressGrid`` keeps the round's row at the
replies so far (``clients_replied``, and ``clients_failed`` for error replies; the outcome then
overwrites both).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from server.ledger import Ledger

PROGRESS_INTERVAL_S = 2.0  # at most one progress write per this many seconds: a few commits a round
PULL_INTERVAL_S = 1.0


class ProgressGrid:
    """A Flower grid whose train rounds write their reply count to the ledger as replies arrive.

    Flower's grids offer no hook between pulls, so for train messages the push-then-pull loop of
    their ``send_and_receive`` is run here, on their own ``push_messages``/``pull_messages``, with the
    same timeout; evaluation messages and everything else go to the wrapped grid as they are.
    """

    def __init__(self, grid: Grid, ledger: Ledger, run_id: int, interval: float = PROGRESS_INTERVAL_S,
                 pull_interval: float = PULL_INTERVAL_S) -> None:
        self.grid, self.ledger, self.run_id = grid, ledger, run_id
        self.interval, self.pull_interval = interval, pull_interval

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        round_number = int(messages[0].content["config"]["server-round"])
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        written = time.monotonic()
        while waiting:
            arrived = list(self.grid.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if arrived and waiting and time.monotonic() - written >= self.interval:
                self._record(round_number, replies)
                written = time.monotonic()
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.pull_interval)
        return replies

    def _record(self, round_number: int, replies: list[Message]) -> None:
        failed = sum(reply.has_error() for reply in replies)
        self.ledger.record_round_progress(self.run_id, round_number, replied=len(replies) - failed, failed=failed)

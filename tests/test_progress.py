"""The per-round progress of a simulated run, read from its ledger: the numbers, the log lines, the live bar."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from rich.console import Console

import simulations.progress
from server.ledger import Ledger, RoundRecord
from server.progress import ProgressGrid
from simulations.progress import LedgerProgress, round_views
from test_strategy import reply_to, task_identity  # noqa: F401

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def a_round(number: int, start: float, end: float | None, sampled: int = 5, replied: int = 0,
            failed: int = 0) -> RoundRecord:
    return RoundRecord(run_id=1, number=number, started_at=T0 + timedelta(seconds=start),
                       finished_at=None if end is None else T0 + timedelta(seconds=end), clients_sampled=sampled,
                       clients_replied=replied, clients_failed=failed, metrics={}, bytes_down=0, bytes_up=0)


def test_each_round_shows_clients_done_failures_elapsed_and_estimates_from_the_finished_ones():
    rounds = [a_round(1, 0, 10, replied=4, failed=1), a_round(2, 10, 30, replied=5), a_round(3, 30, None)]
    first, second, third = round_views(rounds, total=5, now=T0 + timedelta(seconds=35))
    assert (first.done, first.failed, first.elapsed, first.round_left, first.run_left) == (5, 1, 10.0, 0.0, 60.0)
    assert (second.done, second.elapsed) == (5, 20.0)
    # mean round 15 s: 10 s left of round 3, then rounds 4 and 5
    assert (third.done, third.elapsed, third.round_left, third.run_left, third.finished) == (0, 5.0, 10.0, 40.0, False)
    assert first.line() == "round 1/5: 5/5 clients done, 1 failed, 10 s; about 1:00 left"
    assert third.line() == "round 3/5: 5 clients sampled"


def test_no_estimate_before_a_round_has_finished():
    (view,) = round_views([a_round(1, 0, None)], total=3, now=T0 + timedelta(seconds=70))
    assert (view.elapsed, view.round_left, view.run_left) == (70.0, None, None)
    assert view.estimate() == "estimating..."


def test_the_last_round_has_nothing_left():
    (view,) = round_views([a_round(1, 0, 12, replied=5)], total=1, now=T0 + timedelta(seconds=99))
    assert view.run_left == 0.0 and view.line() == "round 1/1: 5/5 clients done, 0 failed, 12 s"


@pytest.fixture(autouse=True)
def no_background_polls(monkeypatch):
    monkeypatch.setattr(simulations.progress, "POLL_SECONDS", 3600.0)  # the tests poll themselves


def test_without_a_terminal_each_round_start_and_end_is_one_plain_line(ledger):
    out = io.StringIO()
    with LedgerProgress(ledger.engine.url.render_as_string(), 2, Console(file=out, force_terminal=False)) as progress:
        run_id = ledger.start_run(77, {}, "tiny", "f" * 64)
        ledger.start_round(run_id, 1, clients_sampled=3, bytes_down=0)
        progress.poll()
        assert out.getvalue() == ""  # the Flower run id is not known yet
        progress.follow("77")
        progress.poll()
        progress.poll()
        ledger.finish_round(run_id, 1, clients_replied=2, clients_failed=1, metrics={}, bytes_up=0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 1/2: 3 clients sampled"
    assert lines[1].startswith("round 1/2: 3/3 clients done, 1 failed, ")
    assert len(lines) == 2


def test_a_ledger_not_created_yet_shows_nothing_and_stops_nothing(tmp_path):
    out = io.StringIO()
    with LedgerProgress(f"sqlite:///{tmp_path / 'later.db'}", 2, Console(file=out, force_terminal=False)) as progress:
        progress.follow("77")
        progress.poll()
    assert out.getvalue() == ""


def test_on_a_terminal_a_live_bar_per_round(ledger):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with LedgerProgress(ledger.engine.url.render_as_string(), 3, console) as progress:
        progress.follow("78")
        run_id = ledger.start_run(78, {}, "tiny", "f" * 64)
        ledger.start_round(run_id, 1, clients_sampled=4, bytes_down=0)
        ledger.finish_round(run_id, 1, clients_replied=4, clients_failed=0, metrics={}, bytes_up=0)
        ledger.start_round(run_id, 2, clients_sampled=4, bytes_down=0)
        progress.poll()
    shown = out.getvalue()
    assert "round 1/3" in shown and "4/4" in shown
    assert "round 2/3" in shown and "0/4" in shown


class ScriptedGrid:
    """A grid whose replies arrive in the given batches, one batch per pull; it notes the ledger's count at each pull."""

    def __init__(self, batches, ledger, run_id):
        self.batches, self.ledger, self.run_id = list(batches), ledger, run_id
        self.seen: list[tuple[int, int]] = []
        self.evaluated = []

    def push_messages(self, messages):
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        (round_,) = self.ledger.rounds(self.run_id)
        self.seen.append((round_.clients_replied, round_.clients_failed))
        return self.batches.pop(0) if self.batches else []

    def send_and_receive(self, messages, *, timeout=None):
        self.evaluated = list(messages)
        return []

    def get_node_ids(self):
        return [11, 12, 13]


def train_messages(server_round: int, nodes=(11, 12, 13)) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                    message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes]


def test_a_train_rounds_replies_are_counted_in_the_ledger_as_they_arrive(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "f" * 64)
    ledger.start_round(run_id, 4, clients_sampled=3, bytes_down=0)
    messages = train_messages(4)
    messages[1].metadata.__dict__["_message_id"] = "m12"  # as the SuperLink does on push
    ok, dead, late = (reply_to(messages[0], RecordDict()), Message(Error(code=2, reason="boom"), reply_to=messages[1]),
                      reply_to(messages[2], RecordDict()))
    grid = ScriptedGrid([[ok], [], [dead], [late]], ledger, run_id)
    progress = ProgressGrid(grid, ledger, run_id, interval=0.0, pull_interval=0.0)
    replies = progress.send_and_receive(messages, timeout=60)
    assert replies == [ok, dead, late]
    # what the ledger held at each pull: nothing, one reply, still one, one reply and one failure
    assert grid.seen == [(0, 0), (1, 0), (1, 0), (1, 1)]
    assert progress.get_node_ids() == [11, 12, 13]  # anything else is the wrapped grid's


def test_the_timeout_ends_the_wait_with_the_replies_so_far(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "f" * 64)
    ledger.start_round(run_id, 1, clients_sampled=3, bytes_down=0)
    messages = train_messages(1)
    first = reply_to(messages[0], RecordDict())
    grid = ScriptedGrid([[first]], ledger, run_id)
    assert ProgressGrid(grid, ledger, run_id, pull_interval=0.01).send_and_receive(messages, timeout=0.05) == [first]


def test_evaluation_messages_go_to_the_wrapped_grid(ledger):
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), message_type=MessageType.EVALUATE,
                        dst_node_id=11)]
    grid = ScriptedGrid([], ledger, 0)
    assert ProgressGrid(grid, ledger, 0).send_and_receive(messages, timeout=1) == []
    assert grid.evaluated == messages


def test_progress_never_overwrites_a_finished_rounds_outcome(ledger):
    run_id = ledger.start_run(1, {}, "tiny", "f" * 64)
    ledger.start_round(run_id, 1, clients_sampled=3, bytes_down=0)
    ledger.finish_round(run_id, 1, clients_replied=2, clients_failed=1, metrics={}, bytes_up=0)
    ledger.record_round_progress(run_id, 1, replied=1, failed=0)
    (round_,) = ledger.rounds(run_id)
    assert (round_.clients_replied, round_.clients_failed) == (2, 1)

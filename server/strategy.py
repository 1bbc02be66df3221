"""FedAvg over LoRA adapters that checks every update and writes the round ledger.

Aggregation itself is Flower's FedAvg (McMahan et al., 2017, https://arxiv.org/abs/1602.05629),
weighted by each client's ``num-examples``; this subclass adds what a production server needs
around it:

- a deadline for node availability (Flower's sampler waits forever);
- validation of every reply: hostile or corrupt updates (wrong keys or shapes, NaN, oversized,
  missing metrics) are rejected and recorded, never averaged in;
- a ledger row for every round and every client result, failures included, with bytes moved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.ledger import Ledger
from shared.adapters import AdapterUpdateError, array_nbytes, check_update

TRAIN_METRICS = frozenset({"num-examples", "train-loss", "train-steps", "eval-loss-before", "eval-loss",
                           "eval-perplexity", "eval-accuracy", "eval-tokens", "seconds"})
MAX_EXAMPLES = 10**9  # a client claiming more is lying about its weight in the average


class NodeWaitTimeout(TimeoutError):
    """Not enough nodes connected before the deadline."""


def wait_for_nodes(grid: Grid, minimum: int, deadline_seconds: float, poll_seconds: float = 1.0) -> list[int]:
    """Node ids once at least ``minimum`` are connected; NodeWaitTimeout after the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise NodeWaitTimeout(f"only {len(nodes)} of the {minimum} required nodes connected within "
                                  f"{deadline_seconds:.0f} s (run-config node-wait-seconds)")
        time.sleep(poll_seconds)
    return nodes


def check_metrics(metrics: Mapping[str, float], expected: frozenset[str]) -> None:
    """Metric keys must be the expected ones, values finite, and the weight plausible."""
    if set(metrics) != expected:
        raise AdapterUpdateError(f"metric keys differ: missing {sorted(expected - set(metrics))}, "
                                 f"unexpected {sorted(set(metrics) - expected)}")
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterUpdateError(f"metric {key!r} is not a finite number: {value!r}")
    if not 0 < metrics["num-examples"] <= MAX_EXAMPLES:
        raise AdapterUpdateError(f"num-examples {metrics['num-examples']} is out of range")


class LedgerFedAvg(FedAvg):
    """Flower's FedAvg with update validation, a node deadline and a round ledger.

    Parameters
    ----------
    ledger : Ledger
        Where rounds and client results are written.
    run_id : int
        The ledger's id of this run.
    expected_shapes : Mapping[str, tuple[int, ...]]
        Keys and shapes of the adapter tensors; any other update is rejected.
    max_update_bytes : int
        Largest accepted update.
    node_wait_seconds : float
        How long to wait for ``min_available_nodes`` before failing the run.
    evaluate_rounds : set[int]
        Rounds after which every node evaluates the aggregated adapter (and the base alone).
    **fedavg_args
        Passed to FedAvg (fraction_train, min_train_nodes, ...).
    """

    def __init__(self, ledger: Ledger, run_id: int, expected_shapes: Mapping[str, tuple[int, ...]],
                 max_update_bytes: int, node_wait_seconds: float, evaluate_rounds: set[int], **fedavg_args) -> None:
        super().__init__(**fedavg_args)
        self.ledger = ledger
        self.run_id = run_id
        self.expected_shapes = dict(expected_shapes)
        self.max_update_bytes = max_update_bytes
        self.node_wait_seconds = node_wait_seconds
        self.evaluate_rounds = evaluate_rounds
        self._sent: dict[str, list[Message]] = {}  # phase -> messages of the current round

    # --- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes), self.node_wait_seconds)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent["train"] = messages
        self.ledger.start_round(self.run_id, server_round, clients_sampled=len(messages),
                                bytes_down=len(messages) * array_nbytes(arrays))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted = [reply for reply in replies if self._record_reply(server_round, reply, "train")]
        failed = len(replies) - len(accepted) + self._record_missing(server_round, replies, "train")
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is None:
            self.ledger.record_event(self.run_id, "round-not-aggregated", "no valid update this round; "
                                     "the global adapter is kept", round_number=server_round)
        else:
            self.ledger.save_checkpoint(self.run_id, server_round, {k: v.numpy() for k, v in arrays.items()})
        self.ledger.finish_round(self.run_id, server_round, clients_replied=len(accepted), clients_failed=failed,
                                 metrics=dict(metrics or {}),
                                 bytes_up=sum(array_nbytes(r.content["arrays"]) for r in accepted))
        return arrays, metrics

    # --- evaluation -----------------------------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round not in self.evaluate_rounds:
            return []
        wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes), self.node_wait_seconds)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent["evaluate"] = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        accepted = [reply for reply in replies if self._record_reply(server_round, reply, "evaluate")]
        self._record_missing(server_round, replies, "evaluate")
        return super().aggregate_evaluate(server_round, accepted)

    # --- bookkeeping ----------------------------------------------------------------------------

    def _node_of(self, reply: Message, phase: str) -> int:
        """The node a reply answers for: a dead node's error reply comes from the SuperLink itself."""
        for message in self._sent.get(phase, []):
            if message.metadata.message_id and message.metadata.message_id == reply.metadata.reply_to_message_id:
                return message.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _record_reply(self, server_round: int, reply: Message, phase: str) -> bool:
        """Write one client result; True when the reply is valid and may be used."""
        node_id = self._node_of(reply, phase)
        if reply.has_error():
            self.ledger.record_client_result(self.run_id, server_round, node_id=node_id, phase=phase, status="failed",
                                             error=f"code {reply.error.code}: {reply.error.reason}")
            self.ledger.record_event(self.run_id, "client-failed", reply.error.reason, round_number=server_round,
                                     node_id=node_id)
            return False
        identity = reply.content.config_records.get("identity", ConfigRecord())
        try:
            metrics = self._checked_metrics(reply, phase)
        except AdapterUpdateError as error:
            self.ledger.record_client_result(self.run_id, server_round, node_id=node_id, phase=phase, status="rejected",
                                             user_id=_text(identity, "user-id"), domain=_text(identity, "domain"),
                                             error=str(error))
            self.ledger.record_event(self.run_id, "update-rejected", str(error), round_number=server_round, node_id=node_id)
            return False
        arrays = reply.content.array_records.get("arrays")
        self.ledger.record_client_result(
            self.run_id, server_round, node_id=node_id, phase=phase, status="ok",
            user_id=_text(identity, "user-id"), domain=_text(identity, "domain"),
            num_examples=int(metrics["num-examples"]), metrics=dict(metrics), seconds=float(metrics["seconds"]),
            bytes_up=array_nbytes(arrays) if arrays is not None else 0,
            bytes_down=sum(array_nbytes(m.content["arrays"]) for m in self._sent.get(phase, [])[:1]),
        )
        return True

    def _checked_metrics(self, reply: Message, phase: str) -> MetricRecord:
        """Raise AdapterUpdateError if the reply is malformed; otherwise its metrics."""
        content = reply.content
        if len(content.metric_records) != 1 or "metrics" not in content.metric_records:
            raise AdapterUpdateError("reply must carry exactly one MetricRecord named 'metrics'")
        metrics = content.metric_records["metrics"]
        if phase == "train":
            check_metrics(metrics, TRAIN_METRICS)
            if len(content.array_records) != 1 or "arrays" not in content.array_records:
                raise AdapterUpdateError("reply must carry exactly one ArrayRecord named 'arrays'")
            check_update(content.array_records["arrays"], self.expected_shapes, self.max_update_bytes)
        return metrics

    def _record_missing(self, server_round: int, replies: list[Message], phase: str) -> int:
        """Nodes that were sent a message but never answered (stragglers past the timeout)."""
        answered = {self._node_of(reply, phase) for reply in replies}
        missing = [m.metadata.dst_node_id for m in self._sent.get(phase, []) if m.metadata.dst_node_id not in answered]
        for node_id in missing:
            self.ledger.record_client_result(self.run_id, server_round, node_id=node_id, phase=phase, status="failed",
                                             error="no reply before the round timeout")
            self.ledger.record_event(self.run_id, "client-failed", "no reply before the round timeout",
                                     round_number=server_round, node_id=node_id)
        return len(missing)


def _text(record: ConfigRecord, key: str) -> str | None:
    value = record.get(key)
    return str(value) if value is not None else None

"""Federated adapters with a selectable personalization method, update checks and a round ledger.

``FederatedAdapters`` samples nodes as Flower's FedAvg does and leaves aggregation to
``server/aggregation.py`` (one Flower rule per aggregation group). Around it, what a production
server needs:

- a deadline for node availability (Flower's sampler waits forever);
- validation of every reply: hostile or corrupt updates (wrong keys or shapes, NaN, oversized,
  missing metrics) are rejected and recorded, never averaged in;
- per-node payloads: each node receives its group's adapter, and only the tensors the method shares;
- a ledger row for every round and client result, failures included, and a checkpoint per group.

Further behaviour comes as Flower-style wrappers that take a ``strategy``: ``ResumedRounds`` numbers
the rounds of a run resumed after a crash.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from server.aggregation import (EVALUATE_METRICS, OPTIONAL_METRICS, TRAIN_METRICS, GroupAdapters, check_metrics,
                                make_rule)
from server.ledger import Ledger
from shared.adapters import AdapterUpdateError, array_nbytes, check_update
from shared.methods import GLOBAL_GROUP, Aggregation, Method, group_of


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


class ResumedRounds(Strategy):
    """Wraps a strategy so that Flower's rounds continue after the ``done`` rounds of a resumed run.

    Flower's loop numbers rounds from 1 on every start. Shifting the number here, once, gives the
    wrapped strategy (its ledger rows, its server optimizer's bias correction) and the
    ``server-round`` its clients receive the run's own round numbers.
    """

    def __init__(self, strategy: Strategy, done: int) -> None:
        self.strategy, self.done = strategy, done

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)

    def summary(self) -> None:
        self.strategy.summary()


class FederatedAdapters(FedAvg):
    """Flower's FedAvg sampling with per-group aggregation, update validation and a round ledger.

    Parameters
    ----------
    ledger : Ledger
        Where rounds, client results, events and checkpoints are written.
    run_id : int
        The ledger's id of this run.
    method : Method
        The personalization method (what is shared, per domain or global).
    adapter_shapes : Mapping[str, tuple[int, ...]]
        Keys and shapes of the full shared adapter; replies must carry exactly the shared part.
    aggregation : Aggregation
        Flower rule that aggregates each group: FedAvg, FedProx, FedAdam or FedYogi.
    max_update_bytes : int
        Largest accepted update.
    node_wait_seconds : float
        How long to wait for ``min_available_nodes`` before failing the run.
    evaluate_rounds : set[int]
        Rounds after which every node scores its model under the method (and the base alone).
    domain_mix : float
        For per-domain methods, the weight of the domain aggregate against the global one (1: pure domain).
    server_learning_rate, proximal_mu : float
        Passed to FedAdam/FedYogi (eta) and FedProx.
    **fedavg_args
        Passed to FedAvg (fraction_train, min_train_nodes, ...).
    """

    def __init__(self, ledger: Ledger, run_id: int, method: Method, adapter_shapes: Mapping[str, tuple[int, ...]],
                 max_update_bytes: int, node_wait_seconds: float, evaluate_rounds: set[int],
                 aggregation: Aggregation = Aggregation.FEDAVG,
                 domain_mix: float = 1.0, server_learning_rate: float = 0.01, proximal_mu: float = 0.01,
                 **fedavg_args) -> None:
        super().__init__(**fedavg_args)
        self.ledger, self.run_id, self.method = ledger, run_id, method
        self.expected_shapes = {key: shape for key, shape in adapter_shapes.items() if method.shared_key(key)}
        self.max_update_bytes = max_update_bytes
        self.node_wait_seconds = node_wait_seconds
        self.evaluate_rounds = evaluate_rounds
        self.group_adapters = GroupAdapters(lambda: make_rule(aggregation, server_learning_rate, proximal_mu),
                                            domain_mix)
        self.node_groups: dict[int, str] = {}  # learned from the domain each node declares
        self._sent: dict[str, list[Message]] = {}  # phase -> messages of the current round

    @property
    def groups(self) -> dict[str, ArrayRecord]:
        """Each group's current adapter (the shared part)."""
        return self.group_adapters.adapters

    # --- resume after a crash -------------------------------------------------------------------

    def restore(self, last_round: int) -> None:
        """Continue after ``last_round``: adapters, server-optimizer state and each node's group, from the ledger.

        A node's group is the one of its last accepted reply, as the uninterrupted run had learned it:
        without it a per-domain method would send every node the global adapter for a round. Nodes that
        rejoin under new ids (a restarted SuperLink) start from the global adapter, as new nodes do.
        """
        if last_round == 0 or not self.method.sends_arrays:
            return
        self.group_adapters.restore({domain: self.ledger.load_checkpoint(self.run_id, last_round, domain=domain)
                                     for domain in self.ledger.checkpoint_domains(self.run_id, last_round)})
        for result in self.ledger.client_results(self.run_id):
            if result.phase == "train" and result.status == "ok" and result.round_number <= last_round:
                self.node_groups[int(result.node_id)] = group_of(self.method, result.domain)

    # --- payloads -------------------------------------------------------------------------------

    def payload_for(self, node_id: int) -> ArrayRecord:
        """The adapter a node starts from: its group's, or the global one before its domain is known."""
        return self.groups.get(self.node_groups.get(node_id, GLOBAL_GROUP), self.groups[GLOBAL_GROUP])

    def _messages(self, template: Iterable[Message], config: ConfigRecord, message_type: str) -> list[Message]:
        return [Message(content=RecordDict({self.arrayrecord_key: self.payload_for(m.metadata.dst_node_id),
                                            self.configrecord_key: config}),
                        message_type=message_type, dst_node_id=m.metadata.dst_node_id) for m in template]

    def _shared_part(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({key: arrays[key] for key in arrays.keys() if self.method.shared_key(key)})

    # --- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.groups.setdefault(GLOBAL_GROUP, self._shared_part(arrays))
        wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes), self.node_wait_seconds)
        messages = self._messages(super().configure_train(server_round, arrays, config, grid), config, MessageType.TRAIN)
        self._sent["train"] = messages
        self.ledger.start_round(self.run_id, server_round, clients_sampled=len(messages),
                                bytes_down=sum(array_nbytes(m.content[self.arrayrecord_key]) for m in messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted = [reply for reply in replies if self._record_reply(server_round, reply, "train")]
        failed = len(replies) - len(accepted) + self._record_missing(server_round, replies, "train")
        metrics = self.train_metrics_aggr_fn([r.content for r in accepted], self.weighted_by_key) if accepted else None
        if not accepted:
            self.ledger.record_event(self.run_id, "round-not-aggregated", "no valid update this round; the adapters "
                                     "are kept", round_number=server_round)
        elif self.method.sends_arrays:
            self._aggregate_groups(server_round, accepted)
        self.ledger.finish_round(self.run_id, server_round, clients_replied=len(accepted), clients_failed=failed,
                                 metrics=dict(metrics or {}),
                                 bytes_up=sum(array_nbytes(r.content[self.arrayrecord_key]) for r in accepted))
        return self.groups[GLOBAL_GROUP], metrics

    def _aggregate_groups(self, server_round: int, accepted: list[Message]) -> None:
        """Aggregate every group (server/aggregation.py) and checkpoint all a resumed run needs."""
        groups = [group_of(self.method, _text(reply.content.config_records.get("identity", ConfigRecord()), "domain"))
                  for reply in accepted]
        for reply, group in zip(accepted, groups, strict=True):
            self.node_groups[self._node_of(reply, "train")] = group
        self.group_adapters.aggregate(server_round, accepted, groups)
        for domain, tensors in self.group_adapters.checkpoints().items():
            self.ledger.save_checkpoint(self.run_id, server_round, tensors, domain=domain)

    # --- evaluation -----------------------------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round not in self.evaluate_rounds:
            self._sent["evaluate"] = []  # or the previous evaluation's nodes would count as missing
            return []
        wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes), self.node_wait_seconds)
        messages = self._messages(super().configure_evaluate(server_round, arrays, config, grid), config,
                                  MessageType.EVALUATE)
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

    def _sent_bytes(self, node_id: int, phase: str) -> int:
        return sum(array_nbytes(m.content[self.arrayrecord_key]) for m in self._sent.get(phase, [])
                   if m.metadata.dst_node_id == node_id)

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
        who = {"user_id": _text(identity, "user-id"), "domain": _text(identity, "domain")}
        try:
            metrics = self._checked_metrics(reply, phase)
        except AdapterUpdateError as error:
            self.ledger.record_client_result(self.run_id, server_round, node_id=node_id, phase=phase, status="rejected",
                                             error=str(error), **who)
            self.ledger.record_event(self.run_id, "update-rejected", str(error), round_number=server_round, node_id=node_id)
            return False
        arrays = reply.content.array_records.get(self.arrayrecord_key)
        self.ledger.record_client_result(
            self.run_id, server_round, node_id=node_id, phase=phase, status="ok", **who,
            num_examples=int(metrics["num-examples"]), metrics=dict(metrics), seconds=float(metrics["seconds"]),
            bytes_up=array_nbytes(arrays) if arrays is not None else 0, bytes_down=self._sent_bytes(node_id, phase),
        )
        for key in OPTIONAL_METRICS:  # in the ledger only: Flower aggregates a key only if every reply has it
            metrics.pop(key, None)
        return True

    def _checked_metrics(self, reply: Message, phase: str) -> MetricRecord:
        """Raise AdapterUpdateError if the reply is malformed; otherwise its metrics."""
        content = reply.content
        if len(content.metric_records) != 1 or "metrics" not in content.metric_records:
            raise AdapterUpdateError("reply must carry exactly one MetricRecord named 'metrics'")
        metrics = content.metric_records["metrics"]
        check_metrics(metrics, TRAIN_METRICS if phase == "train" else EVALUATE_METRICS)
        if phase == "train":
            if len(content.array_records) != 1 or self.arrayrecord_key not in content.array_records:
                raise AdapterUpdateError(f"reply must carry exactly one ArrayRecord named {self.arrayrecord_key!r}")
            check_update(content.array_records[self.arrayrecord_key], self.expected_shapes, self.max_update_bytes)
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

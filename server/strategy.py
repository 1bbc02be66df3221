"""Federated adapters with a selectable personalization method, update checks and a round ledger.

``FederatedAdapters`` samples nodes as Flower's FedAvg does and leaves aggregation to
``server/aggregation.py`` (one Flower rule per aggregation group). Around it, what a production
server needs:

- a deadline for node availability (Flower's sampler waits forever);
- validation of every reply: hostile or corrupt updates (wrong keys or shapes, NaN, oversized,
  missing metrics, a second reply from a node, a reply to no message sent) are rejected and recorded,
  never averaged in;
- a poisoning defence (docs/trust.md): each update's norm of change from what its node received is
  recorded, and bounded (rejected or clipped); a client's claimed example count buys the weight the
  example-weight policy allows (the ledger keeps the claim); Flower's robust rules can aggregate;
- per-node payloads: each node receives its group's adapter, and only the tensors the method shares;
- coded payloads (``update-codec``, ``downlink-codec``; shared/codec.py): a coded reply is decoded and
  checked as strictly as a plain one, adapters go out coded, and the ledger counts bytes as they travel;
- heterogeneous ranks (shared/ranks.py): a device declares its LoRA rank (``lora-r`` in its reply's
  identity), at most the run's; once known it is sent its adapter cut to that rank, its reply must have
  exactly that rank, and it is padded back and aggregated per rank component (HetLoRA);
- user-level differential privacy (docs/trust.md): after the checks above, one of Flower's DP wrappers
  clips and noises the global aggregate (server/aggregation.py); each release is accounted
  (server/privacy.py) and recorded, against the run and each user, and a user at ``dp-user-budget`` is
  no longer sampled;
- a ledger row for every round and client result, failures included, written in one transaction per
  round and phase, and a checkpoint per group on the rounds ``checkpoints`` names.

Further behaviour comes as Flower-style wrappers that take a ``strategy``: ``ResumedRounds`` numbers
the rounds of a run resumed after a crash.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from server.aggregation import (EVALUATE_METRICS, OPTIONAL_METRICS, TRAIN_METRICS, GroupAdapters, NormBound,
                                check_metrics, clip_update, make_rule, update_norm, with_privacy)
from server.ledger import CheckpointPolicy, Ledger, PrivacyChargeRecord, PrivacyRoundRecord
from server.privacy import PrivacyAccount, PrivacySettings, Release
from shared.adapters import AdapterUpdateError, array_nbytes, check_update, receive_update
from shared.codec import Codecs, decode, encode
from shared.methods import GLOBAL_GROUP, Aggregation, ExampleWeights, Method, group_of
from shared.ranks import adapter_rank, pad, shapes_at_rank, truncate


# A device's float32 arithmetic (received + clipped change) can land a hair over the clipping norm.
DEVICE_CLIPPING_TOLERANCE = 1e-3
# The round metric holding the seconds of the server's own work in a round's training phase.
SERVER_SECONDS = "server-seconds"


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


class WithinBudget:
    """A grid as the sampler sees it: without ``excluded`` nodes (their users are at their privacy budget)."""

    def __init__(self, grid: Grid, excluded: set[int]) -> None:
        self.grid, self.excluded = grid, excluded
        self.available: list[int] = []  # what the last look saw: the nodes a round samples from

    def get_node_ids(self) -> list[int]:
        self.available = [node for node in self.grid.get_node_ids() if node not in self.excluded]
        return self.available


@dataclass
class Screened:
    """A well-formed reply on its way to the aggregate, with what its ledger row needs."""

    reply: Message
    node_id: int
    who: dict[str, str | None]
    metrics: MetricRecord  # the reply's own record: the example-weight policy rewrites its num-examples
    norm: float = 0.0  # of the update's change from what the node received (train)
    clipped_to: float | None = None
    bytes_up: int = 0  # its arrays as they came over the wire (coded, before decoding)


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
        Flower rule that aggregates each group: FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgM, or a robust one.
    max_update_bytes : int
        Largest accepted update.
    node_wait_seconds : float
        How long to wait for ``min_available_nodes`` before failing the run.
    evaluate_rounds : set[int]
        Rounds after which every node scores its model under the method (and the base alone).
    domain_mix : float
        For per-domain methods, the weight of the domain aggregate against the global one (1: pure domain).
    server_learning_rate, server_momentum, proximal_mu : float
        Passed to FedAdam/FedYogi/FedAdagrad (eta) or FedAvgM (learning rate, momentum), and FedProx.
    norm_bound : NormBound
        The bound on each update's norm of change from what its node received (off by default).
    example_weights : ExampleWeights
        ``claimed``, ``capped`` (at ``max_examples_per_client``) or ``uniform``: the weight a reply's
        claimed ``num-examples`` buys.
    trim_beta, byzantine_clients, krum_keep
        Passed to FedTrimmedAvg (beta), Krum/MultiKrum/Bulyan (f) and MultiKrum (kept replies; 0: n - f).
    privacy : PrivacySettings
        User-level differential privacy (off by default): the Flower DP wrapper around the global rule,
        the accountant's delta and each user's budget.
    checkpoints : CheckpointPolicy
        The rounds whose adapters and server-optimizer state go to the ledger (default: every round).
    codecs : Codecs
        How adapters travel (shared/codec.py): replies are decoded and checked, adapters sent encoded,
        and the ledger counts the coded bytes (default: float32 both ways).
    **fedavg_args
        Passed to FedAvg (fraction_train, min_train_nodes, ...).
    """

    def __init__(self, ledger: Ledger, run_id: int, method: Method, adapter_shapes: Mapping[str, tuple[int, ...]],
                 max_update_bytes: int, node_wait_seconds: float, evaluate_rounds: set[int],
                 aggregation: Aggregation = Aggregation.FEDAVG,
                 domain_mix: float = 1.0, server_learning_rate: float = 0.01, proximal_mu: float = 0.01,
                 norm_bound: NormBound = NormBound(), example_weights: ExampleWeights = ExampleWeights.CLAIMED, max_examples_per_client: int = 0,
                 trim_beta: float = 0.2, byzantine_clients: int = 0, krum_keep: int = 0,
                 privacy: PrivacySettings = PrivacySettings(), checkpoints: CheckpointPolicy = CheckpointPolicy(),
                 server_momentum: float = 0.9, codecs: Codecs = Codecs(), **fedavg_args) -> None:
        super().__init__(**fedavg_args)
        self.ledger, self.run_id, self.method = ledger, run_id, method
        self.expected_shapes = {key: shape for key, shape in adapter_shapes.items() if method.shared_key(key)}
        self.rank = adapter_rank(self.expected_shapes)  # the run's lora-r; None when nothing shared has a rank
        self.node_ranks: dict[int, int] = {}  # the rank each node declared in its last well-formed train reply
        self._ranks_sent: dict[int, int] = {}  # node -> the rank of the adapter its current message carries
        self.max_update_bytes = max_update_bytes
        self.node_wait_seconds = node_wait_seconds
        self.evaluate_rounds = evaluate_rounds
        self.norm_bound = norm_bound
        self.example_weights, self.max_examples_per_client = example_weights, max_examples_per_client
        self.group_adapters = GroupAdapters(
            lambda: with_privacy(make_rule(aggregation, server_learning_rate, proximal_mu, trim_beta=trim_beta,
                                           byzantine_clients=byzantine_clients, krum_keep=krum_keep,
                                           server_momentum=server_momentum), privacy),
            domain_mix)
        self.codecs = codecs
        self._adapters_sent: dict[int, ArrayRecord] = {}  # node -> the adapter its train message carries, uncoded
        self.privacy = PrivacyAccount(privacy)
        self.checkpoints = checkpoints
        self.node_groups: dict[int, str] = {}  # learned from the domain each node declares
        self.node_users: dict[int, str] = {}  # learned from the user-id each node declares
        self._stopped_users: set[str] = set()  # at their budget, their event recorded
        self._sent: dict[str, list[Message]] = {}  # phase -> messages of the current round
        self._available = 0  # nodes the current round sampled from
        self._configure_seconds = 0.0  # the server's own work in the current round's configure_train

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
            if result.user_id is not None:
                self.node_users[int(result.node_id)] = result.user_id
        self._restore_privacy()

    def _restore_privacy(self) -> None:
        """The releases and charges of the committed rounds (resume_run dropped the others), and who was stopped."""
        charges: dict[int, dict[str, float]] = {}
        for charge in self.ledger.privacy_charges(self.run_id):
            charges.setdefault(charge.round_number, {})[charge.user_id] = charge.noise_multiplier
        for release in self.ledger.privacy_rounds(self.run_id):
            self.privacy.add(Release(release.sampling_rate, release.noise_multiplier),
                             charges.get(release.round_number, {}))
        self._stopped_users = {self.node_users[int(event.node_id)] for event in self.ledger.events(self.run_id)
                               if event.kind == "privacy-budget-reached" and event.node_id is not None
                               and int(event.node_id) in self.node_users}

    # --- payloads -------------------------------------------------------------------------------

    def payload_for(self, node_id: int) -> ArrayRecord:
        """The adapter a node starts from: its group's, or the global one before its domain is known."""
        return self.groups.get(self.node_groups.get(node_id, GLOBAL_GROUP), self.groups[GLOBAL_GROUP])

    def _messages(self, template: Iterable[Message], config: ConfigRecord, message_type: str) -> list[Message]:
        """A message per sampled node with its adapter, coded by ``downlink-codec`` (each adapter encoded once)."""
        coded: dict[tuple[int, int | None], ArrayRecord] = {}
        messages = []
        for node in (m.metadata.dst_node_id for m in template):
            adapter, rank = self.payload_for(node), self.node_ranks.get(node, self.rank)
            self._ranks_sent[node] = rank
            if (id(adapter), rank) not in coded:
                coded[id(adapter), rank] = self._coded(self._at_rank(adapter, rank))
            messages.append(Message(content=RecordDict({self.arrayrecord_key: coded[id(adapter), rank],
                                                        self.configrecord_key: config}),
                                    message_type=message_type, dst_node_id=node))
        return messages

    def _at_rank(self, adapter: ArrayRecord, rank: int | None) -> ArrayRecord:
        """The adapter cut to a device's rank (its first ``rank`` components; the adapter itself at the run's)."""
        if rank == self.rank:
            return adapter
        return ArrayRecord({key: Array(value) for key, value in
                            truncate({key: array.numpy() for key, array in adapter.items()}, rank).items()})

    def _coded(self, adapter: ArrayRecord) -> ArrayRecord:
        if self.codecs.down.lossless:
            return adapter  # the adapter itself, as ever
        return encode({key: array.numpy() for key, array in adapter.items()}, self.codecs.down)

    def _shared_part(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({key: arrays[key] for key in arrays.keys() if self.method.shared_key(key)})

    # --- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.groups.setdefault(GLOBAL_GROUP, self._shared_part(arrays))
        needed = max(self.min_available_nodes, self.min_train_nodes)
        wait_for_nodes(grid, needed, self.node_wait_seconds)
        started = time.perf_counter()  # the server's own work from here: sampling, payloads, the ledger
        if self.privacy.settings.mode.clips_on_device:
            config[KEY_CLIPPING_NORM] = self.privacy.settings.clipping_norm  # what Flower's fixedclipping_mod reads
        within = WithinBudget(grid, self._over_budget(server_round, grid))
        if len(within.get_node_ids()) >= needed or not within.excluded:  # none excluded: Flower's sampler as ever
            template = super().configure_train(server_round, arrays, config, within)
        else:
            template = []
            self.ledger.record_event(self.run_id, "privacy-budget-exhausted", f"{len(within.available)} nodes are "
                                     f"within their dp-user-budget and a round needs {needed}: it trains none",
                                     round_number=server_round)
        self._available = len(within.available)
        messages = self._messages(template, config, MessageType.TRAIN)
        self._sent["train"] = messages
        self._adapters_sent = {m.metadata.dst_node_id: self.payload_for(m.metadata.dst_node_id) for m in messages}
        self.ledger.start_round(self.run_id, server_round, clients_sampled=len(messages),
                                bytes_down=sum(array_nbytes(m.content[self.arrayrecord_key]) for m in messages))
        self._configure_seconds = time.perf_counter() - started
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with self.ledger.batch():  # the round's results, events, checkpoints and outcome: one commit
            return self._aggregate_train(server_round, replies)

    def _aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        replies = list(replies)
        screened = self._bounded(server_round, self._screen(server_round, replies, "train"))
        accepted = self._accept(server_round, screened, "train")
        failed = len(replies) - len(accepted) + self._record_missing(server_round, replies, "train")
        metrics = self.train_metrics_aggr_fn([r.content for r in accepted], self.weighted_by_key) if accepted else None
        if not accepted:
            self.ledger.record_event(self.run_id, "round-not-aggregated", "no valid update this round; the adapters "
                                     "are kept", round_number=server_round)
        elif self.method.sends_arrays:
            clipping_norm = self._dp_clipping_norm()  # before an adaptive wrapper moves it
            self._aggregate_groups(server_round, accepted)
            if clipping_norm is not None:
                self._charge(server_round, clipping_norm)
        # Validation, aggregation and ledger writes of the round (its final commit aside): benchmarks/scale.py
        server_seconds = self._configure_seconds + time.perf_counter() - started
        self.ledger.finish_round(self.run_id, server_round, clients_replied=len(accepted), clients_failed=failed,
                                 metrics={**(metrics or {}), SERVER_SECONDS: server_seconds},
                                 bytes_up=sum(item.bytes_up for item in screened))
        return self.groups[GLOBAL_GROUP], metrics

    def _aggregate_groups(self, server_round: int, accepted: list[Message]) -> None:
        """Aggregate every group (server/aggregation.py) and, on a checkpoint round, store all a resumed run needs."""
        groups = [group_of(self.method, _text(reply.content.config_records.get("identity", ConfigRecord()), "domain"))
                  for reply in accepted]
        for reply, group in zip(accepted, groups, strict=True):
            self.node_groups[self._node_of(reply, "train")] = group
        ranks = None if self.rank is None else [self.node_ranks.get(self._node_of(reply, "train"), self.rank)
                                                 for reply in accepted]
        for group in self.group_adapters.aggregate(server_round, accepted, groups, ranks):
            self.ledger.record_event(self.run_id, "group-not-aggregated", f"the rule declined to aggregate group "
                                     f"{group!r} (too few replies for it); its adapter is kept", round_number=server_round)
        if not self.checkpoints.due(server_round):
            return
        for domain, tensors in self.group_adapters.checkpoints().items():
            self.ledger.save_checkpoint(self.run_id, server_round, tensors, domain=domain)

    # --- differential privacy ------------------------------------------------------------------

    def _over_budget(self, server_round: int, grid: Grid) -> set[int]:
        """Connected nodes whose user has no room for another round in ``dp-user-budget``; an event for each new one."""
        stopped = {node for node in grid.get_node_ids()
                   if node in self.node_users and not self.privacy.allows(self.node_users[node])}
        for node in sorted(stopped):
            user = self.node_users[node]
            if user not in self._stopped_users:
                self._stopped_users.add(user)
                self.ledger.record_event(
                    self.run_id, "privacy-budget-reached",
                    f"user {user!r} has spent epsilon {self.privacy.user_epsilon(user):.4g} of dp-user-budget "
                    f"{self.privacy.settings.user_budget:g} (delta {self.privacy.settings.delta:g}); another round "
                    "would exceed it, so their node is no longer sampled", round_number=server_round, node_id=node)
        return stopped

    def _dp_clipping_norm(self) -> float | None:
        """The norm the DP wrapper clips this round's updates to; None when dp is off."""
        if not self.privacy.settings.mode.on:
            return None
        return float(self.group_adapters.rule(GLOBAL_GROUP).clipping_norm)  # type: ignore[attr-defined]

    def _charge(self, server_round: int, clipping_norm: float) -> None:
        """Account the round's release and record it: the run's epsilon, and each sampled user's (docs/trust.md).

        Every sampled node whose user is known is charged, accepted or not: a rejection depends on
        the user's data too.
        """
        sampled = [message.metadata.dst_node_id for message in self._sent["train"]]
        devices = Counter(self.node_users[node] for node in sampled if node in self.node_users)
        spend = self.privacy.release(len(sampled), self._available, devices)
        settings = self.privacy.settings
        release = PrivacyRoundRecord(self.run_id, server_round, settings.mode.value, settings.noise_multiplier,
                                     clipping_norm, len(sampled), self._available, spend.release.sampling_rate,
                                     settings.delta, spend.round_epsilon, spend.run_epsilon)
        self.ledger.record_privacy(release, [
            PrivacyChargeRecord(self.run_id, server_round, user, charge.devices, charge.noise_multiplier,
                                charge.rounds, charge.epsilon) for user, charge in spend.users.items()])

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
        with self.ledger.batch():
            return self._aggregate_evaluate(server_round, replies)

    def _aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        accepted = self._accept(server_round, self._screen(server_round, replies, "evaluate"), "evaluate")
        self._record_missing(server_round, replies, "evaluate")
        return super().aggregate_evaluate(server_round, accepted)

    # --- bookkeeping ----------------------------------------------------------------------------

    def _request_of(self, reply: Message, phase: str) -> Message | None:
        """The message of this round that ``reply`` answers, if any."""
        for message in self._sent.get(phase, []):
            if message.metadata.message_id and message.metadata.message_id == reply.metadata.reply_to_message_id:
                return message
        return None

    def _node_of(self, reply: Message, phase: str) -> int:
        """The node a reply answers for: a dead node's error reply comes from the SuperLink itself."""
        request = self._request_of(reply, phase)
        return request.metadata.dst_node_id if request is not None else reply.metadata.src_node_id

    def _sent_bytes(self, node_id: int, phase: str) -> int:
        return sum(array_nbytes(m.content[self.arrayrecord_key]) for m in self._sent.get(phase, [])
                   if m.metadata.dst_node_id == node_id)

    def _received(self, node_id: int) -> dict[str, np.ndarray]:
        """The shared tensors this node was sent for training this round, as the server holds them (uncoded)."""
        return {key: array.numpy() for key, array in self._adapters_sent[node_id].items()}

    def _decode_update(self, reply: Message, node_id: int) -> None:
        """Check a train reply's arrays at its device's rank; replace them by the full-rank adapter they stand for.

        A coded reply's arrays are decoded (float32); a lower-rank one is padded with what the server
        sent beyond its rank (shared/ranks.py), so its change there is zero.
        """
        arrays = reply.content[self.arrayrecord_key]
        rank = self._declared_rank(reply, node_id)
        shapes = self.expected_shapes if rank == self.rank else shapes_at_rank(self.expected_shapes, rank)
        if self.codecs.plain:  # the reply is the trained adapter itself
            adapter = check_update(arrays, shapes, self.max_update_bytes)
        else:
            sent = self._at_rank_tensors(self._received(node_id), rank)
            got = sent  # what the node decoded from its message
            if not self.codecs.down.lossless:
                request = next(m for m in self._sent["train"] if m.metadata.dst_node_id == node_id)
                sent_shapes = shapes_at_rank(self.expected_shapes, self._ranks_sent[node_id])
                got = self._at_rank_tensors(decode(request.content[self.arrayrecord_key], sent_shapes,
                                                   self.codecs.down), rank)
            adapter = receive_update(arrays, sent, got, self.codecs, self.max_update_bytes)
        if rank is not None:
            self.node_ranks[node_id] = rank
        if self.codecs.plain and rank == self.rank:
            return  # the reply is the checked adapter itself, as ever
        full = pad(adapter, self._received(node_id)) if rank != self.rank else adapter
        reply.content[self.arrayrecord_key] = ArrayRecord({key: Array(value) for key, value in full.items()})

    def _at_rank_tensors(self, tensors: dict[str, np.ndarray], rank: int | None) -> dict[str, np.ndarray]:
        return tensors if rank == self.rank else truncate(tensors, rank)

    def _declared_rank(self, reply: Message, node_id: int) -> int | None:
        """The LoRA rank a train reply's identity declares (the run's when it declares none), checked.

        It must be a whole number from 1 to the run's ``lora-r``, and at most the rank the node was sent.
        """
        declared = reply.content.config_records.get("identity", ConfigRecord()).get("lora-r", self.rank)
        if self.rank is None:
            return None
        if isinstance(declared, bool) or not isinstance(declared, int) or not 0 < declared <= self.rank:
            raise AdapterUpdateError(f"the reply declares lora-r {declared!r}; this run's adapter has rank {self.rank} "
                                     f"(run-config lora-r), so a device's node-config lora-r must be in [1, {self.rank}]")
        if declared > self._ranks_sent.get(node_id, self.rank):
            raise AdapterUpdateError(f"the reply declares lora-r {declared} (the run's when it states none), above "
                                     f"the rank {self._ranks_sent[node_id]} its node was sent")
        return declared

    def _screen(self, server_round: int, replies: list[Message], phase: str) -> list[Screened]:
        """Record failed and malformed replies; return the well-formed ones, at most one per node."""
        screened: list[Screened] = []
        for reply in replies:
            node_id = self._node_of(reply, phase)
            if reply.has_error():
                self._record_failed(server_round, node_id, phase, f"code {reply.error.code}: {reply.error.reason}",
                                    reply.error.reason)
                continue
            identity = reply.content.config_records.get("identity", ConfigRecord())
            who = {"user_id": _text(identity, "user-id"), "domain": _text(identity, "domain")}
            arrays = reply.content.array_records.get(self.arrayrecord_key)
            bytes_up = array_nbytes(arrays) if arrays is not None else 0  # as they came, before any decoding
            try:
                self._check_origin(reply, node_id, phase, {item.node_id for item in screened})
                metrics = self._checked_metrics(reply, phase)
                if phase == "train":
                    self._decode_update(reply, node_id)
            except AdapterUpdateError as error:
                self._record_rejected(server_round, node_id, phase, who, str(error))
                continue
            if who["user_id"] is not None:  # the privacy budget is the user's, wherever they connect from
                self.node_users[node_id] = who["user_id"]
            screened.append(Screened(reply, node_id, who, metrics, bytes_up=bytes_up))
        return screened

    def _check_origin(self, reply: Message, node_id: int, phase: str, seen: set[int]) -> None:
        """A reply must answer a message of this round, and a node replies once (a replay counts once at most)."""
        if self._request_of(reply, phase) is None:
            raise AdapterUpdateError(f"the reply answers no {phase} message of this round")
        if node_id in seen:
            raise AdapterUpdateError(f"node {node_id} already replied this round; a second reply is refused")

    def _bounded(self, server_round: int, screened: list[Screened]) -> list[Screened]:
        """Measure each update's norm of change from what its node received; reject or clip those over the bound."""
        for item in screened:
            arrays = item.reply.content[self.arrayrecord_key]
            item.norm = update_norm(self._received(item.node_id), {k: a.numpy() for k, a in arrays.items()})
        limit = self.norm_bound.limit([item.norm for item in screened])
        kept: list[Screened] = []
        for item in screened:
            if refusal := self._norm_refusal(item.norm, limit):
                self._record_rejected(server_round, item.node_id, "train", item.who, refusal)
                continue
            if item.norm > limit:
                self._clip(server_round, item, limit)
            kept.append(item)
        return kept

    def _norm_refusal(self, norm: float, limit: float) -> str | None:
        """Why an update of this norm is refused, if it is (else it is kept, clipped to ``limit`` if over it)."""
        if not math.isfinite(norm):  # bound or not: float64 cannot average it either
            return "update norm overflows float64"
        settings = self.privacy.settings
        if settings.mode.clips_on_device and norm > settings.clipping_norm * (1 + DEVICE_CLIPPING_TOLERANCE):
            return (f"update norm {norm:.6g} is over the clipping norm {settings.clipping_norm:.6g} its device was "
                    "sent (dp = \"client-fixed\": the ClientApp must clip with Flower's fixedclipping_mod)")
        if norm > limit and not self.norm_bound.clip:
            return (f"update norm {norm:.6g} is over the bound {limit:.6g} (run-config max-update-norm, "
                    "norm-bound-relative)")
        return None

    def _clip(self, server_round: int, item: Screened, limit: float) -> None:
        """Scale the reply's change from what its node received down to ``limit``, in place."""
        arrays = item.reply.content[self.arrayrecord_key]
        clipped = clip_update(self._received(item.node_id), {k: a.numpy() for k, a in arrays.items()}, limit, item.norm)
        item.reply.content[self.arrayrecord_key] = ArrayRecord({key: Array(value) for key, value in clipped.items()})
        item.clipped_to = limit
        self.ledger.record_event(self.run_id, "update-clipped", f"update norm {item.norm:.6g} clipped to {limit:.6g}",
                                 round_number=server_round, node_id=item.node_id)

    def _accept(self, server_round: int, screened: list[Screened], phase: str) -> list[Message]:
        """Write each accepted reply's ledger row (with the claimed num-examples), then set its weight by the policy."""
        for item in screened:
            claimed = item.metrics["num-examples"]
            weight = self.example_weights.weight(claimed, self.max_examples_per_client)
            recorded = dict(item.metrics) | {"example-weight": weight}
            if phase == "train":
                recorded["update-norm"] = item.norm
            if item.clipped_to is not None:
                recorded["update-clipped-to"] = item.clipped_to
            self.ledger.record_client_result(
                self.run_id, server_round, node_id=item.node_id, phase=phase, status="ok", **item.who,
                num_examples=int(claimed), metrics=recorded, seconds=float(item.metrics["seconds"]),
                bytes_up=item.bytes_up, bytes_down=self._sent_bytes(item.node_id, phase))
            for key in OPTIONAL_METRICS:  # in the ledger only: Flower aggregates a key only if every reply has it
                item.metrics.pop(key, None)
            item.metrics["num-examples"] = weight
        return [item.reply for item in screened]

    def _record_failed(self, server_round: int, node_id: int, phase: str, error: str, event: str) -> None:
        self.ledger.record_client_result(self.run_id, server_round, node_id=node_id, phase=phase, status="failed",
                                         error=error)
        self.ledger.record_event(self.run_id, "client-failed", event, round_number=server_round, node_id=node_id)

    def _record_rejected(self, server_round: int, node_id: int, phase: str, who: Mapping[str, str | None],
                         error: str) -> None:
        self.ledger.record_client_result(self.run_id, server_round, node_id=node_id, phase=phase, status="rejected",
                                         error=error, **who)
        self.ledger.record_event(self.run_id, "update-rejected", error, round_number=server_round, node_id=node_id)

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
        return metrics

    def _record_missing(self, server_round: int, replies: list[Message], phase: str) -> int:
        """Nodes that were sent a message but never answered (stragglers past the timeout)."""
        answered = {self._node_of(reply, phase) for reply in replies}
        missing = [m.metadata.dst_node_id for m in self._sent.get(phase, []) if m.metadata.dst_node_id not in answered]
        for node_id in missing:
            self._record_failed(server_round, node_id, phase, "no reply before the round timeout",
                                "no reply before the round timeout")
        return len(missing)


def _text(record: ConfigRecord, key: str) -> str | None:
    value = record.get(key)
    return str(value) if value is not None else None

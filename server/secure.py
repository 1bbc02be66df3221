"""Secure aggregation with Flower's SecAgg+: the server learns the weighted average of a round's updates, no single one.

Flower 1.42 ships SecAgg+ only on its legacy path, so with run config ``secure-aggregation = true``
the ServerApp runs Flower's ``DefaultWorkflow`` with a ``LegacyContext``:

- the fit step is Flower's ``SecAggPlusWorkflow`` (Bell et al., 2020) around ``SecureAdapters``, a
  legacy ``FedAvg``. Each device masks its quantized, weighted update with pairwise and private
  masks (client/secure.py); the masks cancel only in the sum. ``aggregate_fit`` receives the
  unmasked average alone: Flower hands it in every result's place, beside each client's metrics;
- the evaluate step is ``FederatedAdapters``' own Message-API evaluation of the new global adapter,
  so every user is scored and recorded exactly as on the plain path.

What the ledger gets per round: the round row, each sampled client's metrics (or its failure) with
the bytes its protocol messages carried both ways, and the aggregate's checkpoint. No per-client
update exists on the server to record. What cannot work on the sum alone (per-domain groups, robust
rules, server-side norm bounds, dp, an unbounded example weight) is refused by shared/config.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from server.aggregation import OPTIONAL_METRICS
from server.strategy import FederatedAdapters, wait_for_nodes
from shared.adapters import AdapterUpdateError, array_nbytes, check_update
from shared.config import FederationConfig
from shared.methods import GLOBAL_GROUP
from shared.secure import ADAPTER_KEYS, max_weight


def payload_bytes(content: RecordDict) -> int:
    """Bytes a message carries: its arrays' data and the byte strings in its config records (keys, shares, masked vectors)."""
    blobs = 0
    for record in content.config_records.values():
        for value in record.values():
            blobs += sum(len(item) for item in (value if isinstance(value, list) else [value]) if isinstance(item, bytes))
    return blobs + sum(array_nbytes(record) for record in content.array_records.values())


class MeteredGrid:
    """A grid that counts, per node, the bytes of every message sent and received: SecAgg+ takes four exchanges a round."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent: Counter[int] = Counter()
        self.received: Counter[int] = Counter()

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            self.sent[message.metadata.dst_node_id] += payload_bytes(message.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                self.received[reply.metadata.src_node_id] += payload_bytes(reply.content)
        return replies

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()


class SecureAdapters(LegacyFedAvg):
    """Flower's legacy FedAvg on the adapter, for SecAgg+: it samples as ``adapters`` would and sees only the average.

    ``keys`` names the legacy parameter list's tensors (the shared part of the adapter, in order); the
    devices receive them in the fit config. The global adapter lives in ``adapters.groups``, so the
    evaluate step and the final save read it as on the plain path.
    """

    def __init__(self, adapters: FederatedAdapters, grid: MeteredGrid, announced: ConfigRecord, keys: list[str]) -> None:
        super().__init__(fraction_fit=adapters.fraction_train, fraction_evaluate=0.0,
                         min_fit_clients=adapters.min_train_nodes, min_evaluate_clients=0,
                         min_available_clients=adapters.min_available_nodes, on_fit_config_fn=self._fit_config,
                         initial_parameters=self._parameters(adapters.groups[GLOBAL_GROUP], keys))
        self.adapters, self.grid, self.announced, self.keys = adapters, grid, announced, keys
        self.ledger, self.run_id = adapters.ledger, adapters.run_id
        self.sampled: list[int] = []
        self.open_round: int | None = None  # started in the ledger, not yet aggregated

    @staticmethod
    def _parameters(arrays: ArrayRecord, keys: list[str]) -> Parameters:
        return ndarrays_to_parameters([arrays[key].numpy() for key in keys])

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        # A list of names is a ConfigRecord value Flower carries, though the legacy Scalar type omits it.
        return {**self.announced, "server-round": server_round, ADAPTER_KEYS: list(self.keys)}  # type: ignore[dict-item]

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        # Flower's legacy sampler waits up to a day for its minimum: the run's own deadline first.
        wait_for_nodes(self.grid, max(self.min_available_clients, self.min_fit_clients), self.adapters.node_wait_seconds)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = [proxy.node_id for proxy, _ in instructions]
        self.grid.reset()
        self.open_round = server_round
        sent = sum(len(tensor) for tensor in parameters.tensors)
        self.ledger.start_round(self.run_id, server_round, clients_sampled=len(instructions),
                                bytes_down=sent * len(instructions))
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record each client's metrics, take SecAgg+'s average as the new global adapter, checkpoint it."""
        with self.ledger.batch():
            replied = [proxy.node_id for proxy, _ in results]
            weighted = [self._record_result(server_round, proxy.node_id, result) for proxy, result in results]
            self._record_dropped(server_round, [node for node in self.sampled if node not in replied],
                                 "dropped out of the SecAgg+ round before its masked update reached the server")
            # Every result carries the same average (SecAgg+ puts it in each one's place): FedAvg returns it.
            parameters, _ = super().aggregate_fit(server_round, results, failures)
            if parameters is not None:
                self._update_global(server_round, parameters)
            metrics = self.adapters.train_metrics_aggr_fn(weighted, self.adapters.weighted_by_key) if weighted else None
            self.ledger.finish_round(self.run_id, server_round, clients_replied=len(results),
                                     clients_failed=len(self.sampled) - len(results), metrics=dict(metrics or {}),
                                     bytes_up=sum(self.grid.received.values()))
            self.open_round = None
        return parameters, dict(metrics or {})

    def _update_global(self, server_round: int, parameters: Parameters) -> None:
        values = [value.astype("float32") for value in parameters_to_ndarrays(parameters)]
        arrays = ArrayRecord({key: Array(value) for key, value in zip(self.keys, values, strict=True)})
        try:
            check_update(arrays, self.adapters.expected_shapes, self.adapters.max_update_bytes)
        except AdapterUpdateError as error:  # the sum of masked vectors of the wrong shape, or overflowed
            self.ledger.record_event(self.run_id, "round-not-aggregated", f"the secure aggregate is unusable "
                                     f"({error}); the adapters are kept", round_number=server_round)
            return
        self.adapters.groups[GLOBAL_GROUP] = arrays
        if self.adapters.checkpoints.due(server_round):
            self.ledger.save_checkpoint(self.run_id, server_round, {key: arrays[key].numpy() for key in self.keys})

    def _record_result(self, server_round: int, node_id: int, result: FitRes) -> RecordDict:
        """Write one client's ledger row (its metrics, no update); return its metrics weighted as SecAgg+ weighed it."""
        numbers = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
        identity = {key.replace("-", "_"): str(result.metrics[key]) for key in ("user-id", "domain")
                    if key in result.metrics}
        self.ledger.record_client_result(
            self.run_id, server_round, node_id=node_id, phase="train", status="ok", **identity,
            num_examples=int(numbers.get("num-examples", 0)), metrics=numbers | {"example-weight": result.num_examples},
            seconds=float(numbers.get("seconds", 0.0)), bytes_up=self.grid.received[node_id],
            bytes_down=self.grid.sent[node_id])
        common = {key: value for key, value in numbers.items() if key not in OPTIONAL_METRICS}  # as the plain path averages
        return RecordDict({"metrics": MetricRecord(common | {"num-examples": result.num_examples})})

    def _record_dropped(self, server_round: int, nodes: list[int], reason: str) -> None:
        for node_id in nodes:
            self.ledger.record_client_result(self.run_id, server_round, node_id=node_id, phase="train",
                                             status="failed", error=reason, bytes_up=self.grid.received[node_id],
                                             bytes_down=self.grid.sent[node_id])
            self.ledger.record_event(self.run_id, "client-failed", reason, round_number=server_round, node_id=node_id)

    def close_halted_round(self) -> None:
        """Finish a round whose SecAgg+ protocol halted before aggregating: the adapters are kept."""
        if self.open_round is None:
            return
        server_round, self.open_round = self.open_round, None
        with self.ledger.batch():
            self._record_dropped(server_round, self.sampled, "the SecAgg+ round halted: too few of its nodes "
                                 "stayed to reach the reconstruction threshold")
            self.ledger.record_event(self.run_id, "round-not-aggregated", "SecAgg+ halted (too few nodes stayed for "
                                     "secagg-reconstruction-threshold); the adapters are kept", round_number=server_round)
            self.ledger.finish_round(self.run_id, server_round, clients_replied=0, clients_failed=len(self.sampled),
                                     metrics={}, bytes_up=sum(self.grid.received.values()))


class SecureFit:
    """The fit step: Flower's SecAgg+ workflow, then the ledger's round closed if the protocol halted."""

    def __init__(self, workflow: SecAggPlusWorkflow, strategy: SecureAdapters) -> None:
        self.workflow, self.strategy = workflow, strategy

    def __call__(self, grid: Grid, context: Context) -> None:
        self.workflow(grid, context)
        self.strategy.close_halted_round()


class EvaluateGlobal:
    """The evaluate step: ``FederatedAdapters``' Message-API evaluation of the global adapter, recorded as ever."""

    def __init__(self, adapters: FederatedAdapters, announced: ConfigRecord, timeout: float) -> None:
        self.adapters, self.announced, self.timeout = adapters, announced, timeout

    def __call__(self, grid: Grid, context: Context) -> None:
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        messages = list(self.adapters.configure_evaluate(server_round, self.adapters.groups[GLOBAL_GROUP],
                                                         ConfigRecord(dict(self.announced)), grid))
        if messages:
            self.adapters.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=self.timeout))


def secagg_workflow(config: FederationConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the run config's settings."""
    return SecAggPlusWorkflow(num_shares=config.secagg_num_shares,
                              reconstruction_threshold=config.secagg_reconstruction_threshold,
                              max_weight=max_weight(config), clipping_range=config.secagg_clipping_range,
                              quantization_range=config.secagg_quantization_range, timeout=config.round_timeout)


def run_secure_rounds(grid: Grid, context: Context, adapters: FederatedAdapters, config: FederationConfig,
                      initial: ArrayRecord, announced: ConfigRecord) -> SecureAdapters:
    """Run the run's rounds with SecAgg+ training and the plain path's evaluation; returns the legacy strategy."""
    keys = [key for key in initial.keys() if adapters.method.shared_key(key)]
    adapters.groups[GLOBAL_GROUP] = ArrayRecord({key: initial[key] for key in keys})
    metered = MeteredGrid(grid)
    strategy = SecureAdapters(adapters, metered, announced, keys)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=config.num_server_rounds,
                                                        round_timeout=config.round_timeout), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecureFit(secagg_workflow(config), strategy),
                               evaluate_workflow=EvaluateGlobal(adapters, announced, config.round_timeout))
    workflow(metered, legacy)  # type: ignore[arg-type]  # a Grid in all but name
    return strategy

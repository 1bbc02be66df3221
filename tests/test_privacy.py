"""User-level differential privacy: the accountant, Flower's DP wrappers around the strategy, the budget ledger.

The accountant's epsilons are dp-accounting's (checked against the Gaussian mechanism's exact
curve, Balle & Wang 2018); the wrappers clip and noise as computed by hand; a user at their budget
stops being sampled; the ledger keeps it all, on SQLite and PostgreSQL; operators read it back.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAvg)
from scipy.optimize import brentq
from scipy.stats import norm
from typer.testing import CliRunner

from server.aggregation import aggregate_group, make_rule, with_privacy
from server.ledger import Ledger, LedgerError, PrivacyChargeRecord, PrivacyRoundRecord, migrate
from server.operator.cli import app as ops
from server.operator.dashboard import create_app
from server.privacy import (PrivacyAccount, PrivacySettings, Release, gaussian_epsilon, noise_for_epsilon,
                            run_epsilon)
from server.strategy import FederatedAdapters
from shared.config import ConfigError, FederationConfig
from shared.methods import METHODS, Aggregation, DpMode, ExampleWeights
from tests.test_ledger import Target, ledger_url, postgres_admin  # noqa: F401
from tests.test_strategy import (SHAPES, FakeGrid, arrays, metrics, one_round, reply_to,  # noqa: F401
                                 task_identity)

DELTA = 1e-5
UNIT = math.sqrt(12)  # the norm of a change of 1.0 on each of SHAPES' 12 values
ONE_ROUND = gaussian_epsilon([1.0], DELTA)  # 4.73: a user's epsilon after one round at noise multiplier 1
BUDGET = 5.0  # one round fits, a second (7.08) does not


def private(mode=DpMode.SERVER_FIXED, noise=1.0, clip=1.0, **kwargs) -> PrivacySettings:
    return PrivacySettings(mode, noise_multiplier=noise, clipping_norm=clip, delta=DELTA, **kwargs)


def dp_strategy(ledger, privacy: PrivacySettings, nodes=(11, 12, 13), min_train=None, run_id=None, **kwargs):
    """FederatedAdapters under ``privacy`` with uniform weights, as config validation requires; a new run unless ``run_id``."""
    run_id = run_id or ledger.start_run(99, {"dp-user-budget": privacy.user_budget}, "tiny", "f" * 64)
    minimum = min_train or len(nodes)
    strategy = FederatedAdapters(ledger, run_id, METHODS["fedavg"], adapter_shapes=SHAPES, max_update_bytes=10_000,
                                 node_wait_seconds=5, evaluate_rounds={99}, example_weights=ExampleWeights.UNIFORM,
                                 privacy=privacy, min_train_nodes=minimum, min_available_nodes=minimum, **kwargs)
    return strategy, run_id


def answers(nodes, value=0.1):
    return {node: (value, 10, "a") for node in nodes}


def everywhere(aggregated: ArrayRecord, expected: float) -> None:
    for key in SHAPES:
        np.testing.assert_allclose(aggregated[key].numpy(), np.full(SHAPES[key], expected), rtol=1e-5)


# --- the accountant -----------------------------------------------------------------------------


def test_the_run_epsilon_is_dp_accountings_own_for_the_poisson_subsampled_gaussian():
    releases = [Release(0.1, 1.1)] * 5 + [Release(0.25, 1.1)] * 3
    accountant = RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.1)), 5)
    accountant.compose(dp_event.PoissonSampledDpEvent(0.25, dp_event.GaussianDpEvent(1.1)), 3)
    assert run_epsilon(releases, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)


@pytest.mark.parametrize("noise_multiplier", [1.0, 2.0])
def test_a_users_epsilon_bounds_the_gaussian_mechanisms_exact_curve_tightly(noise_multiplier):
    """One round without sampling is the Gaussian mechanism: RDP's epsilon is above its exact one, and close."""
    def delta(epsilon):  # Balle & Wang (2018), Theorem 8, sensitivity 1
        sigma = noise_multiplier
        return norm.cdf(1 / (2 * sigma) - epsilon * sigma) - math.exp(epsilon) * norm.cdf(-1 / (2 * sigma) - epsilon * sigma)

    exact = brentq(lambda epsilon: delta(epsilon) - DELTA, 1e-3, 100)
    assert exact < gaussian_epsilon([noise_multiplier], DELTA) < 1.15 * exact
    assert run_epsilon([Release(1.0, noise_multiplier)], DELTA) == pytest.approx(gaussian_epsilon([noise_multiplier], DELTA))


def test_epsilon_grows_with_rounds_and_sampling_rate_and_shrinks_with_noise():
    by_rounds = [run_epsilon([Release(0.2, 1.0)] * rounds, DELTA) for rounds in (1, 2, 4, 8)]
    by_rate = [run_epsilon([Release(rate, 1.0)] * 4, DELTA) for rate in (0.05, 0.2, 0.5, 1.0)]
    by_noise = [run_epsilon([Release(0.2, noise)] * 4, DELTA) for noise in (0.7, 1.0, 2.0)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == 4
    assert by_noise == sorted(by_noise, reverse=True)
    assert run_epsilon([Release(1.0, 0.0)], DELTA) == math.inf  # clipping alone buys no privacy


def test_the_noise_for_a_target_epsilon_gives_that_epsilon_back():
    noises = [noise_for_epsilon(target, 3, 1.0, DELTA) for target in (1.0, 4.0, 8.0)]
    for target, noise in zip((1.0, 4.0, 8.0), noises):
        assert gaussian_epsilon([noise] * 3, DELTA) == pytest.approx(target, rel=1e-4)  # a user in all 3 rounds
    assert noises == sorted(noises, reverse=True)
    noise = noise_for_epsilon(4.0, 10, 0.3, DELTA)
    assert run_epsilon([Release(0.3, noise)] * 10, DELTA) == pytest.approx(4.0, rel=1e-4)


def test_the_account_charges_each_user_their_own_rounds_and_a_second_device_halves_their_noise():
    account = PrivacyAccount(private(user_budget=BUDGET))
    first = account.release(2, 4, {"ann": 1, "bob": 1})
    second = account.release(2, 4, {"ann": 1, "cy": 2})
    assert first.run_epsilon == pytest.approx(run_epsilon([Release(0.5, 1.0)], DELTA))
    assert second.run_epsilon == pytest.approx(run_epsilon([Release(0.5, 1.0)] * 2, DELTA))
    assert second.round_epsilon == pytest.approx(first.run_epsilon)
    assert account.user_epsilon("ann") == pytest.approx(gaussian_epsilon([1.0, 1.0], DELTA))
    assert account.user_epsilon("bob") == pytest.approx(ONE_ROUND)
    assert second.users["cy"].noise_multiplier == 0.5 and second.users["cy"].epsilon == pytest.approx(
        gaussian_epsilon([0.5], DELTA))
    assert account.user_epsilon("dan") == 0.0
    assert [account.allows(user) for user in ("ann", "bob", "cy", "dan")] == [False, False, False, True]
    assert PrivacyAccount(private()).allows("ann")  # no budget: nobody is stopped
    with pytest.raises(ValueError, match="between 1 and the 4 available"):
        account.release(5, 4, {})


# --- Flower's wrappers around the strategy ------------------------------------------------------


@pytest.mark.parametrize("mode, flower_class", [
    (DpMode.SERVER_FIXED, DifferentialPrivacyServerSideFixedClipping),
    (DpMode.CLIENT_FIXED, DifferentialPrivacyClientSideFixedClipping),
    (DpMode.SERVER_ADAPTIVE, DifferentialPrivacyServerSideAdaptiveClipping),
])
def test_each_mode_wraps_the_rule_in_its_flower_wrapper(mode, flower_class):
    rule = make_rule(Aggregation.FEDAVG)
    wrapped = with_privacy(rule, private(mode, clipped_count_stddev=5.0))
    assert isinstance(wrapped, flower_class) and wrapped.strategy is rule
    assert with_privacy(rule, private(DpMode.OFF)) is rule


def test_server_side_clipping_clips_each_change_over_the_norm_then_averages(ledger):
    strategy, run_id = dp_strategy(ledger, private(noise=0.0, clip=1.0))
    _, (aggregated, _) = one_round(strategy, [11, 12, 13], {11: (1.0, 10, "a"), 12: (0.1, 10, "a"),
                                                            13: (2.0, 500, "a")}, initial=0.0)
    # 11 and 13 are over the norm (UNIT, 2 UNIT): each is scaled to norm 1, 1 / UNIT a value; 12 (0.35) is kept
    everywhere(aggregated, (1 / UNIT + 0.1 + 1 / UNIT) / 3)
    assert strategy.groups["global"] is aggregated
    norms = {r.node_id: r.metrics["update-norm"] for r in ledger.client_results(run_id, 1)}
    assert norms["13"] == pytest.approx(2 * UNIT)  # the ledger keeps what the client sent


def test_clipping_is_on_the_change_from_what_each_node_was_sent(ledger):
    strategy, _ = dp_strategy(ledger, private(noise=0.0, clip=1.0))
    _, (aggregated, _) = one_round(strategy, [11, 12, 13], answers([11, 12, 13], 5.0 + 0.1), initial=5.0)
    everywhere(aggregated, 5.1)  # a change of 0.1 a value (norm 0.35) is under the norm, whatever the weights are


def test_tensors_are_paired_by_name_whatever_order_a_reply_sends_them_in():
    current = ArrayRecord({"a": Array(np.zeros(4, np.float32)), "b": Array(np.full(4, 10.0, np.float32))})
    swapped = ArrayRecord({"b": Array(np.full(4, 10.5, np.float32)), "a": Array(np.full(4, 0.5, np.float32))})
    reply = Message(RecordDict({"arrays": swapped, "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=1,
                    message_type=MessageType.TRAIN)
    aggregated = aggregate_group(with_privacy(FedAvg(), private(noise=0.0, clip=10.0)), 1, current, [reply])
    np.testing.assert_allclose(aggregated["a"].numpy(), 0.5)
    np.testing.assert_allclose(aggregated["b"].numpy(), 10.5)


def noise_replies(count: int, size: int) -> list[Message]:
    return [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(size, 0.001 * (i + 1), np.float64))}),
                                "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=i + 1,
                    message_type=MessageType.TRAIN) for i in range(count)]


def test_the_noise_is_noise_multiplier_times_clipping_norm_over_the_replies():
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    size, replies = 40_000, 4
    rule = with_privacy(FedAvg(), private(noise=2.0, clip=0.5, expected_replies=10))  # built for 10 replies...
    current = ArrayRecord({"w": Array(np.zeros(size))})
    aggregated = aggregate_group(rule, 1, current, noise_replies(replies, size))["w"].numpy()
    noise = aggregated - 0.001 * (1 + 2 + 3 + 4) / replies
    assert abs(noise.mean()) < 0.05 * 0.25 / 3
    assert noise.std() == pytest.approx(2.0 * 0.5 / replies, rel=0.03)  # ...noised for the 4 it got: 0.25, not 0.1


def test_adaptive_clipping_noises_at_the_norm_the_round_clipped_to(ledger):
    np.random.seed(3)
    size, replies = 40_000, 4
    rule = with_privacy(FedAvg(), private(DpMode.SERVER_ADAPTIVE, noise=1.0, clip=0.001, clipped_count_stddev=5.0,
                                          expected_replies=replies))
    current = ArrayRecord({"w": Array(np.zeros(size))})
    aggregated = aggregate_group(rule, 1, current, noise_replies(replies, size))["w"].numpy()
    # every change (norm 0.2 to 0.8) is clipped to the round's norm 0.001: 0.001 / 200 a value
    noise = aggregated - 0.001 / math.sqrt(size)
    assert abs(rule.clipping_norm - 0.001) > 0.0002  # the norm moved after the round (Flower noised at the new one)
    assert noise.std() == pytest.approx(rule.noise_multiplier * 0.001 / replies, rel=0.03)


def test_client_side_clipping_sends_the_norm_and_refuses_an_update_its_device_did_not_clip(ledger):
    strategy, run_id = dp_strategy(ledger, private(DpMode.CLIENT_FIXED, noise=0.0, clip=1.0))
    sent, (aggregated, _) = one_round(strategy, [11, 12, 13], {11: (0.2, 10, "a"), 12: (0.1, 10, "a"),
                                                               13: (1.0, 10, "a")})
    assert all(message.content["config"]["clipping_norm"] == 1.0 for message in sent)
    everywhere(aggregated, (0.2 + 0.1) / 2)
    (refused,) = [r for r in ledger.client_results(run_id, 1) if r.status == "rejected"]
    assert refused.node_id == "13" and "fixedclipping_mod" in refused.error


def unclipped_client(message: Message, _context: Context) -> Message:
    """A device that trained an update of norm 2 UNIT and does not clip it."""
    return reply_to(message, RecordDict({"arrays": arrays(2.0), "metrics": metrics(10),
                                         "identity": ConfigRecord({"user-id": f"u{message.metadata.dst_node_id}"})}))


def test_flowers_fixedclipping_mod_on_our_messages_clips_what_the_server_then_accepts(ledger):
    strategy, run_id = dp_strategy(ledger, private(DpMode.CLIENT_FIXED, noise=0.0, clip=1.0), nodes=(11, 12))
    sent = list(strategy.configure_train(1, arrays(0.0), ConfigRecord({"base-hash": "x"}), FakeGrid([11, 12])))

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    replies = [fixedclipping_mod(message, context, unclipped_client) for message in sent]
    aggregated, _ = strategy.aggregate_train(1, replies)
    everywhere(aggregated, 1 / UNIT)
    assert {r.status for r in ledger.client_results(run_id, 1)} == {"ok"}


def test_the_devices_clipping_mod_clips_only_when_the_run_clips_on_the_device(ledger):
    from client.privacy import dp_clipping_mod

    strategy, run_id = dp_strategy(ledger, private(DpMode.CLIENT_FIXED, noise=0.0, clip=1.0), nodes=(11, 12))
    sent = list(strategy.configure_train(1, arrays(0.0), ConfigRecord({"base-hash": "x"}), FakeGrid([11, 12])))

    def context(dp: str) -> Context:
        run_config = {"dp": dp, "example-weights": "uniform"} if dp != "off" else {"dp": dp}
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    passed = dp_clipping_mod(sent[0], context("off"), unclipped_client)  # off: the update leaves as trained
    np.testing.assert_array_equal(passed.content["arrays"]["layer.lora_A.weight"].numpy(),
                                  arrays(2.0)["layer.lora_A.weight"].numpy())
    replies = [dp_clipping_mod(message, context("client-fixed"), unclipped_client) for message in sent]
    aggregated, _ = strategy.aggregate_train(1, replies)
    everywhere(aggregated, 1 / UNIT)
    assert {r.status for r in ledger.client_results(run_id, 1)} == {"ok"}


# --- the budget ledger --------------------------------------------------------------------------


def test_a_user_at_their_budget_is_not_sampled_again_and_the_ledger_says_so(ledger):
    strategy, run_id = dp_strategy(ledger, private(user_budget=BUDGET), nodes=(11, 12))
    one_round(strategy, [11, 12], answers([11, 12]))
    sent, _ = one_round(strategy, [11, 12, 13, 14], answers([11, 12, 13, 14]), server_round=2)
    assert sorted(m.metadata.dst_node_id for m in sent) == [13, 14]  # u11 and u12 spent 4.73 of 5
    sent, (aggregated, _) = one_round(strategy, [11, 12, 13, 14], answers([11, 12, 13, 14]), server_round=3)
    assert sent == []

    events = [(e.kind, e.round_number, e.node_id) for e in ledger.events(run_id) if e.kind.startswith("privacy")]
    assert events == [("privacy-budget-reached", 2, "11"), ("privacy-budget-reached", 2, "12"),
                      ("privacy-budget-reached", 3, "13"), ("privacy-budget-reached", 3, "14"),
                      ("privacy-budget-exhausted", 3, None)]
    assert "'u11' has spent epsilon 4.729 of dp-user-budget 5" in ledger.events(run_id)[0].message
    releases = ledger.privacy_rounds(run_id)
    assert [(r.round_number, r.sampled, r.available, r.sampling_rate) for r in releases] == [(1, 2, 2, 1.0),
                                                                                             (2, 2, 2, 1.0)]
    assert releases[1].epsilon == pytest.approx(run_epsilon([Release(1.0, 1.0)] * 2, DELTA))
    charges = ledger.privacy_charges(run_id)
    assert [(c.round_number, c.user_id, c.rounds) for c in charges] == [(1, "u11", 1), (1, "u12", 1),
                                                                        (2, "u13", 1), (2, "u14", 1)]
    assert all(c.epsilon == pytest.approx(ONE_ROUND) and c.epsilon <= BUDGET for c in charges)


def test_the_sampling_rate_is_the_sampled_share_of_the_nodes_within_budget(ledger):
    random.seed(1)  # Flower's sampler
    strategy, run_id = dp_strategy(ledger, private(), nodes=(11, 12, 13, 14), min_train=2, fraction_train=0.5)
    sent, _ = one_round(strategy, [11, 12, 13, 14], answers([11, 12, 13, 14]))
    (release,) = ledger.privacy_rounds(run_id)
    assert (release.sampled, release.available, release.sampling_rate) == (2, 4, 0.5)
    assert release.epsilon == pytest.approx(run_epsilon([Release(0.5, 1.0)], DELTA))
    assert release.epsilon < ONE_ROUND  # amplified by sampling; the users who took part are not
    charged = {c.user_id: c.epsilon for c in ledger.privacy_charges(run_id)}
    assert charged == pytest.approx({f"u{m.metadata.dst_node_id}": ONE_ROUND for m in sent})


def test_a_sampled_user_is_charged_even_when_their_update_is_rejected(ledger):
    strategy, run_id = dp_strategy(ledger, private(DpMode.CLIENT_FIXED, user_budget=BUDGET))
    one_round(strategy, [11, 12, 13], {11: (0.1, 10, "a"), 12: (0.1, 10, "a"), 13: (5.0, 10, "a")})
    assert {c.user_id for c in ledger.privacy_charges(run_id)} == {"u11", "u12", "u13"}


def test_a_round_without_an_aggregate_releases_nothing_and_charges_nobody(ledger):
    strategy, run_id = dp_strategy(ledger, private(DpMode.CLIENT_FIXED))
    one_round(strategy, [11, 12, 13], answers([11, 12, 13], 5.0))  # every update refused: over the norm
    assert ledger.privacy_rounds(run_id) == [] and ledger.privacy_charges(run_id) == []


def test_a_resumed_run_continues_the_account_and_remembers_who_was_stopped(ledger):
    strategy, run_id = dp_strategy(ledger, private(user_budget=BUDGET), nodes=(11, 12))
    one_round(strategy, [11, 12], answers([11, 12]))
    one_round(strategy, [11, 12, 13, 14], answers([11, 12, 13, 14]), server_round=2)
    resumed, _ = dp_strategy(ledger, private(user_budget=BUDGET), nodes=(11, 12), run_id=run_id)
    resumed.restore(ledger.resume_run(run_id, 100))
    assert resumed.privacy.releases == strategy.privacy.releases and resumed.privacy.users == strategy.privacy.users
    sent, _ = one_round(resumed, [11, 12, 13, 14, 15, 16], answers([11, 12, 13, 14, 15, 16]), server_round=3)
    assert sorted(m.metadata.dst_node_id for m in sent) == [15, 16]
    reached = [e for e in ledger.events(run_id) if e.kind == "privacy-budget-reached"]
    assert len(reached) == 4  # not again after the resume
    assert ledger.privacy_rounds(run_id)[-1].epsilon == pytest.approx(run_epsilon([Release(1.0, 1.0)] * 3, DELTA))


# --- the ledger's tables ------------------------------------------------------------------------


def test_the_privacy_migration_applies_to_a_ledger_with_runs_and_a_resume_drops_unfinished_releases(
        ledger_url: Target):
    with ledger_url.open() as ledger:
        with ledger.engine.begin() as connection:
            migrate.downgrade(connection, "0001")
        run_id = ledger.start_run(7, {}, "tiny", "ab" * 32)  # a ledger from before the privacy tables
        for number in (1, 2):
            ledger.start_round(run_id, number, clients_sampled=2, bytes_down=1)
        ledger.finish_round(run_id, 1, clients_replied=2, clients_failed=0, metrics={}, bytes_up=1)
        with ledger.engine.begin() as connection:
            migrate.upgrade(connection)
            assert migrate.current_revision(connection) == "0002"
        for number, epsilon in ((1, 4.5), (2, math.inf)):  # an infinite epsilon (no noise) is kept as such
            ledger.record_privacy(PrivacyRoundRecord(run_id, number, "server-fixed", 1.0, 0.5, 2, 4, 0.5, DELTA,
                                                     epsilon, epsilon),
                                  [PrivacyChargeRecord(run_id, number, "ann", 1, 1.0, number, epsilon)])
        with pytest.raises(LedgerError, match="already has a private release"):
            ledger.record_privacy(PrivacyRoundRecord(run_id, 1, "server-fixed", 1.0, 0.5, 2, 4, 0.5, DELTA, 1, 1), [])
        assert [r.epsilon for r in ledger.privacy_rounds(run_id)] == [4.5, math.inf]
        assert [(c.round_number, c.epsilon) for c in ledger.privacy_charges(run_id)] == [(1, 4.5), (2, math.inf)]
        assert ledger.resume_run(run_id, 8) == 1  # round 2 never finished: its release goes with it
        assert [r.round_number for r in ledger.privacy_rounds(run_id)] == [1]
        assert [c.round_number for c in ledger.privacy_charges(run_id)] == [1]


# --- operators ----------------------------------------------------------------------------------


@pytest.fixture
def private_run(ledger):
    strategy, run_id = dp_strategy(ledger, private(user_budget=BUDGET), nodes=(11, 12))
    one_round(strategy, [11, 12], answers([11, 12]))
    one_round(strategy, [11, 12, 13, 14], answers([11, 12, 13, 14]), server_round=2)
    return str(ledger.engine.url), run_id


def test_fedgraft_ops_privacy_prints_epsilon_per_round_and_per_user(private_run):
    url, run_id = private_run
    result = CliRunner().invoke(ops, ["privacy", str(run_id), "--db", url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "Private releases of run 1: dp = server-fixed, delta 1e-05" in result.output
    rounds = [line for line in lines if line.startswith("│     ")]
    assert len(rounds) == 2 and "4.7285" in rounds[0] and "7.0774" in rounds[1]
    users = [line for line in lines if "│ u1" in line]
    assert len(users) == 4 and all("4.7285" in line and "0.2715" in line for line in users)  # 5 - 4.7285 left
    assert "budget: 5.0000" in result.output


def test_fedgraft_ops_privacy_says_when_a_run_has_none(ledger):
    run_id = ledger.start_run(5, {}, "tiny", "f" * 64)
    result = CliRunner().invoke(ops, ["privacy", str(run_id), "--db", str(ledger.engine.url)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "no private release recorded" in result.output and "no user charged" in result.output


def test_the_dashboard_shows_the_runs_privacy(private_run):
    from starlette.testclient import TestClient

    url, run_id = private_run
    with TestClient(create_app(url)) as client:
        page = client.get(f"/runs/{run_id}").text
    assert 'id="privacy-rounds"' in page and 'id="privacy-users"' in page
    assert page.count("<td>server-fixed</td>") == 2 and "u14" in page and "0.2715" in page


# --- run config ---------------------------------------------------------------------------------


PRIVATE = {"dp": "server-fixed", "example-weights": "uniform"}


@pytest.mark.parametrize("run_config, message", [
    ({"dp": "on"}, "dp must be one of"),
    ({"dp": "server-fixed"}, 'dp needs example-weights = "uniform"'),
    (PRIVATE | {"method": "domain"}, "a per-domain method releases two aggregates"),
    (PRIVATE | {"method": "dual-domain"}, "a per-domain method releases two aggregates"),
    (PRIVATE | {"method": "local"}, "no update leaves the device"),
    (PRIVATE | {"aggregation": "fedadam"}, "a server optimizer transforms the mean"),
    (PRIVATE | {"aggregation": "fedmedian", "min-train-nodes": 3}, "a robust rule is no mean"),
    ({"dp-user-budget": 4.0}, "dp-user-budget needs dp on"),
    (PRIVATE | {"dp-user-budget": 4.0, "dp-noise-multiplier": 0.0}, "spends an infinite epsilon"),
    (PRIVATE | {"dp": "server-adaptive"}, r"dp-noise-multiplier < 2 x dp-clipped-count-stddev \(0.1"),
    ({"dp-delta": 0.0}, r"dp-delta must be in \(0, 1\)"),
    ({"dp-clipping-norm": 0.0}, "dp-clipping-norm must be > 0"),
    ({"dp-noise-multiplier": -1.0}, "dp-noise-multiplier must be >= 0"),
    ({"dp-target-quantile": 1.5}, "dp-target-quantile must be in"),
])
def test_a_private_run_config_that_would_not_protect_each_user_is_refused(run_config, message):
    with pytest.raises(ConfigError, match=message):
        FederationConfig.from_run_config(run_config)


def test_a_budget_below_one_rounds_epsilon_is_refused_before_the_run_starts():
    config = FederationConfig.from_run_config(PRIVATE | {"dp-user-budget": 4.0})  # one round at sigma 1: 4.73
    with pytest.raises(ConfigError, match="dp-user-budget 4 is below one round's epsilon 4.729"):
        PrivacySettings.from_config(config)


@pytest.mark.parametrize("run_config", [
    PRIVATE | {"method": "fedsa", "dp": "client-fixed"},
    PRIVATE | {"method": "ditto", "aggregation": "fedprox", "dp-user-budget": 8.0},
    PRIVATE | {"dp": "server-adaptive", "dp-clipped-count-stddev": 1.0},
    PRIVATE | {"dp-noise-multiplier": 0.0},  # clipping alone: allowed, its epsilon is infinite
])
def test_private_run_configs_where_the_noise_covers_each_user_are_accepted(run_config):
    config = FederationConfig.from_run_config(run_config)
    settings = PrivacySettings.from_config(config)
    assert settings.mode is DpMode(run_config["dp"]) and settings.expected_replies == config.min_train_nodes
    assert with_privacy(make_rule(Aggregation(config.aggregation)), settings).strategy is not None


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.simulation
def test_a_private_simulation_records_its_epsilon_stops_users_at_their_budget_and_still_evaluates(tiny_base, tmp_path):
    """A real `flwr run`: round 1 trains every user (4.73 of a budget of 5), round 2 none; the last evaluation runs."""
    from simulations.run import run_simulation

    users = 3
    run_config = PRIVATE | {
        "base-model": str(tiny_base), "base-dtype": "float32", "num-server-rounds": 2, "min-train-nodes": users,
        "local-steps": 2, "batch-size": 2, "seq-len": 32, "lora-dropout": 0.0, "max-eval-blocks": 4,
        "min-speeches": 60, "node-wait-seconds": 120, "round-timeout": 300, "dp-clipping-norm": 0.05,
        "dp-noise-multiplier": 1.0, "dp-user-budget": BUDGET,
    }
    finished = run_simulation(users, run_config, tmp_path, cpus_per_client=2, timeout=600)
    with Ledger(finished.ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == finished.flower_run_id]
        assert run.status == "completed"
        (release,) = ledger.privacy_rounds(run.id)
        assert (release.round_number, release.sampled, release.available, release.clipping_norm) == (1, users, users, 0.05)
        assert release.epsilon == pytest.approx(ONE_ROUND)
        charges = ledger.privacy_charges(run.id)
        assert len(charges) == users and all(c.epsilon == pytest.approx(ONE_ROUND) for c in charges)
        kinds = [e.kind for e in ledger.events(run.id)]
        assert kinds.count("privacy-budget-reached") == users and "privacy-budget-exhausted" in kinds
        assert [r.clients_sampled for r in ledger.rounds(run.id)] == [users, 0]
        evaluated = [c for c in ledger.client_results(run.id, 2) if c.phase == "evaluate" and c.status == "ok"]
        assert len(evaluated) == users
        assert {c.user_id for c in charges} == {c.user_id for c in evaluated}

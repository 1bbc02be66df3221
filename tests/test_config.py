import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, FederationConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_matches_the_dataclass_defaults():
    run_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert FederationConfig.from_run_config(run_config) == FederationConfig()
    assert set(run_config) == set(FederationConfig().as_run_config())


def test_values_are_coerced_and_read():
    config = FederationConfig.from_run_config({"num-server-rounds": 5, "learning-rate": 1, "lora-target-modules": "q_proj, k_proj"})
    assert config.num_server_rounds == 5
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.target_modules == ["q_proj", "k_proj"]
    for raw, expected in ((True, True), ("false", False), ("Yes", True), ("0", False), (1, True)):
        assert FederationConfig.from_run_config({"activation-checkpointing": raw}).activation_checkpointing is expected


@pytest.mark.parametrize(
    "run_config, message",
    [
        ({"num-server-round": 3}, "Unknown run-config key 'num-server-round'"),
        # where users come from is each device's own node config, never the run's
        ({"data": "shakespeare"}, "Unknown run-config key 'data'"),
        ({"num-server-rounds": "three"}, "'num-server-rounds' expects int"),
        ({"num-server-rounds": 2.5}, "'num-server-rounds' expects int"),
        ({"local-steps": 0}, "local-steps must be > 0"),
        ({"fraction-train": 1.5}, "fraction-train must be in"),
        ({"split": "by-act"}, "split must be one of"),
        ({"base-dtype": "int3"}, "base-dtype must be one of"),
        ({"learning-rate": float("nan")}, "'learning-rate' expects float"),
        ({"lora-target-modules": " , "}, "lora-target-modules must name"),
        ({"validation-fraction": 0.7}, "validation-fraction must be in"),
        ({"validate-every": 0}, "validate-every must be > 0"),
        ({"micro-batch-size": 0}, "micro-batch-size must be > 0"),
        ({"personal-learning-rate": -0.1}, "personal-learning-rate must be >= 0"),
        ({"activation-checkpointing": "ture"}, "'activation-checkpointing' expects bool"),
        ({"activation-checkpointing": 2}, "'activation-checkpointing' expects bool"),
        # poisoning defence and attack harness (docs/trust.md)
        ({"norm-bound-mode": "drop"}, "norm-bound-mode must be one of"),
        ({"max-update-norm": -1.0}, "max-update-norm must be >= 0"),
        ({"example-weights": "capped"}, "needs max-examples-per-client > 0"),
        ({"trim-beta": 0.5}, "trim-beta must be in"),
        ({"attack": "backdoor"}, "attack must be one of"),
        ({"attack-fraction": 1.5}, "attack-fraction must be in"),
        ({"byzantine-clients": 1}, "byzantine-clients is read only by krum, multikrum and bulyan, not 'fedavg'"),
        ({"aggregation": "krum", "min-train-nodes": 3, "krum-keep": 1}, "krum-keep is read only by multikrum"),
        ({"aggregation": "krum", "method": "domain", "min-train-nodes": 5}, "method 'domain' aggregates per domain"),
        ({"aggregation": "bulyan", "method": "dual-domain", "byzantine-clients": 1, "min-train-nodes": 7},
         "method 'dual-domain' aggregates per domain"),
        ({"aggregation": "krum", "byzantine-clients": 1, "min-train-nodes": 4}, "'krum' needs at least 5 replies"),
        ({"aggregation": "bulyan", "min-train-nodes": 7}, "bulyan with byzantine-clients = 0 is the plain mean"),
        ({"aggregation": "bulyan", "byzantine-clients": 1, "min-train-nodes": 6}, "'bulyan' needs at least 7 replies"),
        ({"aggregation": "fedmedian"}, "'fedmedian' needs at least 3 replies"),
        ({"aggregation": "fedtrimmedavg", "min-train-nodes": 4}, "'fedtrimmedavg' needs at least 5 replies"),
        ({"aggregation": "fedtrimmedavg", "trim-beta": 0.0, "min-train-nodes": 5}, "trim-beta = 0 is the plain mean"),
        ({"aggregation": "multikrum", "byzantine-clients": 1, "min-train-nodes": 5, "krum-keep": 5},
         "krum-keep 5 would keep a byzantine client"),
    ],
)
def test_bad_run_config_is_refused_by_name(run_config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FederationConfig.from_run_config(run_config)


@pytest.mark.parametrize(
    "run_config",
    [
        {"aggregation": "fedmedian", "method": "fedsa", "min-train-nodes": 3},  # every FedSA client sends a whole A
        {"aggregation": "fedtrimmedavg", "method": "dual-domain", "min-train-nodes": 5},  # coordinate-wise, per group
        {"aggregation": "krum", "byzantine-clients": 1, "min-train-nodes": 5},
        {"aggregation": "multikrum", "byzantine-clients": 1, "min-train-nodes": 5, "krum-keep": 4},
        {"aggregation": "bulyan", "byzantine-clients": 1, "min-train-nodes": 7, "method": "ditto"},
        {"max-update-norm": 2.5, "norm-bound-mode": "clip", "norm-bound-relative": 3,
         "example-weights": "capped", "max-examples-per-client": 400},
        {"attack": "sign-flip", "attack-fraction": 0.5, "attack-scale": 1},
    ],
)
def test_meaningful_defence_compositions_are_accepted(run_config):
    FederationConfig.from_run_config(run_config)


def test_personal_learning_rate_defaults_to_the_learning_rate():
    assert FederationConfig(learning_rate=0.003).personal_lr == 0.003
    assert FederationConfig(learning_rate=0.003, personal_learning_rate=0.01).personal_lr == 0.01


def test_evaluate_rounds_always_include_the_last():
    assert FederationConfig(num_server_rounds=5).evaluate_rounds == {5}
    assert FederationConfig(num_server_rounds=5, evaluate_every=2).evaluate_rounds == {2, 4, 5}


def test_device_state_defaults_to_fedgraft_home(monkeypatch, tmp_path):
    from client.runtime import state_folder
    from shared.data import UserData

    monkeypatch.setenv("FEDGRAFT_HOME", str(tmp_path))
    user = UserData("macbeth/MACBETH", "tragedies", ["a"], ["b"])
    assert state_folder({}, FederationConfig(), user) == tmp_path / "devices" / "macbeth__MACBETH"
    mine = {"state-dir": str(tmp_path / "mine")}
    assert state_folder(mine, FederationConfig(), user) == tmp_path / "mine" / "macbeth__MACBETH"


def test_min_available_nodes_waits_for_more_nodes_than_a_round_trains():
    config = FederationConfig.from_run_config({"min-train-nodes": 3, "min-available-nodes": 30, "fraction-train": 0.34})
    assert (config.min_train_nodes, config.available_nodes) == (3, 30)
    assert FederationConfig.from_run_config({"min-train-nodes": 5}).available_nodes == 5  # 0: min-train-nodes
    with pytest.raises(ConfigError, match="min-available-nodes \\(2\\) must be 0 or at least min-train-nodes \\(5\\)"):
        FederationConfig.from_run_config({"min-train-nodes": 5, "min-available-nodes": 2})

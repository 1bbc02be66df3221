"""The ``device`` key: resolved on the machine that computes, refused early without CUDA, used by training and scoring."""

from __future__ import annotations

import math

import pytest
import torch

from client.runtime import adapter_session, device_config
from client.use import main as use_main
from compressor.__main__ import main as compressor_main
from compressor.heal import bfloat16_autocast
from shared.adapters import adapter_state
from shared.config import ConfigError, FederationConfig
from shared.device import Device, DeviceUnavailable, autocast, resolve_device
from shared.methods import SHARED
from shared.training import evaluate, tokenize_blocks, train_adapter
from simulations.run import simulation_gpus

TEXTS = ["Fair is foul, and foul is fair.", "When shall we three meet again?", "All the world's a stage."] * 8
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def with_cuda(monkeypatch):
    """A machine that reports a GPU (only device objects are made: nothing is allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cpu_and_auto_resolve_to_the_cpu_without_cuda(no_cuda):
    assert resolve_device(Device.CPU) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_means_the_gpu_where_there_is_one_and_cpu_stays_cpu(with_cuda):
    assert resolve_device(Device.AUTO) == torch.device("cuda")
    assert resolve_device(Device.CPU) == torch.device("cpu")


def test_cuda_without_cuda_is_refused_naming_the_key(no_cuda):
    with pytest.raises(DeviceUnavailable, match='device = "cuda".*no CUDA device'):
        resolve_device(Device.CUDA)


def test_the_run_config_refuses_an_unknown_device_but_leaves_cuda_to_the_machine_that_computes(no_cuda):
    with pytest.raises(ConfigError, match="device must be one of"):
        FederationConfig.from_run_config({"device": "tpu"})
    # the server only averages: a CPU-only server may run a GPU federation
    assert FederationConfig.from_run_config({"device": "cuda"}).device == "cuda"


def test_a_client_refuses_cuda_without_one_before_loading_anything(no_cuda):
    config = FederationConfig.from_run_config({"device": "cuda", "base-model": "/nowhere"})
    with pytest.raises(DeviceUnavailable, match="cuda"):
        device_config(config, {})


def test_a_node_may_name_its_own_device(no_cuda):
    config = FederationConfig.from_run_config({"device": "cuda"})
    assert device_config(config, {"device": "cpu"}).device == "cpu"
    with pytest.raises(ConfigError, match="device must be one of"):
        device_config(config, {"device": "tpu"})


def test_client_use_refuses_cuda_without_one_before_reading_the_adapters(no_cuda, tmp_path, capsys):
    # the folder holds no adapter: the device error comes first
    assert use_main(["score", "--folder", str(tmp_path), "--text", "hi", "--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        use_main(["score", "--folder", str(tmp_path), "--text", "hi", "--device", "tpu"])


def test_the_compression_build_refuses_cuda_without_one_before_building(no_cuda, tmp_path, capsys):
    assert compressor_main(["build", "--device", "cuda", "--cache-dir", str(tmp_path), "--quiet"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "compressed").exists()


def test_bf16_autocast_on_a_gpu_only_where_it_computes_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert bfloat16_autocast(True, torch.device("cuda"))
    assert not bfloat16_autocast(False, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert not bfloat16_autocast(True, torch.device("cuda"))


def test_the_cpu_keeps_float32_arithmetic():
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_simulated_clients_ask_ray_for_a_gpu_only_where_the_device_means_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert simulation_gpus({}, None) == 0.0
    with pytest.raises(DeviceUnavailable):
        simulation_gpus({"device": "cuda"}, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert simulation_gpus({}, None) == 1.0
    assert simulation_gpus({"device": "cpu"}, None) == 0.0
    assert simulation_gpus({"device": "auto"}, 0.5) == 0.5


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_one_training_step_and_an_evaluation_run_on_the_configured_device(tiny_base, device):
    config = FederationConfig(base_model=str(tiny_base), device=device)
    session = adapter_session(config)
    assert {p.device.type for p in session.model.parameters()} == {device}
    blocks = tokenize_blocks(session.tokenizer, TEXTS, seq_len=16)  # on the CPU; each batch moves to the model
    session.use([SHARED], trainable=[SHARED])
    before = adapter_state(session.model, SHARED)
    stats = train_adapter(session.model, blocks, steps=1, batch_size=2, learning_rate=0.01)
    after = adapter_state(session.model, SHARED)
    assert stats["train-steps"] == 1.0 and math.isfinite(stats["train-loss"])
    assert any(not torch.equal(before[key], after[key]) for key in before)
    scores = evaluate(session.model, blocks, batch_size=4)
    assert math.isfinite(scores["loss"]) and scores["tokens"] == blocks.num_tokens
    if device == "cuda":  # bf16 autocast on the GPU: close to the CPU's float32 score of the same adapter
        session.model.to("cpu")
        assert scores["loss"] == pytest.approx(evaluate(session.model, blocks, batch_size=4)["loss"], rel=0.05)
        session.model.to(device)

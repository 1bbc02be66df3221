"""Client-side personalization: private state on the device, never in a message to the server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel

from client import app as client_app
from client.personal import StalePersonalAdapter, user_folder
from client.runtime import adapter_session, user_blocks, user_for_node
from shared.adapters import adapter_state, attach_adapter, lora_config, to_arrays
from shared.base_model import BaseModelError, load_model
from shared.config import FederationConfig
from shared.methods import PERSONAL, SHARED
from shared.training import TokenBlocks, evaluate, hold_out, train_adapter

LINES = ["Fair is foul, and foul is fair.", "When shall we three meet again?", "All the world's a stage.",
         "To be, or not to be, that is the question.", "If music be the food of love, play on."] * 6


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


@pytest.fixture
def device(tmp_path, tiny_base):
    data = tmp_path / "me.jsonl"
    data.write_text("\n".join(json.dumps({"text": line, "domain": "verse"}) for line in LINES))
    return {"data": data, "state": tmp_path / "state", "base": tiny_base}


def run_config(device, method: str, **overrides) -> dict:
    values = {"base-model": str(device["base"]), "base-dtype": "float32", "method": method, "local-steps": 3,
              "personal-steps": 3, "seq-len": 16, "batch-size": 2, "lora-r": 2, "lora-alpha": 4, "lora-dropout": 0.0,
              "learning-rate": 0.05, "state-dir": str(device["state"])}
    values.update(overrides)
    return values


def global_arrays(config: dict, method_keys=lambda key: True) -> ArrayRecord:
    settings = FederationConfig.from_run_config(config)
    model = attach_adapter(load_model(settings.base_model), lora_config(settings), seed=settings.seed)
    return to_arrays({k: v for k, v in adapter_state(model).items() if method_keys(k)})


def send(handler, config: dict, device, arrays: ArrayRecord, base_hash: str | None = None, server_round: int = 1):
    session = adapter_session(FederationConfig.from_run_config(config))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"base-hash": base_hash or session.base_hash,
                                                                    "server-round": server_round})})
    message = Message(content, dst_node_id=7, message_type="train" if handler is client_app.train else "evaluate")
    message.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(device["data"])}, state=RecordDict(),
                      run_config=config)
    return handler(message, context)


def test_dual_sends_only_the_shared_adapter_and_keeps_the_personal_one(device):
    config = run_config(device, "dual")
    reply = send(client_app.train, config, device, global_arrays(config))
    sent = reply.content["arrays"]
    assert sent.keys() and all("personal" not in key for key in sent.keys())
    session = adapter_session(FederationConfig.from_run_config(config))
    personal = adapter_state(session.model, PERSONAL)
    shared = adapter_state(session.model, SHARED)
    assert set(sent.keys()) == set(shared)
    # nothing in the message equals the personal tensors (the personal B moved away from zero)
    assert any(t.abs().sum() > 0 for k, t in personal.items() if "lora_B" in k)
    for key, tensor in personal.items():
        if "lora_B" in key:
            assert not np.allclose(sent[key].numpy(), tensor.numpy())
    folder = user_folder(device["state"], "me") / PERSONAL
    assert (folder / "adapter_model.safetensors").is_file()
    # the saved personal adapter is plain peft: it loads with PeftModel.from_pretrained
    loaded = PeftModel.from_pretrained(load_model(str(device["base"])), folder)
    for key, tensor in adapter_state(loaded).items():
        torch.testing.assert_close(tensor, personal[key])


def test_personal_adapter_survives_a_client_restart(device):
    config = run_config(device, "local")
    reply = send(client_app.train, config, device, ArrayRecord())
    assert len(reply.content["arrays"]) == 0  # local sends nothing
    session = adapter_session(FederationConfig.from_run_config(config))
    trained = adapter_state(session.model, PERSONAL)
    adapter_session.cache_clear()  # a restarted device process starts from scratch...
    restarted = adapter_session(FederationConfig.from_run_config(config))
    restarted.reset()
    assert not all(torch.equal(adapter_state(restarted.model, PERSONAL)[k], trained[k]) for k in trained)
    before = send(client_app.evaluate_adapter, config, device, ArrayRecord())
    # ...and the evaluate message found the saved adapter: the scores are those of the trained one
    assert before.content["metrics"]["eval-loss"] == pytest.approx(reply.content["metrics"]["eval-loss"], rel=1e-5)
    for key, tensor in adapter_state(restarted.model, PERSONAL).items():
        torch.testing.assert_close(tensor, trained[key])


def test_a_personal_adapter_from_another_base_is_refused(device, tmp_path):
    config = run_config(device, "local")
    send(client_app.train, config, device, ArrayRecord())
    tag = user_folder(device["state"], "me") / PERSONAL / "fedgraft.json"
    tag.write_text(json.dumps({"base_hash": "0" * 64}))
    with pytest.raises(StalePersonalAdapter, match="trained on base 000000000000"):
        send(client_app.train, config, device, ArrayRecord())


def test_client_refuses_a_base_other_than_the_announced_one(device):
    config = run_config(device, "fedavg")
    with pytest.raises(BaseModelError, match="base model mismatch"):
        send(client_app.train, config, device, global_arrays(config), base_hash="ab" * 32)


def test_fedsa_sends_A_only_and_keeps_its_own_B(device):
    config = run_config(device, "fedsa")
    arrays = global_arrays(config, lambda key: "lora_A" in key)
    reply = send(client_app.train, config, device, arrays)
    assert reply.content["arrays"].keys() and all("lora_A" in k for k in reply.content["arrays"].keys())
    saved = user_folder(device["state"], "me") / SHARED / "adapter_model.safetensors"
    from safetensors.torch import load_file
    own_b = {k: v for k, v in load_file(saved).items() if "lora_B" in k}
    assert own_b and any(v.abs().sum() > 0 for v in own_b.values())


def test_ditto_personal_model_is_pulled_toward_the_shared_one(device):
    far = run_config(device, "ditto", **{"ditto-lambda": 0.0, "state-dir": str(device["state"] / "a")})
    near = run_config(device, "ditto", **{"ditto-lambda": 50.0, "state-dir": str(device["state"] / "b")})
    distances = []
    for config in (far, near):
        send(client_app.train, config, device, global_arrays(config))
        session = adapter_session(FederationConfig.from_run_config(config))
        shared, personal = adapter_state(session.model, SHARED), adapter_state(session.model, PERSONAL)
        distances.append(sum(float((personal[k] - shared[k]).norm()) for k in shared))
    assert distances[1] < distances[0]


def test_under_fedprox_the_client_pulls_the_shared_adapter_toward_what_it_received(device):
    # mu is the same in all three runs: only FedProx's clients may apply it
    moved = {}
    for aggregation in ("fedavg", "fedprox", "fedadam"):
        config = run_config(device, "fedavg", **{"aggregation": aggregation, "proximal-mu": 50.0,
                                                 "state-dir": str(device["state"] / aggregation)})
        received = global_arrays(config)
        reply = send(client_app.train, config, device, received)
        sent = reply.content["arrays"]
        moved[aggregation] = sum(float(np.linalg.norm(sent[k].numpy() - received[k].numpy())) for k in received.keys())
    assert moved["fedavg"] == moved["fedadam"]
    assert moved["fedprox"] < moved["fedavg"]


def nonzero_global(config: dict) -> ArrayRecord:
    """A global adapter as after some rounds: B no longer zero."""
    generator = torch.Generator().manual_seed(1)
    arrays = global_arrays(config)
    return to_arrays({key: torch.from_numpy(arrays[key].numpy()) + 0.05 * torch.randn(arrays[key].shape, generator=generator)
                      for key in arrays.keys()})


def test_the_device_keeps_the_shared_adapter_it_received(device):
    from safetensors.torch import load_file

    config = run_config(device, "fedavg")
    received = nonzero_global(config)
    send(client_app.train, config, device, received)
    saved = load_file(user_folder(device["state"], "me") / SHARED / "adapter_model.safetensors")
    assert set(saved) == set(received.keys())
    for key, tensor in saved.items():  # as received, not as trained locally afterwards
        np.testing.assert_allclose(tensor.numpy(), received[key].numpy())


def test_use_scores_and_generates_with_base_shared_and_personal(device, capsys):
    from client import use

    config = run_config(device, "dual", **{"personal-steps": 8})
    send(client_app.train, config, device, nonzero_global(config))
    folder = user_folder(device["state"], "me")
    personal = use.load_personal_model(folder)
    assert personal.adapters == [SHARED, PERSONAL] and personal.tag["method"] == "dual"
    rows = dict(use.score(personal, LINES, seq_len=16))
    base, shared_only, mine = rows["base alone"], rows["shared adapter"], rows["your model (shared + personal)"]
    assert len({base["loss"], shared_only["loss"], mine["loss"]}) == 3  # three different models were scored
    assert mine["loss"] < base["loss"]  # the personal adapter learned these very lines
    text = use.generate(personal, "Fair is", max_new_tokens=5, temperature=0)
    assert text == use.generate(personal, "Fair is", max_new_tokens=5, temperature=0)  # greedy is repeatable
    assert use.main(["score", "--state-dir", str(device["state"]), "--user", "me", "--text", " ".join(LINES)]) == 0
    assert "your model (shared + personal)" in capsys.readouterr().out


def test_use_refuses_adapters_of_another_base_and_says_what_is_missing(device, tmp_path, capsys):
    from client import use

    assert use.main(["score", "--folder", str(tmp_path / "nobody"), "--text", "hello"]) == 2
    assert "no saved adapter" in capsys.readouterr().out
    config = run_config(device, "local")
    send(client_app.train, config, device, ArrayRecord())
    tag = user_folder(device["state"], "me") / PERSONAL / "fedgraft.json"
    tag.write_text(json.dumps({**json.loads(tag.read_text()), "base_hash": "0" * 64}))
    with pytest.raises(StalePersonalAdapter, match="trained on base 000000000000"):
        use.load_personal_model(user_folder(device["state"], "me"))


def test_fedavg_ft_with_validation_never_leaves_the_user_worse_than_the_global_adapter_on_it(device):
    # A learning rate high enough to overfit: without validation the tuned copy can end anywhere.
    config = run_config(device, "fedavg-ft", **{"validation-fraction": 0.3, "validate-every": 1,
                                                "personal-steps": 6, "learning-rate": 0.3})
    reply = send(client_app.evaluate_adapter, config, device, global_arrays(config))
    metrics = reply.content["metrics"]
    assert 0 <= metrics["personal-best-step"] <= 6
    session = adapter_session(FederationConfig.from_run_config(config))
    settings = FederationConfig.from_run_config(config)
    user = user_for_node({"data-path": str(device["data"])}, settings)
    train_blocks, _ = user_blocks(user, session.tokenizer, settings)
    validation = hold_out(train_blocks, 0.3, seed=settings.seed)[1]
    session.use([SHARED], trainable=[])
    global_loss = evaluate(session.model, validation)["loss"]
    session.use([PERSONAL], trainable=[])
    assert evaluate(session.model, validation)["loss"] <= global_loss + 1e-6


def test_activation_checkpointing_recomputes_the_blocks_and_gives_the_same_update(device):
    """``activation-checkpointing`` trades compute for memory: each block runs again in the backward pass."""
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    blocks = TokenBlocks(ids, torch.ones_like(ids), ids.clone())
    updates, block_calls = {}, {}
    for checkpointing in (False, True):
        adapter_session.cache_clear()
        session = adapter_session(FederationConfig.from_run_config(
            run_config(device, "fedavg", **{"activation-checkpointing": checkpointing})))
        calls = []
        # A module inside the block (transformers checkpoints the block's forward, not its hooks), and
        # its first: the recomputation stops once it has what the backward pass needs.
        first_norm = session.model.get_base_model().model.layers[0].input_layernorm
        handle = first_norm.register_forward_hook(lambda *args: calls.append(1))
        train_adapter(session.model, blocks, steps=2, batch_size=2, learning_rate=0.05)
        handle.remove()
        block_calls[checkpointing] = len(calls)
        updates[checkpointing] = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    adapter_session.cache_clear()
    assert block_calls == {False: 2, True: 4}
    for name, tensor in updates[True].items():
        torch.testing.assert_close(tensor, updates[False][name], rtol=1e-5, atol=1e-7, msg=name)

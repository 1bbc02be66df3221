"""An emulator base at run time: adapters only on its teacher's own blocks, plugged into the teacher.

The emulator here is built by hand: a 6-block tiny teacher keeps blocks 0, 1, 3 and 5; emulator
blocks 0, 1 and 3 (teacher 0, 1, 5) are the teacher's own, block 2 (teacher 3) stands for the
compressed middle and is perturbed so that it is not.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from tiny import build_base_folder
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from client import app as client_app
from client import use
from client.personal import user_folder
from client.runtime import adapter_session
from compressor import cache, prepare_base
from compressor.cache import compressed_folder
from compressor.layers import drop_layers
from compressor.recipe import DEFAULT_RECIPE, load_recipe, recipe_from_dict
from server.ledger import Ledger
from server.operator.cli import app as ops_app
from shared.adapters import (adapter_state, attach_adapter, base_lora_config, check_update, expected_shapes,
                             lora_config, save_adapter, to_arrays)
from shared.base_files import DEFAULT_RECIPE_REF, REPORT_JSON, EmulatorLayout
from shared.base_model import BaseModelError, base_layout, load_model, materialize_base
from shared.config import FederationConfig
from shared.methods import METHODS, PERSONAL, SHARED, method
from shared.plugin import NotPluggable, plug_into_teacher

LAYOUT_LAYERS = (0, 1, 3, 5)  # teacher block of each emulator block
ADAPTER_LAYERS = (0, 1, 3)  # emulator blocks that are the teacher's own
TEACHER_ADAPTER_LAYERS = [0, 1, 5]
LINES = ["Fair is foul, and foul is fair.", "When shall we three meet again?", "All the world's a stage.",
         "To be, or not to be, that is the question.", "If music be the food of love, play on."] * 6


def blocks(keys) -> set[int]:
    return {int(re.search(r"\.layers\.(\d+)\.", key).group(1)) for key in keys}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base_folder(tmp_path_factory.mktemp("teacher"), num_layers=6, seed=5)


def write_emulator(teacher: Path, folder: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(teacher)
    drop_layers(model, LAYOUT_LAYERS)
    with torch.no_grad():  # the middle is the compressor's: no longer the teacher's block
        for parameter in model.model.layers[2].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    EmulatorLayout(str(teacher), LAYOUT_LAYERS, ADAPTER_LAYERS).save(folder)
    return folder


@pytest.fixture(scope="module")
def emulator(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_emulator(teacher, tmp_path_factory.mktemp("emulator"))


def settings(base: Path, **values) -> FederationConfig:
    return FederationConfig(base_model=str(base), lora_r=2, lora_alpha=4, lora_dropout=0.0, **values)


def trained_on_emulator(emulator: Path, seed: int = 1):
    """An adapter on the emulator with random (non-zero) tensors, as after training."""
    model = attach_adapter(load_model(str(emulator)), base_lora_config(settings(emulator)), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def teacher_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


# --- placement ------------------------------------------------------------------------------------


def test_server_and_client_adapters_have_the_same_keys_only_on_the_adapter_layers(emulator: Path, teacher: Path):
    config = settings(emulator)
    server = expected_shapes(attach_adapter(load_model(str(emulator)), base_lora_config(config), seed=0))
    session = adapter_session(config)
    for adapter in (SHARED, PERSONAL):
        assert expected_shapes(session.model, adapter) == server
    # q_proj and v_proj, A and B, on each of the three adapter blocks
    assert blocks(server) == set(ADAPTER_LAYERS) and len(server) == 3 * 2 * 2
    assert base_lora_config(settings(teacher)).layers_to_transform is None  # a plain base: every block


# --- plug-in --------------------------------------------------------------------------------------


def test_an_adapter_saved_on_the_emulator_loads_into_the_teacher_with_plain_peft(emulator: Path, teacher: Path,
                                                                                 tmp_path: Path):
    trained = trained_on_emulator(emulator)
    saved = save_adapter(trained, tmp_path / "emulator-adapter")
    layout = EmulatorLayout.load(emulator)
    folder = plug_into_teacher(saved, tmp_path / "teacher-adapter", layout, str(teacher))

    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(teacher)
    assert written["layers_to_transform"] == TEACHER_ADAPTER_LAYERS
    tokens = torch.tensor([[5, 17, 42, 9, 77, 3]])
    alone = teacher_logits(load_model(str(teacher)), tokens)
    plugged = PeftModel.from_pretrained(load_model(str(teacher)), folder)
    on_teacher = get_peft_model_state_dict(plugged)
    on_emulator = adapter_state(trained)
    assert len(on_teacher) == len(on_emulator) == 12
    for key, tensor in on_emulator.items():  # emulator block i is teacher block LAYOUT_LAYERS[i]
        index = int(re.search(r"\.layers\.(\d+)\.", key).group(1))
        assert torch.equal(on_teacher[key.replace(f".layers.{index}.", f".layers.{LAYOUT_LAYERS[index]}.")], tensor)
    assert not torch.allclose(teacher_logits(plugged, tokens), alone, atol=1e-4)


def test_an_adapter_on_a_compressed_block_is_refused(emulator: Path, teacher: Path, tmp_path: Path):
    everywhere = attach_adapter(load_model(str(emulator)), lora_config(settings(emulator)), seed=0)
    saved = save_adapter(everywhere, tmp_path / "everywhere")
    with pytest.raises(NotPluggable, match=r"on emulator blocks \[2\], which are not the teacher's own"):
        plug_into_teacher(saved, tmp_path / "out", EmulatorLayout.load(emulator), str(teacher))


# --- export for the teacher -----------------------------------------------------------------------


def ops(*args: str) -> object:
    return CliRunner().invoke(ops_app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def ledger_url(emulator: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Run 1 trained on the emulator, run 2 on the teacher, each with a checkpoint of round 1."""
    url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    with Ledger(url) as ledger:
        for flower_id, base in ((1, emulator), (2, teacher)):
            config = settings(base)
            model = attach_adapter(load_model(str(base)), base_lora_config(config), seed=3)
            run_id = ledger.start_run(flower_id, config.as_run_config(), str(base), "0" * 64)
            ledger.start_round(run_id, 1, clients_sampled=1, bytes_down=0)
            ledger.save_checkpoint(run_id, 1, {k: v.numpy() + 0.1 for k, v in adapter_state(model).items()})
    return url


def test_the_operator_exports_an_emulator_runs_adapter_for_the_teacher(ledger_url: str, emulator: Path,
                                                                       teacher: Path, tmp_path: Path):
    plain, for_teacher = tmp_path / "plain", tmp_path / "teacher"
    assert ops("adapter", "1", "-o", str(plain), "--db", ledger_url).exit_code == 0
    result = ops("adapter", "1", "--on-teacher", "-o", str(for_teacher), "--db", ledger_url)
    assert result.exit_code == 0, result.output
    assert f"teacher: {teacher}" in result.stdout
    plain_config = json.loads((plain / "adapter_config.json").read_text())
    teacher_config = json.loads((for_teacher / "adapter_config.json").read_text())
    assert (plain_config["base_model_name_or_path"], plain_config["layers_to_transform"]) == (str(emulator),
                                                                                              list(ADAPTER_LAYERS))
    assert (teacher_config["base_model_name_or_path"], teacher_config["layers_to_transform"]) == (
        str(teacher), TEACHER_ADAPTER_LAYERS)
    plugged = PeftModel.from_pretrained(load_model(str(teacher)), for_teacher)
    assert blocks(get_peft_model_state_dict(plugged)) == set(TEACHER_ADAPTER_LAYERS)
    exported = load_file(plain / "adapter_model.safetensors")
    for key, tensor in get_peft_model_state_dict(plugged).items():
        index = int(re.search(r"\.layers\.(\d+)\.", key).group(1))
        emulator_key = key.replace(f".layers.{index}.", f".layers.{LAYOUT_LAYERS.index(index)}.")
        assert torch.equal(tensor, exported[emulator_key])


def test_exporting_for_the_teacher_needs_an_emulator_run(ledger_url: str, tmp_path: Path):
    result = ops("adapter", "2", "--on-teacher", "-o", str(tmp_path / "out"), "--db", ledger_url)
    assert result.exit_code == 1 and "is not an emulator base" in result.stderr
    assert not (tmp_path / "out").exists()


# --- the `emulator` spec --------------------------------------------------------------------------


def test_the_emulator_spec_names_the_shipped_recipe_and_says_how_to_build_it(
        emulator: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    monkeypatch.setattr(cache, "RECIPES_DIR", recipes)
    monkeypatch.setenv("FEDGRAFT_CACHE", str(tmp_path / "cache"))
    recipe_file = recipes / "emulator.toml"
    recipe_file.write_text(recipe_from_dict({"name": "emulator", "teacher": str(teacher)}).to_toml())
    for spec in ("emulator", "compressed:emulator"):
        with pytest.raises(BaseModelError, match=re.escape(
                "the compressed base of recipe 'emulator' is not built: "
                "run `python -m compressor build --recipe compressor/recipes/emulator.toml` first")):
            materialize_base(spec)
    built = compressed_folder(load_recipe(recipe_file))  # the key a build of that file has: not changed by a name
    shutil.copytree(emulator, built)
    (built / REPORT_JSON).write_text("{}")
    plays = list(load_recipe(recipe_file).public_plays)
    assert prepare_base("emulator") == (built, plays)  # found built (a cache hit), then recorded under its name
    assert materialize_base("emulator") == materialize_base("compressed:emulator") == built
    assert materialize_base(f"compressed:{recipe_file}") == built
    assert base_layout("emulator") == EmulatorLayout(str(teacher), LAYOUT_LAYERS, ADAPTER_LAYERS)
    assert DEFAULT_RECIPE.stem == DEFAULT_RECIPE_REF  # the default recipe is recorded under its name too


# --- every method on the emulator, and the user's model on the teacher ------------------------------


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


def run_config(emulator: Path, state: Path, method_name: str) -> dict:
    return {"base-model": str(emulator), "base-dtype": "float32", "method": method_name, "local-steps": 3,
            "personal-steps": 3, "seq-len": 16, "batch-size": 2, "lora-r": 2, "lora-alpha": 4, "lora-dropout": 0.0,
            "learning-rate": 0.05, "state-dir": str(state)}


def send(config: dict, data: Path, arrays: ArrayRecord, handler=client_app.train) -> Message:
    session = adapter_session(FederationConfig.from_run_config(config))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"base-hash": session.base_hash,
                                                                    "server-round": 1})})
    message = Message(content, dst_node_id=7, message_type="train" if handler is client_app.train else "evaluate")
    message.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data)}, state=RecordDict(),
                      run_config=config)
    return handler(message, context)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_trains_on_the_emulator_and_the_user_model_runs_on_the_teacher(
        method_name: str, emulator: Path, teacher: Path, tmp_path: Path):
    data = tmp_path / "me.jsonl"
    data.write_text("\n".join(json.dumps({"text": line, "domain": "verse"}) for line in LINES))
    config = run_config(emulator, tmp_path / "state", method_name)
    method_ = method(method_name)
    server = trained_on_emulator(emulator, seed=2)  # a global adapter as after some rounds
    shapes = expected_shapes(server, keep=method_.shared_key)
    received = to_arrays({k: v for k, v in adapter_state(server).items() if method_.shared_key(k)})
    received = received if method_.sends_arrays else ArrayRecord()
    sent = send(config, data, received).content["arrays"]
    if method_.sends_arrays:  # what the server's strategy checks every reply against
        assert set(check_update(sent, shapes, 1 << 30)) == set(shapes)
    else:
        assert len(sent) == 0
    metrics = send(config, data, received, client_app.evaluate_adapter).content["metrics"]  # fedavg-ft tunes here
    assert metrics["eval-loss"] != metrics["base-loss"]

    personal = use.load_personal_model(user_folder(tmp_path / "state", "me"), on_teacher=True)
    assert personal.runs_on == str(teacher) and personal.adapters == method_.user_adapters
    for adapter in personal.saved:
        assert blocks(get_peft_model_state_dict(personal.model, adapter_name=adapter)) == set(TEACHER_ADAPTER_LAYERS)
    rows = dict(use.score(personal, LINES, seq_len=16))
    user_model = rows["your model (" + " + ".join(personal.adapters) + ")"]
    assert user_model["loss"] != rows["base alone"]["loss"]
    alone = use.score(use.load_personal_model(user_folder(tmp_path / "state", "me")), LINES, seq_len=16)[0][1]
    assert alone["loss"] != rows["base alone"]["loss"]  # the emulator alone is not the teacher alone


def printed(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().out.split())  # rich wraps long lines


def test_use_on_the_teacher_from_the_command_line_and_its_refusal_on_a_plain_base(
        emulator: Path, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    data = tmp_path / "me.jsonl"
    data.write_text("\n".join(json.dumps({"text": line, "domain": "verse"}) for line in LINES))
    send(run_config(emulator, tmp_path / "state", "dual"), data, to_arrays(adapter_state(
        trained_on_emulator(emulator, seed=2))))
    where = ["--state-dir", str(tmp_path / "state"), "--user", "me"]
    assert use.main(["score", *where, "--text", " ".join(LINES), "--on-teacher"]) == 0
    assert f"on {teacher}" in printed(capsys)
    copy = shutil.copytree(teacher, tmp_path / "teacher-copy")
    assert use.main(["generate", *where, "--prompt", "Fair is", "--teacher", str(copy)]) == 0
    assert f"on {copy}" in printed(capsys)
    assert use.main(["score", *where, "--text", "hello", "--on-teacher", "--base", str(teacher)]) == 2
    assert "was trained on base" in printed(capsys)  # the tag's emulator hash, not the teacher's
    plain = tmp_path / "plain-state"
    send(run_config(teacher, plain, "local"), data, ArrayRecord())
    assert use.main(["score", "--state-dir", str(plain), "--user", "me", "--text", "hello", "--on-teacher"]) == 2
    assert "is not an emulator base" in printed(capsys)

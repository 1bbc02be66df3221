"""The emulator build on a tiny teacher: edge blocks kept exactly, the middle thinned and distilled, the layout written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor.build import build_compressed_base
from compressor.distill import relative_hidden_error
from compressor.emulator import Middle, distill_middle, emulator_blocks, exit_state, middle_error
from compressor.layers import drop_layers
from compressor.recipe import RECIPES_DIR, EmulatorSection, Recipe, RecipeError, canonical_json, load_recipe, recipe_from_dict
from compressor.report import load_report
from compressor.texts import public_texts, token_blocks
from shared.base_files import EmulatorLayout
from shared.base_model import load_model
from tiny import build_base_folder

PUBLIC = ["the-comedy-of-errors"]
LAYERS = 6  # teacher blocks 0-5; the emulator keeps 0 and 5, and 2 of the middle 1-4


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base_folder(tmp_path_factory.mktemp("teacher6"), num_layers=LAYERS)


def emulator_recipe(teacher: Path, **sections: dict) -> Recipe:
    data = {
        "name": "tiny-emulator",
        "teacher": str(teacher),
        "public_plays": PUBLIC,
        "calibration_blocks": 4,
        "emulator": {"first_blocks": 1, "last_blocks": 1},
        "layers": {"keep": 2, "how": "even", "bridge": True},
        "heal": {"steps": 40, "batch_size": 4, "seq_len": 32, "learning_rate": 0.003, "warmup_steps": 2,
                 "eval_blocks": 8},
        "eval": {"speeches": 24, "speeches_per_user": 6},
        "output": {"dtype": "bfloat16"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def built(teacher_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_compressed_base(emulator_recipe(teacher_folder), cache_dir=tmp_path_factory.mktemp("cache"),
                                 progress=False)


def test_edges_embedding_norm_and_head_are_the_teachers_as_the_run_time_loads_it(built: Path,
                                                                                 teacher_folder: Path) -> None:
    emulator = AutoModelForCausalLM.from_pretrained(built)
    teacher = load_model(str(teacher_folder), dtype="bfloat16")  # how the run time loads the teacher
    assert next(emulator.parameters()).dtype == torch.bfloat16
    pairs = {0: 0, 3: 5}  # emulator block: teacher block
    for mine, theirs in pairs.items():
        ours, reference = emulator.model.layers[mine].state_dict(), teacher.model.layers[theirs].state_dict()
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[name], reference[name]) for name in ours)
    assert torch.equal(emulator.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(emulator.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(emulator.model.norm.weight, teacher.model.norm.weight)
    # the middle did change: kept teacher blocks 1 and 4, bridged and distilled
    assert not torch.equal(emulator.model.layers[1].mlp.down_proj.weight, teacher.model.layers[1].mlp.down_proj.weight)


def test_the_layout_names_the_teacher_its_blocks_and_the_adapter_blocks(built: Path, teacher_folder: Path) -> None:
    assert EmulatorLayout.load(built) == EmulatorLayout(str(teacher_folder), (0, 1, 4, 5), (0, 3))
    emulator = next(t for t in load_report(built)["techniques"] if t["technique"] == "emulator")
    assert emulator["teacher_layers"] == [0, 1, 4, 5] and emulator["adapter_layers"] == [0, 3]
    assert [bridge["after_block"] for bridge in emulator["bridges"]] == [1]  # into the middle, never an edge


def test_the_build_distills_the_middle_and_reports_it(built: Path) -> None:
    report = load_report(built)
    heal = report["heal"]
    assert heal["steps_done"] == 40 and heal["kd_steps"] == 0
    assert heal["middle_error_after"] < 0.7 * heal["middle_error_before"]
    assert report["student"]["layers"] == 4 and report["teacher"]["layers"] == LAYERS
    assert report["student"]["vocab_size"] == report["teacher"]["vocab_size"]
    assert "middle's relative error" in (built / "compression.md").read_text()


def test_distilling_the_middle_with_the_output_kd_lowers_its_error(teacher_folder: Path) -> None:
    recipe = emulator_recipe(teacher_folder, heal={"steps": 30, "kd_alpha": 0.5, "kd_temperature": 2.0})
    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder)
    blocks = token_blocks(tokenizer, public_texts(recipe)[:400], 32)
    held, train = blocks[:8], blocks[8:]
    keep = emulator_blocks(LAYERS, recipe.emulator, 2, "even")
    student = drop_layers(copy.deepcopy(teacher), keep)
    middle = Middle.of(recipe.emulator, LAYERS, len(keep))
    edges = {name: p.clone() for name, p in student.named_parameters() if not name.startswith(("model.layers.1.",
                                                                                               "model.layers.2."))}
    before = middle_error(student, teacher, middle, held)
    stats = distill_middle(student, teacher, train, recipe, middle)
    assert stats["kd_steps"] == stats["steps_done"] == 30
    assert middle_error(student, teacher, middle, held) < 0.7 * before
    assert all(torch.equal(p, edges[name]) for name, p in student.named_parameters() if name in edges)


def test_blocks_and_middle_of_an_emulator() -> None:
    section = EmulatorSection(first_blocks=2, last_blocks=2)
    assert emulator_blocks(30, section, 7, "even") == [0, 1, 2, 6, 10, 15, 19, 23, 27, 28, 29]
    assert emulator_blocks(8, section, None, "even") == list(range(8))
    assert Middle.of(section, 30, 11) == Middle(start=2, stop=9, teacher_exit=27)
    with pytest.raises(ValueError, match="leave no middle block"):
        emulator_blocks(4, section, None, "even")
    with pytest.raises(ValueError, match="the middle has 4 blocks"):
        emulator_blocks(8, section, 5, "even")


def test_exit_state_is_the_blocks_output(teacher_folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(teacher_folder).eval()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        hidden, logits = exit_state(model, 3, ids)
        _, full = exit_state(model, 3, ids, with_logits=True)
    assert logits is None and torch.equal(hidden, states[4])
    assert torch.equal(full, model(input_ids=ids).logits)


def test_relative_hidden_error_weighs_every_position_alike() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert relative_hidden_error(student, teacher).item() == pytest.approx((1 / 4 + 1 / 1) / 2)


@pytest.mark.parametrize("section, value, named", [
    ("heads", {"keep_kv_heads": 1}, "heads.keep_kv_heads"),
    ("mlp", {"keep_ratio": 0.5}, "mlp.keep_ratio"),
    ("magnitude", {"sparsity": 0.5}, "magnitude.sparsity"),
    ("lowrank", {"rank": 4}, "lowrank"),
    ("sharing", {"groups": [[1, 2]]}, "sharing.groups"),
    ("heal", {"hidden_weight": 1.0}, "heal.hidden_weight"),
    ("heal", {"kd_alpha": 0.5, "kd_topk": 8}, "heal.kd_topk"),
    ("heal", {"kd_start": 0.5}, "heal.kd_start"),
])
def test_an_emulator_refuses_what_would_change_its_edges(teacher_folder: Path, section: str, value: dict,
                                                         named: str) -> None:
    with pytest.raises(RecipeError, match=f"not supported with it: {named}"):
        emulator_recipe(teacher_folder, **{section: value})


@pytest.mark.parametrize("sections, named", [
    ({"emulator": {"first_blocks": 3, "last_blocks": 3}}, "emulator: 3 first"),
    ({"layers": {"keep": 5}}, "emulator: keep is 5"),
])
def test_an_emulator_that_does_not_fit_the_teacher_names_the_key(teacher_folder: Path, tmp_path: Path,
                                                                 sections: dict, named: str) -> None:
    with pytest.raises(RecipeError, match=named):
        build_compressed_base(emulator_recipe(teacher_folder, **sections), cache_dir=tmp_path, progress=False)


def test_the_bridge_never_changes_an_edge_block(teacher_folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Importance that drops the first middle block: the gap would start at edge block 0.
    monkeypatch.setattr("compressor.build.layer_importance", lambda model, batches: [1.0, 0.0, 1.0, 1.0, 0.5, 1.0])
    recipe = emulator_recipe(teacher_folder, layers={"how": "importance"})
    with pytest.raises(RecipeError, match="the bridge would change edge block 0"):
        build_compressed_base(recipe, cache_dir=tmp_path, progress=False)


def test_the_shipped_emulator_recipe_keeps_the_teachers_vocabulary_and_other_keys_alone() -> None:
    recipe = load_recipe(RECIPES_DIR / "emulator.toml")
    assert recipe.name == "emulator-kd" and recipe.emulator.enabled and not recipe.vocab.trim
    assert recipe.heal.kd_alpha == 1.0
    assert recipe.output.dtype == "bfloat16"
    assert "emulator" not in json.loads(canonical_json(load_recipe()))  # the default recipe's key is unchanged

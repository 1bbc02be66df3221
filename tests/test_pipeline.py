"""The compression pipeline on the tiny teacher: recipes, the cached build, the report, healing."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor.__main__ import main
from compressor.build import build_compressed_base
from compressor.cache import compressed_key, teacher_identity
from compressor.evaluate import score_documents
from compressor.heal import HEALING_ATTENTION, heal
from compressor.layers import drop_layers
from compressor.measure import parameter_count, storage_bytes
from compressor.recipe import DEFAULT_RECIPE, Recipe, RecipeError, canonical_json, load_recipe, recipe_from_dict
from compressor.report import REPORT_JSON, REPORT_MD, load_report
from compressor.texts import client_eval_documents, public_texts, token_blocks
from shared.base_files import BaseModelError, BaseSource, gguf_cache_folder
from shared.base_model import materialize_base
from shared.training import TokenBlocks, evaluate

PUBLIC = ["the-comedy-of-errors"]  # the shortest play: the public text of these tests


def public_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    return evaluate(model, TokenBlocks.unpadded(blocks))["loss"]


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_recipe(tiny_base: Path, **sections: dict) -> Recipe:
    data = {
        "name": "tiny",
        "teacher": str(tiny_base),
        "public_plays": PUBLIC,
        "calibration_blocks": 4,
        "vocab": {"trim": True},
        "layers": {"keep": 1, "how": "ends"},
        "heads": {"keep_kv_heads": 1},
        "mlp": {"keep_ratio": 0.5},
        "heal": {"steps": 30, "batch_size": 4, "seq_len": 32, "learning_rate": 0.01, "warmup_steps": 2,
                 "kd_alpha": 0.5, "kd_temperature": 2.0, "kd_topk": 8, "eval_blocks": 8},
        "eval": {"speeches": 24, "speeches_per_user": 6},
    }
    for name, values in sections.items():
        data[name] = values if not isinstance(values, dict) else {**data.get(name, {}), **values}
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def built(tiny_base: Path, cache: Path) -> tuple[Recipe, Path, float]:
    recipe = tiny_recipe(tiny_base)
    start = time.perf_counter()
    folder = build_compressed_base(recipe, cache_dir=cache, progress=False)
    return recipe, folder, time.perf_counter() - start


# --- recipes ---------------------------------------------------------------------------------------


def test_default_recipe_is_valid_and_names_public_plays() -> None:
    recipe = load_recipe(None)
    assert load_recipe(DEFAULT_RECIPE) == recipe
    assert recipe.teacher == "smollm2" and len(recipe.public_plays) >= 6
    assert recipe.vocab.trim and recipe.heal.steps > 0 and recipe.time_budget_s is not None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("nmae = 'x'\n", "'nmae'"),
        ("[heal]\nstpes = 3\n", "'heal.stpes'"),
        ("[layers]\nkeep = 'six'\n", "layers.keep"),
        ("[layers]\nkeep = 0\n", "layers.keep"),
        ("[layers]\nhow = 'middle'\n", "layers.how"),
        ("[mlp]\nkeep_ratio = 1.5\n", "mlp.keep_ratio"),
        ("[heal]\nkd_alpha = true\n", "heal.kd_alpha"),
        ("[heal]\nlearning_rate = -1\n", "heal.learning_rate"),
        ("[magnitude]\nsparsity = 1.0\n", "magnitude.sparsity"),
        ("[magnitude]\nmodules = ['q_proj', 'qkv']\n", "magnitude.modules[1]"),
        ("[output]\ndtype = 'int4'\n", "output.dtype"),
        ("[vocab]\nword_forms = ['lower', 'title']\n", "vocab.word_forms[1]"),
        ("public_plays = ['hamlet', 'not-a-play']\n", "public_plays"),
        ("public_plays = 'hamlet'\n", "public_plays"),
        ("heal = 3\n", "'heal'"),
        ("[vocab]\ntrim = true\n", "public_plays"),
        ("[sharing]\ngroups = [[0]]\n", "sharing.groups"),
        ("public_plays = ['hamlet']\n[vocab]\ntrim = true\nplays = ['macbeth']\n", "vocab.plays"),
        ("public_plays = ['hamlet']\n[vocab]\nplays = ['hamlet']\n", "vocab.plays"),
        ("[vocab]\nlowest_ids = -1\n", "vocab.lowest_ids"),
        ("[lowrank]\nrank = 8\nenergy = 0.9\n", "lowrank.rank"),
        ("public_plays = ['hamlet']\n[heal]\nsteps = 5\nhidden_weight = 1.0\nkd_topk = 8\n", "heal.hidden_weight"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(RecipeError, match=named.replace("[", r"\[").replace("]", r"\]")) as error:
        load_recipe(write(tmp_path, text))
    assert "recipe.toml" in str(error.value)


def test_recipe_file_problems(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[heal\nsteps = 3"))
    assert load_recipe(write(tmp_path, "")) == Recipe(source="ignored")  # every key has a default


def test_recipe_round_trips_through_toml(tmp_path: Path) -> None:
    recipe = load_recipe(None).with_overrides({"sharing.groups": [[1, 2]], "layers.keep": 5})
    again = load_recipe(write(tmp_path, recipe.to_toml()))
    assert again.to_dict() == recipe.to_dict()
    with pytest.raises(RecipeError, match="heal.nope"):
        recipe.with_overrides({"heal.nope": 1})


def test_key_follows_recipe_content_not_formatting(tiny_base: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_base)
    same = load_recipe(write(tmp_path, "# a comment\n" + recipe.to_toml()))
    assert compressed_key(same) == compressed_key(recipe)
    assert compressed_key(recipe).startswith("tiny-")
    changed = [
        recipe.with_overrides({"layers.keep": 2}),
        recipe.with_overrides({"heal.kd_temperature": 1.0}),
        recipe.with_overrides({"public_plays": ["pericles"]}),
        recipe.replace(teacher=str(tmp_path)),
    ]
    (tmp_path / "config.json").write_text((tiny_base / "config.json").read_text())
    assert len({compressed_key(recipe)} | {compressed_key(other) for other in changed}) == 5


def test_key_leaves_out_settings_at_their_default() -> None:
    # A setting added later, at a default that keeps the old behaviour, then leaves existing keys alone.
    recipe = Recipe(name="short").with_overrides({"layers.keep": 3, "heal.steps": 0})
    assert json.loads(canonical_json(recipe)) == {"name": "short", "layers": {"keep": 3}}
    assert canonical_json(recipe.with_overrides({"seed": 1})) != canonical_json(recipe)


def test_key_follows_the_teachers_content_not_its_location(tiny_base: Path, tmp_path: Path) -> None:
    import shutil

    # "smollm2" resolves to the GGUF inside each venv: the key hashes what the spec resolves to
    copy = shutil.copytree(tiny_base, tmp_path / "elsewhere" / "teacher")  # another clone, another venv
    assert teacher_identity(str(copy)) == teacher_identity(str(tiny_base))
    weights = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit of one weight differs
    weights.write_bytes(bytes(data))
    assert teacher_identity(str(copy)) != teacher_identity(str(tiny_base))


def test_a_gguf_is_converted_once_whatever_its_path(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.gguf").write_bytes(b"GGUF" + bytes(range(1, 201)))
    folders = {name: gguf_cache_folder(BaseSource(tmp_path / name, "model.gguf"), tmp_path / "cache") for name in "abc"}
    assert folders["a"] == folders["b"] != folders["c"]


# --- the build -------------------------------------------------------------------------------------


def test_build_writes_a_plain_hugging_face_folder(built: tuple[Recipe, Path, float]) -> None:
    recipe, folder, _ = built
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    report = load_report(folder)
    assert model.config.num_hidden_layers == 1
    assert model.config.num_key_value_heads == 1 and model.config.intermediate_size == 32
    assert model.config.vocab_size == len(tokenizer) == report["student"]["vocab_size"]
    assert len(tokenizer) < report["teacher"]["vocab_size"]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    ids = tokenizer("When shall we three meet again", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert (folder / "recipe.toml").is_file() and (folder / REPORT_MD).is_file()
    assert load_recipe(folder / "recipe.toml").to_dict() == recipe.to_dict()
    assert not folder.with_name(folder.name + ".partial").exists()


def test_report_is_consistent_with_the_folder(built: tuple[Recipe, Path, float]) -> None:
    recipe, folder, _ = built
    report = json.loads((folder / REPORT_JSON).read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher)
    assert report["key"] == folder.name == compressed_key(recipe)
    assert report["student"]["parameters"] == parameter_count(model)
    assert report["teacher"]["parameters"] == parameter_count(teacher)
    assert report["student"]["storage_bytes"] == storage_bytes(folder)
    assert report["ratios"]["parameters"] == pytest.approx(parameter_count(teacher) / parameter_count(model), abs=1e-3)
    evaluation = report["eval"]
    assert evaluation["speeches"] == 24 and evaluation["teacher"]["tokens"] == evaluation["teacher_tokens"]
    assert evaluation["student"]["teacher_tokens"] == evaluation["teacher_tokens"]
    assert report["ratios"]["perplexity"] == pytest.approx(
        evaluation["student"]["ppl_per_teacher_token"] / evaluation["teacher"]["ppl_per_teacher_token"], rel=1e-3)
    assert [t["technique"] for t in report["techniques"]] == ["vocab", "layers", "heads", "mlp"]
    assert report["techniques"][0]["client_token_inflation"] >= 1.0
    assert report["heal"]["steps_done"] == 30 and report["heal"]["kd_steps"] == 30
    assert report["heal"]["topk_cache"]["blocks_computed"] > 0
    assert report["public_plays"] == PUBLIC and report["recipe"] == recipe.to_dict()
    assert set(report["timings"]) >= {"load_teacher", "eval_teacher", "vocab", "layers", "heal", "save"}


def test_distillation_healing_lowers_the_public_loss(built: tuple[Recipe, Path, float]) -> None:
    heal_stats = load_report(built[1])["heal"]
    assert heal_stats["public_val_loss_after"] < heal_stats["public_val_loss_before"] - 0.1


def test_second_build_is_a_cache_hit(built: tuple[Recipe, Path, float], cache: Path) -> None:
    recipe, folder, first_seconds = built
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = build_compressed_base(recipe, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - start
    assert again == folder and seconds < 1.0 and seconds < first_seconds / 5
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_every_technique_combined(tiny_base: Path, cache: Path) -> None:
    """Low rank, sharing, magnitude pruning and bf16 together still give a plain, loadable folder."""
    recipe = tiny_recipe(
        tiny_base,
        vocab={"trim": False},
        layers={"keep": 2},
        heads={"keep_kv_heads": None},
        mlp={"keep_ratio": None},
        lowrank={"rank": 4},
        sharing={"groups": [[0, 1]]},
        magnitude={"sparsity": 0.5, "modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        heal={"steps": 4, "kd_alpha": 0.0},
        output={"dtype": "bfloat16"},
    )
    folder = build_compressed_base(recipe, cache_dir=cache, progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    report = load_report(folder)
    assert next(model.parameters()).dtype == torch.bfloat16 and report["student"]["dtype"] == "bfloat16"
    first, second = model.model.layers
    assert torch.equal(first.self_attn.q_proj.weight, second.self_attn.q_proj.weight)  # shared, saved untied
    singular = torch.linalg.svdvals(first.mlp.gate_proj.weight.float())
    assert (singular[4:] < 0.02 * singular[0]).all()  # rank 4, up to bf16 rounding
    zeros = (first.self_attn.q_proj.weight == 0).float().mean().item()
    assert zeros >= 0.3  # the zeros survive healing (global scope: per-matrix shares differ)
    magnitude = next(t for t in report["techniques"] if t["technique"] == "magnitude")
    assert magnitude["sparsity_measured"] == pytest.approx(0.5, abs=0.01)
    assert report["student"]["parameters_in_memory"] < report["student"]["parameters"]  # sharing + low rank
    assert report["student"]["parameters"] == parameter_count(model)


def test_vocabulary_from_some_public_plays_heals_on_all(built: tuple[Recipe, Path, float], tiny_base: Path,
                                                      cache: Path) -> None:
    _, folder, _ = built
    recipe = tiny_recipe(tiny_base, public_plays=PUBLIC + ["macbeth"], vocab={"plays": PUBLIC},
                         heal={"steps": 2})
    wider = build_compressed_base(recipe, cache_dir=cache, progress=False)
    report, narrow_report = load_report(wider), load_report(folder)
    vocab = next(t for t in report["techniques"] if t["technique"] == "vocab")
    assert vocab["plays"] == PUBLIC
    # The same vocabulary as from the first play alone, more healing text from both.
    assert AutoTokenizer.from_pretrained(wider).get_vocab() == AutoTokenizer.from_pretrained(folder).get_vocab()
    assert report["heal"]["public_train_blocks"] > 2 * narrow_report["heal"]["public_train_blocks"]
    assert report["public_plays"] == PUBLIC + ["macbeth"]


def test_vocabulary_can_keep_the_teachers_lowest_ids(built: tuple[Recipe, Path, float], tiny_base: Path,
                                                     cache: Path) -> None:
    _, folder, _ = built
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    lowest = len(teacher_tokenizer) - 8  # the tiny vocabulary is small: the public play uses most of it
    wider = build_compressed_base(tiny_recipe(tiny_base, vocab={"lowest_ids": lowest}, heal={"steps": 2}),
                                  cache_dir=cache, progress=False)
    teacher_tokens = teacher_tokenizer.convert_ids_to_tokens(list(range(lowest)))
    kept, narrow = AutoTokenizer.from_pretrained(wider).get_vocab(), AutoTokenizer.from_pretrained(folder).get_vocab()
    assert set(teacher_tokens) <= set(kept) and not set(teacher_tokens) <= set(narrow)
    vocab = next(t for t in load_report(wider)["techniques"] if t["technique"] == "vocab")
    assert vocab["kept_ids"] == len(kept) > len(narrow) and vocab["lowest_ids_added"] > 0


def test_run_time_finds_a_recipe_files_build_and_never_builds(built: tuple[Recipe, Path, float], cache: Path,
                                                               tmp_path: Path) -> None:
    recipe, folder, _ = built
    recipe_path = write(tmp_path, recipe.to_toml())
    spec = f"compressed:{recipe_path}"
    with pytest.raises(BaseModelError, match=f"run `python -m compressor build --recipe {recipe_path}` first"):
        materialize_base(spec, cache)
    with pytest.raises(BaseModelError, match="run `python -m compressor build` first"):
        materialize_base("compressed", tmp_path / "empty-cache")
    assert build_compressed_base(load_recipe(recipe_path), cache_dir=cache, progress=False) == folder  # a cache hit
    assert materialize_base(spec, cache) == folder
    # A recipe changed in memory is not its file's: building it records nothing for the file.
    build_compressed_base(load_recipe(recipe_path).with_overrides({"heal.steps": 2}), cache_dir=cache, progress=False)
    assert materialize_base(spec, cache) == folder
    recipe_path.write_text(recipe_path.read_text() + "seed = 1\n")
    with pytest.raises(BaseModelError, match="changed since its compressed base was built"):
        materialize_base(spec, cache)


def test_bad_recipe_for_this_teacher_names_the_key(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="layers.keep"):
        build_compressed_base(tiny_recipe(tiny_base, layers={"keep": 5}), cache_dir=tmp_path, progress=False)


# --- pieces --------------------------------------------------------------------------------------


def test_live_distillation_with_hidden_matching_lowers_the_student_loss(tiny_base: Path) -> None:
    recipe = tiny_recipe(tiny_base, heal={"steps": 25, "kd_alpha": 0.7, "kd_topk": 0, "hidden_weight": 1.0})
    teacher = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    blocks = token_blocks(tokenizer, public_texts(recipe)[:400], 32)
    held, train = blocks[:8], blocks[8:]
    student = drop_layers(copy.deepcopy(teacher), [0])
    before = public_loss(student, held)
    stats = heal(student, train, recipe, teacher=teacher, layer_map={0: 0, 1: 1})
    assert stats["kd_steps"] == 25 and stats["steps_done"] == 25
    assert public_loss(student, held) < before - 0.1


def test_heal_stops_at_the_time_budget(tiny_base: Path) -> None:
    recipe = tiny_recipe(tiny_base, heal={"steps": 10_000, "kd_alpha": 0.0})
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    blocks = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    attention = model.config._attn_implementation
    stats = heal(model, blocks, recipe, time_budget_s=0.5)
    assert stats["stopped_by"] == "time_budget" and 0 < stats["steps_done"] < 10_000
    assert model.config._attn_implementation == attention == "sdpa"  # healing's attention is not saved


def test_healing_attention_computes_what_sdpa_does(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # padding: the mask must reach the attention too
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(HEALING_ATTENTION)
        got = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("freeze", [True, False])
def test_heal_can_keep_the_teachers_embedding(tiny_base: Path, freeze: bool) -> None:
    recipe = tiny_recipe(tiny_base, heal={"steps": 3, "kd_alpha": 0.0, "freeze_embeddings": freeze})
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    embedding = model.get_input_embeddings().weight.detach().clone()
    block = copy.deepcopy(model.model.layers[0].mlp.up_proj.weight.detach())
    heal(model, torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0)), recipe)
    assert torch.equal(model.get_input_embeddings().weight, embedding) == freeze
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, block)  # the blocks still train


def test_perplexity_per_teacher_token_is_fair(tiny_base: Path) -> None:
    """Scoring whole documents: the same text, whatever the tokenizer, and the teacher's own count."""
    recipe = tiny_recipe(tiny_base)
    documents = client_eval_documents(recipe)
    assert sum(len(d) for d in documents) == 24 and documents == client_eval_documents(recipe)
    assert all(sum(map(len, d)) <= recipe.eval.document_chars or len(d) == 1 for d in documents)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    score = score_documents(model, tokenizer, documents).as_dict()
    assert score["ppl_per_teacher_token"] == score["ppl_per_own_token"]
    # Batching and padding do not change the total.
    one_by_one = sum(score_documents(model, tokenizer, [d]).nll for d in documents)
    assert score["nll"] == pytest.approx(one_by_one, rel=1e-4)
    # Given more teacher tokens for the same NLL, the per-teacher-token perplexity is lower.
    doubled = score_documents(model, tokenizer, documents, reference_tokens=2 * score["tokens"]).as_dict()
    assert doubled["ppl_per_teacher_token"] < score["ppl_per_own_token"]


# --- command line ----------------------------------------------------------------------------------


def test_cli_report_key_and_out(built: tuple[Recipe, Path, float], cache: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    recipe, folder, _ = built
    recipe_path = write(tmp_path, recipe.to_toml())
    assert main(["report", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == folder.name
    assert main(["key", "--recipe", str(recipe_path), "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    out = tmp_path / "exported"
    assert main(["build", "--recipe", str(recipe_path), "--cache-dir", str(cache), "--out", str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").is_file() and (out / REPORT_JSON).is_file()
    assert main(["build", "--recipe", str(recipe_path), "--cache-dir", str(cache), "--out", str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["build", "--recipe", str(tmp_path / "nope.toml"), "--quiet"]) == 2
    assert "recipe file not found" in capsys.readouterr().err

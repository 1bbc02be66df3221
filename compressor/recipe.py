"""Compression recipes: a TOML file saying how to turn a teacher LM into a compressed base.

A recipe is parsed into frozen dataclasses (``Recipe`` and one section class per technique) and
checked strictly: an unknown key, a value of the wrong type or out of range, or a missing file raises
``RecipeError`` naming the file, the key (``heal.steps``) and the value. Every key has a default, so
an empty file is a valid recipe that compresses nothing (the teacher, re-saved).

Layout (see ``recipes/default.toml`` for the shipped defaults, and docs/compression.md)::

    name = "default"
    teacher = "smollm2"              # base spec: "smollm2", a .gguf file, an HF folder or hub id
    public_plays = ["pericles", ...] # server-side text: healing, vocabulary, activation scores
    seed = 0
    calibration_blocks = 32          # public blocks for activation/importance scores and bridges
    time_budget_s = 540              # the whole build: healing stops early to finish within it

    [vocab]      trim = true, word_forms = ["as-is"], plays = [...] (a subset of public_plays), lowest_ids = 0
    [layers]     keep = 8, how = "ends" | "even" | "first" | "importance", bridge = true
    [heads]      keep_kv_heads = 2, scores = "activation" | "weight"
    [mlp]        keep_ratio = 0.7, scores = "activation" | "weight"
    [magnitude]  sparsity = 0.5, scope = "global" | "layer", modules = [...]
    [lowrank]    rank = 128 (or energy = 0.9), modules = ["gate_proj", "up_proj", "down_proj"]
    [sharing]    groups = [[2, 3], [4, 5]], init = "first" | "mean"
    [emulator]   first_blocks = 2, last_blocks = 2 (the teacher's own, frozen: adapters go there)
    [heal]       steps, batch_size, seq_len, learning_rate, warmup_steps, time_budget_s,
                 kd_alpha, kd_temperature, kd_start, kd_topk, hidden_weight, autocast, teacher_dtype
    [eval]       min_speeches, speeches, speeches_per_user, document_chars, seed
    [output]     dtype = "float32" | "bfloat16"

The public plays are set aside from the federation: a federation built on this base must exclude
them from its users (``Recipe.public_plays`` is the list to pass as ``exclude_plays``).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.layers import LAYER_SELECTIONS, LINEAR_NAMES, MLP_LINEARS
from compressor.sharing import SHARING_INITS
from compressor.vocab import WORD_FORMS

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "default.toml"
SCORE_KINDS = ("activation", "weight")
PRUNE_SCOPES = ("global", "layer")
OUTPUT_DTYPES = ("float32", "bfloat16")


class RecipeError(ValueError):
    """A recipe file is missing, not TOML, or has an unknown key or a bad value (named in the message)."""


# --- sections ----------------------------------------------------------------------------------------
# Each field may carry metadata: "choices" (allowed values), "min"/"max" (inclusive bounds),
# "min_open"/"max_open" (exclusive bounds), "help" (shown in errors and docs).


def _field(default: Any = None, *, factory: Any = None, **meta: Any) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class VocabSection:
    """Trim the vocabulary to the token ids the public text uses (plus what BPE needs to stay whole).

    ``word_forms``: also keep the tokens of every public word written in these forms (``as-is``,
    ``lower``, ``capitalized``, ``upper``), each with and without a leading space, so that client
    text that uses a public word in another position (sentence start, after a dash) keeps its tokens.
    ``plays``: take the vocabulary from these public plays only (all of them when empty); the other
    public plays still heal the student, spelt with the trimmed tokenizer's smaller pieces where
    their words lost tokens. More healing text without more embedding rows.
    ``lowest_ids``: also keep the teacher's ids below this (a byte-level BPE numbers its merges in
    the order it learnt them, so the lowest ids are the most frequent pieces of its training text).
    """

    trim: bool = False
    word_forms: tuple[str, ...] = _field(factory=tuple, choices=WORD_FORMS)
    plays: tuple[str, ...] = ()
    lowest_ids: int = _field(0, min=0)


@dataclass(frozen=True)
class LayersSection:
    """Keep ``keep`` decoder blocks (all when unset), chosen by ``how``.

    ``bridge``: fit a linear map across each gap of dropped blocks on the public calibration text and
    fold it into the last kept block before the gap (``bridge.bridge_gaps``); far less to heal.
    With ``[emulator]``, ``keep`` counts the middle blocks kept and ``how`` chooses among them.
    """

    keep: int | None = _field(None, min=1)
    how: str = _field("ends", choices=LAYER_SELECTIONS)
    bridge: bool = False


@dataclass(frozen=True)
class EmulatorSection:
    """An emulator base (Offsite-Tuning, FedBiOT): the teacher's first and last blocks kept exactly.

    The ``first_blocks`` and ``last_blocks`` blocks, the embedding, the final norm and the head stay
    the teacher's, frozen and bit-identical in the saved dtype: adapters trained there plug into the
    teacher. ``[layers]`` then chooses among the middle blocks only (``keep`` counts middle blocks),
    and healing trains the middle only, to reproduce the teacher's hidden state leaving the middle
    given the one entering it (``compressor.emulator``), plus ``heal.kd_alpha`` x T^2 x KL on the
    output when set. Off (an ordinary compressed base) while both counts are 0.
    """

    first_blocks: int = _field(0, min=0)
    last_blocks: int = _field(0, min=0)

    @property
    def enabled(self) -> bool:
        return self.first_blocks + self.last_blocks > 0


@dataclass(frozen=True)
class HeadsSection:
    """Keep ``keep_kv_heads`` KV groups (a key/value head and its query heads) in every block."""

    keep_kv_heads: int | None = _field(None, min=1)
    scores: str = _field("activation", choices=SCORE_KINDS)


@dataclass(frozen=True)
class MlpSection:
    """Keep ``keep_ratio`` of every block's MLP neurons."""

    keep_ratio: float | None = _field(None, min_open=0.0, max=1.0)
    scores: str = _field("activation", choices=SCORE_KINDS)


@dataclass(frozen=True)
class MagnitudeSection:
    """Zero the ``sparsity`` smallest weights of the named projections (dense on disk: reported honestly)."""

    sparsity: float = _field(0.0, min=0.0, max_open=1.0)
    scope: str = _field("global", choices=PRUNE_SCOPES)
    modules: tuple[str, ...] = _field(factory=lambda: LINEAR_NAMES, choices=LINEAR_NAMES)


@dataclass(frozen=True)
class LowRankSection:
    """Truncated-SVD factorization of the named projections: ``rank`` or ``energy`` (memory only)."""

    rank: int | None = _field(None, min=1)
    energy: float | None = _field(None, min_open=0.0, max=1.0)
    modules: tuple[str, ...] = _field(factory=lambda: MLP_LINEARS, choices=LINEAR_NAMES)

    @property
    def enabled(self) -> bool:
        return self.rank is not None or self.energy is not None


@dataclass(frozen=True)
class SharingSection:
    """Blocks of each group (indices after layer dropping) share one set of weights (memory only)."""

    groups: tuple[tuple[int, ...], ...] = _field(factory=tuple)
    init: str = _field("first", choices=SHARING_INITS)


@dataclass(frozen=True)
class HealSection:
    """Training the student on the public text after compression.

    Loss per step: plain cross-entropy before ``kd_start`` (a fraction of ``steps``), then
    (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || student) with T = ``kd_temperature``; with
    ``kd_topk`` > 0 the teacher is known by its top-k logits, computed once per block and cached on
    disk; with 0 the teacher runs live on every step. ``hidden_weight`` > 0 adds hidden-state MSE
    to the teacher's matching blocks (live teacher only). Healing stops after ``steps`` or when
    ``time_budget_s`` is exceeded, whichever comes first. ``autocast`` runs the student's
    forward and backward under bfloat16 autocast (fp32 weights and optimizer); ``teacher_dtype`` is the
    dtype of the distillation teacher's weights (bfloat16: faster forward passes on CPU).
    ``freeze_embeddings`` keeps the (tied) embedding and output head as the teacher had them: the
    public text never names most of the client tokens, and training the head on it only pushes them down.
    """

    steps: int = _field(0, min=0)
    batch_size: int = _field(8, min=1)
    seq_len: int = _field(128, min=8)
    learning_rate: float = _field(5e-4, min_open=0.0, max=1.0)
    warmup_steps: int = _field(10, min=0)
    min_lr_ratio: float = _field(0.1, min=0.0, max=1.0)
    weight_decay: float = _field(0.0, min=0.0)
    time_budget_s: float | None = _field(None, min_open=0.0)
    kd_alpha: float = _field(0.0, min=0.0, max=1.0)
    kd_temperature: float = _field(1.0, min_open=0.0)
    kd_start: float = _field(0.0, min=0.0, max=1.0)
    kd_topk: int = _field(0, min=0)
    hidden_weight: float = _field(0.0, min=0.0)
    autocast: bool = False
    teacher_dtype: str = _field("float32", choices=OUTPUT_DTYPES)
    freeze_embeddings: bool = False
    eval_blocks: int = _field(16, min=1)

    @property
    def uses_teacher(self) -> bool:
        return self.steps > 0 and ((self.kd_alpha > 0 and self.kd_start < 1) or self.hidden_weight > 0)


@dataclass(frozen=True)
class EvalSection:
    """Held-out client text for the report: test speeches of the federation's users.

    ``speeches`` test speeches in all, the first ``speeches_per_user`` of each user (users in a
    seeded order), packed per user into documents of at most ``document_chars`` characters.
    """

    min_speeches: int = _field(60, min=2)
    speeches: int = _field(200, min=1)
    speeches_per_user: int = _field(10, min=1)
    document_chars: int = _field(2000, min=1)
    seed: int = 0


@dataclass(frozen=True)
class OutputSection:
    """How the compressed base is saved."""

    dtype: str = _field("float32", choices=OUTPUT_DTYPES)


@dataclass(frozen=True)
class Recipe:
    """A whole recipe; ``to_dict()`` is its canonical content (what the cache key hashes)."""

    name: str = "unnamed"
    teacher: str = "smollm2"
    public_plays: tuple[str, ...] = ()
    seed: int = 0
    calibration_blocks: int = _field(32, min=1)
    time_budget_s: float | None = _field(None, min_open=0.0)
    vocab: VocabSection = field(default_factory=VocabSection)
    layers: LayersSection = field(default_factory=LayersSection)
    heads: HeadsSection = field(default_factory=HeadsSection)
    mlp: MlpSection = field(default_factory=MlpSection)
    magnitude: MagnitudeSection = field(default_factory=MagnitudeSection)
    lowrank: LowRankSection = field(default_factory=LowRankSection)
    sharing: SharingSection = field(default_factory=SharingSection)
    emulator: EmulatorSection = field(default_factory=EmulatorSection)
    heal: HealSection = field(default_factory=HealSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    source: str | None = field(default=None, compare=False, metadata={"internal": True})

    @property
    def vocab_plays(self) -> tuple[str, ...]:
        """The public plays the vocabulary is trimmed to: ``vocab.plays``, or all of them when unset."""
        return self.vocab.plays or self.public_plays

    def to_dict(self) -> dict[str, Any]:
        """Every setting, defaults filled in (``source``, where it was read from, left out)."""
        return _to_plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"})

    def to_toml(self) -> str:
        """The recipe as TOML (unset optional values are left out, as TOML has no null)."""
        return _dump_toml(self.to_dict())

    def replace(self, **changes: Any) -> Recipe:
        """A copy with top-level fields replaced and validated, e.g. ``recipe.replace(teacher="x")``."""
        data = self.to_dict() | changes
        return recipe_from_dict(data, source=self.source)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Recipe:
        """A copy with dotted keys replaced and validated: ``{"heal.steps": 0, "layers.keep": 6}``."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            target = data
            *parents, last = dotted.split(".")
            for part in parents:
                if not isinstance(target.get(part), dict):
                    raise RecipeError(f"{self.source or 'recipe'}: unknown key {dotted!r}")
                target = target[part]
            target[last] = value
        return recipe_from_dict(data, source=self.source)

    def check(self) -> None:
        """Cross-section checks that do not need the teacher (called by ``recipe_from_dict``)."""
        where = self.source or "recipe"
        needs_text = []
        if self.vocab.trim:
            needs_text.append("vocab.trim")
        if self.heal.steps > 0:
            needs_text.append("heal.steps > 0")
        if self.layers.how == "importance" and self.layers.keep is not None:
            needs_text.append('layers.how = "importance"')
        if self.layers.bridge and self.layers.keep is not None:
            needs_text.append("layers.bridge")
        if self.heads.keep_kv_heads is not None and self.heads.scores == "activation":
            needs_text.append('heads.scores = "activation"')
        if self.mlp.keep_ratio is not None and self.mlp.scores == "activation":
            needs_text.append('mlp.scores = "activation"')
        if needs_text and not self.public_plays:
            raise RecipeError(f"{where}: public_plays is empty but {', '.join(needs_text)} needs public text")
        if self.lowrank.rank is not None and self.lowrank.energy is not None:
            raise RecipeError(f"{where}: lowrank.rank and lowrank.energy are exclusive; set one of them")
        if self.heal.hidden_weight > 0 and self.heal.kd_topk > 0:
            raise RecipeError(f"{where}: heal.hidden_weight needs the live teacher; set heal.kd_topk = 0")
        flat = [i for group in self.sharing.groups for i in group]
        if any(len(group) < 2 for group in self.sharing.groups):
            raise RecipeError(f"{where}: sharing.groups: every group needs at least 2 blocks, got {self.sharing.groups}")
        if len(flat) != len(set(flat)) or any(i < 0 for i in flat):
            raise RecipeError(f"{where}: sharing.groups must be disjoint non-negative block indices, got "
                              f"{[list(g) for g in self.sharing.groups]}")
        if self.sharing.groups and self.lowrank.energy is not None:
            raise RecipeError(f"{where}: sharing needs equal shapes; use lowrank.rank, not lowrank.energy")
        if len(set(self.public_plays)) != len(self.public_plays):
            raise RecipeError(f"{where}: public_plays has repeats: {list(self.public_plays)}")
        outside = sorted(set(self.vocab.plays) - set(self.public_plays))
        if outside:
            raise RecipeError(f"{where}: vocab.plays must be public plays; not in public_plays: {outside}")
        if self.vocab.plays and not self.vocab.trim:
            raise RecipeError(f"{where}: vocab.plays needs vocab.trim = true")
        self._check_emulator(where)
        known = _known_plays()
        if known is not None:
            unknown = sorted(set(self.public_plays) - known)
            if unknown:
                raise RecipeError(f"{where}: public_plays: unknown play(s) {unknown}; known plays: {sorted(known)}")


    def _check_emulator(self, where: str) -> None:
        """An emulator's edge blocks must stay the teacher's: refuse what would change them."""
        if not self.emulator.enabled:
            return
        # A Llama config has one head count and one MLP width for every block, and these techniques
        # act on every block: the edges would change.
        refused = {"heads.keep_kv_heads": self.heads.keep_kv_heads is not None,
                   "mlp.keep_ratio": self.mlp.keep_ratio is not None,
                   "magnitude.sparsity": self.magnitude.sparsity > 0,
                   "lowrank": self.lowrank.enabled,
                   "sharing.groups": bool(self.sharing.groups),
                   # the emulator's distillation has its own hidden-state term and needs the live teacher
                   "heal.hidden_weight": self.heal.hidden_weight > 0,
                   "heal.kd_topk": self.heal.kd_topk > 0,
                   "heal.kd_start": self.heal.kd_start > 0}
        named = [key for key, used in refused.items() if used]
        if named:
            raise RecipeError(f"{where}: [emulator] keeps the teacher's edge blocks exactly and distills the middle "
                              f"from the live teacher; not supported with it: {', '.join(named)}")


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --- loading -----------------------------------------------------------------------------------------


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Parse and validate a recipe TOML file (the shipped default when ``path`` is None)."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
        raise RecipeError(f"recipe file not found: {path} (shipped recipes in {RECIPES_DIR}: {shipped})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read ({error})") from error
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: Mapping[str, Any], source: str | None = None) -> Recipe:
    """Build and validate a Recipe from plain data (as TOML gives it); errors name the key."""
    where = source or "recipe"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: a recipe is a table of keys, got {type(data).__name__}")
    recipe = _build(Recipe, data, where, prefix="")
    recipe = dataclasses.replace(recipe, source=source)
    recipe.check()
    return recipe


def _build(cls: type, data: Mapping[str, Any], where: str, prefix: str) -> Any:
    hints = _resolved_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        raise RecipeError(f"{where}: unknown key {key!r}; known keys{' in [' + prefix[:-1] + ']' if prefix else ''}: "
                          f"{sorted(fields)}")
    values = {}
    for name, value in data.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise RecipeError(f"{where}: {key!r} must be a table ([{key}]), got {value!r}")
            values[name] = _build(hint, value, where, prefix=key + ".")
        else:
            values[name] = _convert(value, hint, fields[name].metadata, key, where)
    return cls(**values)


def _convert(value: Any, hint: Any, meta: Mapping[str, Any], key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``hint`` and the field's metadata; return it normalised."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], meta, key, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: {key} must be a list, got {value!r}")
        item_hint = args[0]
        items = tuple(_convert(item, item_hint, meta, f"{key}[{i}]", where) for i, item in enumerate(value))
        return items
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: {key} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: {key} must be a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: {key} must be a string, got {value!r}")
    else:  # pragma: no cover - every annotation above is handled
        raise RecipeError(f"{where}: {key}: unsupported type {hint}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise RecipeError(f"{where}: {key} = {value!r} is not one of {list(choices)}")
    bounds = [("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
              ("min_open", lambda v, b: v > b, ">"), ("max_open", lambda v, b: v < b, "<")]
    for name, ok, symbol in bounds:
        if name in meta and not ok(value, meta[name]):
            raise RecipeError(f"{where}: {key} = {value!r} is out of range: must be {symbol} {meta[name]}")
    return value


def _known_plays() -> set[str] | None:
    """Names of the Shakespeare plays, or None when the corpus is not installed (checked at build)."""
    try:
        from shared.data import shakespeare_root

        return {path.stem for path in shakespeare_root().glob("*/*.md")}
    except Exception:  # noqa: BLE001 - the build reports a missing corpus itself
        return None


# --- serialising -------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("internal")}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def canonical_json(recipe: Recipe) -> str:
    """The recipe's content as canonical JSON: same settings, same string (comments and order ignored).

    Settings at their default value are left out, so adding a setting whose default keeps the old
    behaviour leaves every existing recipe's cache key as it was. Changing a default's value changes
    what recipes build: bump ``cache.PIPELINE_VERSION`` then.
    """
    return json.dumps(_changed(recipe.to_dict(), Recipe().to_dict()), sort_keys=True, separators=(",", ":"))


def _changed(settings: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``settings`` that differ from ``defaults``, per section."""
    changed = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            section = _changed(value, defaults.get(name, {}))
            if section:
                changed[name] = section
        elif name not in defaults or value != defaults[name]:
            changed[name] = value
    return changed


def _dump_toml(data: Mapping[str, Any]) -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars.items() if v is not None]
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")

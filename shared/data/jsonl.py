"""A user's own data: a JSONL file of ``{"text": ..., "domain": ...}`` objects, one per line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.data.users import DEFAULT_DOMAIN, DataError, UserData, split_texts


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

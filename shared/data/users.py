"""What every data source ends in: a user (its domain, its train and test texts), and how texts are split.

Also the federation-wide helpers over users: choosing a balanced set of them, and counting them.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SPLIT_MODES = ("random", "temporal")
DEFAULT_DOMAIN = "default"


class DataError(ValueError):
    """Bad or missing data; the message names the file and the problem."""


@dataclass(frozen=True)
class UserData:
    """One federated user: its texts split into train and held-out test."""

    user_id: str  # "<play>/<character>" for Shakespeare, e.g. "macbeth/LADY MACBETH"
    domain: str  # the genre for Shakespeare
    train: list[str]
    test: list[str]


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


def user_seed(seed: int, user_id: str) -> int:
    """A per-user seed, so users with equally many texts do not hold out the same positions."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


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

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server.ledger import Ledger  # noqa: E402
from tiny import build_base_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer, saved as an HF folder."""
    return build_base_folder(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture
def ledger(tmp_path: Path):
    """A fresh SQLite round ledger in the test's folder."""
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        yield ledger

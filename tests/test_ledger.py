"""The round ledger (server.ledger) on SQLite and PostgreSQL.

PostgreSQL tests use the server at FEDGRAFT_TEST_POSTGRES_URL (default: 127.0.0.1:5432, database
``test``), each in a fresh schema dropped afterwards. Where it cannot be reached they skip, unless
the CI environment variable is set: there they fail.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from server.ledger import Base, Ledger, LedgerError, Run, migrate

POSTGRES_URL = os.environ.get(
    "FEDGRAFT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_UINT64 = 2**64 - 1
GIB = 2**30  # byte counts above 2**31 need BigInteger columns

EXPECTED_COLUMNS = {
    "runs": {
        "id", "flower_run_id", "config", "base_model", "base_hash", "method",
        "started_at", "finished_at", "status",
    },
    "rounds": {
        "id", "run_id", "number", "started_at", "finished_at", "clients_sampled",
        "clients_replied", "clients_failed", "metrics", "bytes_down", "bytes_up",
    },
    "client_results": {
        "id", "round_id", "node_id", "phase", "user_id", "domain", "status", "num_examples",
        "metrics", "bytes_up", "bytes_down", "seconds", "error",
    },
    "events": {"id", "run_id", "round_number", "created_at", "kind", "node_id", "message"},
    "checkpoints": {
        "id", "run_id", "round_number", "domain", "content_hash", "num_bytes", "data", "created_at",
    },
    "privacy_rounds": {
        "id", "round_id", "mode", "noise_multiplier", "clipping_norm", "sampled", "available", "sampling_rate",
        "delta", "round_epsilon", "epsilon",
    },
    "privacy_charges": {"id", "round_id", "user_id", "devices", "noise_multiplier", "rounds", "epsilon"},
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """Where one test's ledger lives: a URL, plus the PostgreSQL schema reserved for the test."""

    backend: str
    url: str
    schema: str | None = None

    def open(self, **kwargs: Any) -> Ledger:
        return Ledger(self.url, schema=self.schema, **kwargs)

    def table_names(self) -> set[str]:
        """The tables there, seen through an engine of the test's own (not a Ledger's)."""
        engine = create_engine(self.url)
        try:
            with engine.connect() as connection:
                return set(inspect(connection).get_table_names(schema=self.schema))
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            pass
    except OperationalError as error:
        engine.dispose()
        reason = f"PostgreSQL at {POSTGRES_URL} cannot be reached: {' '.join(str(error.orig).split())}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A place for an empty ledger: a SQLite file in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield Target("sqlite", f"sqlite:///{tmp_path / 'ledger.db'}")
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    schema = f"fedgraft_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield Target("postgres", POSTGRES_URL, schema)
    finally:
        with admin.begin() as connection:
            # A connection left in a transaction by a failed test must not hang the whole session.
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture
def ledger(ledger_url: Target) -> Iterator[Ledger]:
    with ledger_url.open() as ledger:
        yield ledger


def start_run(ledger: Ledger, flower_run_id: str | int = 7, **config: Any) -> int:
    return ledger.start_run(flower_run_id, config, "smollm2", "ab" * 32)


# --- migrations ---------------------------------------------------------------------------------


def test_migrations_create_the_schema_and_downgrade_removes_it(ledger_url: Target) -> None:
    assert ledger_url.table_names() == set()

    with ledger_url.open() as ledger:
        with ledger.engine.connect() as connection:
            assert migrate.current_revision(connection) == migrate.head_revision() == "0002"
            assert_schema_matches_models(connection)

        with ledger.engine.begin() as connection:
            migrate.downgrade(connection, "base")
        assert ledger_url.table_names() <= {"alembic_version"}
        with ledger.engine.connect() as connection:
            assert migrate.current_revision(connection) is None

        with ledger.engine.begin() as connection:
            migrate.upgrade(connection)
        with ledger.engine.connect() as connection:
            assert_schema_matches_models(connection)
        ledger.start_round(start_run(ledger), 1, clients_sampled=1, bytes_down=1)


def assert_schema_matches_models(connection: Any) -> None:
    inspector = inspect(connection)
    assert set(inspector.get_table_names()) == set(EXPECTED_COLUMNS) | {"alembic_version"}
    for table, columns in EXPECTED_COLUMNS.items():
        assert {column["name"] for column in inspector.get_columns(table)} == columns, table
    assert {"ix_client_results_round_id_node_id", "ix_rounds_run_id", "ix_events_run_id"} <= {
        index["name"] for table in EXPECTED_COLUMNS for index in inspector.get_indexes(table)
    }
    # Types, nullability, indexes and unique constraints of the migrated database = the models.
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    assert compare_metadata(context, Base.metadata) == []


def test_a_migration_failing_part_way_leaves_the_database_as_it_was(ledger_url: Target) -> None:
    with ledger_url.open() as ledger:
        run_id = start_run(ledger)
        with pytest.raises(RuntimeError, match="crash"):
            with ledger.engine.begin() as connection:
                migrate.downgrade(connection, "base")
                raise RuntimeError("crash")  # as if the process died before the commit
        assert ledger_url.table_names() == set(EXPECTED_COLUMNS) | {"alembic_version"}
        assert [run.id for run in ledger.runs()] == [run_id]


def test_opening_twice_does_not_migrate_again(ledger_url: Target) -> None:
    with ledger_url.open() as first:
        run_id = start_run(first)
    with ledger_url.open() as second:
        assert [run.id for run in second.runs()] == [run_id]


# --- writing and reading back -------------------------------------------------------------------


def test_full_run_lifecycle_reads_back(ledger: Ledger) -> None:
    config = {"num-server-rounds": 3, "lora-r": 8, "learning-rate": 0.002, "data": "shakespeare", "x": None}
    run_id = ledger.start_run(42, config, "smollm2", "ab" * 32, method="fedprox")
    other_id = start_run(ledger, 43)
    for number in (1, 2, 3):
        ledger.start_round(run_id, number, clients_sampled=3, bytes_down=number * 5 * GIB)
        ledger.start_round(other_id, number, clients_sampled=1, bytes_down=1)  # noise in another run
        for node in (11, 12):
            ledger.record_client_result(
                run_id, number, node_id=node, status="ok", user_id=f"user-{node}", domain="comedy",
                num_examples=100 + node, metrics={"train_loss": 2.0 / number, "steps": 12},
                bytes_up=3 * GIB + node, bytes_down=5 * GIB, seconds=1.5,
            )  # fmt: skip
        ledger.record_client_result(run_id, number, node_id=13, status="failed", error="timed out")
        ledger.record_event(run_id, "client-failed", "node 13 timed out", round_number=number, node_id=13)
        ledger.finish_round(
            run_id, number, clients_replied=2, clients_failed=1,
            metrics={"train_loss": 2.0 / number, "eval_loss": 3.0 / number}, bytes_up=number * 6 * GIB,
        )  # fmt: skip
    ledger.record_event(run_id, "run-completed", "3 rounds")
    ledger.finish_run(run_id, "completed")

    run = ledger.run(run_id)
    assert (run.id, run.flower_run_id, run.config) == (run_id, "42", config)
    assert (run.base_model, run.base_hash, run.method) == ("smollm2", "ab" * 32, "fedprox")
    assert run.status == "completed"
    assert run.started_at.tzinfo == timezone.utc and run.finished_at is not None
    assert run.started_at <= run.finished_at
    runs = ledger.runs()
    assert [r.id for r in runs] == [run_id, other_id]
    assert (runs[1].status, runs[1].method, runs[1].finished_at) == ("running", "fedavg", None)

    rounds = ledger.rounds(run_id)
    assert [r.number for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert (r.run_id, r.clients_sampled, r.clients_replied, r.clients_failed) == (run_id, 3, 2, 1)
        assert r.metrics == {"train_loss": 2.0 / r.number, "eval_loss": 3.0 / r.number}
        assert (r.bytes_down, r.bytes_up) == (r.number * 5 * GIB, r.number * 6 * GIB)
        assert r.finished_at is not None and r.started_at <= r.finished_at <= run.finished_at
        assert r.finished_at.tzinfo == timezone.utc

    results = ledger.client_results(run_id)
    assert [(c.round_number, c.node_id, c.status) for c in results] == [
        (number, node, status)
        for number in (1, 2, 3)
        for node, status in (("11", "ok"), ("12", "ok"), ("13", "failed"))
    ]
    ok = results[3]
    assert (ok.run_id, ok.user_id, ok.domain, ok.num_examples) == (run_id, "user-11", "comedy", 111)
    assert ok.metrics == {"train_loss": 1.0, "steps": 12}
    assert (ok.bytes_up, ok.bytes_down, ok.seconds, ok.error) == (3 * GIB + 11, 5 * GIB, 1.5, None)
    failed = results[2]
    assert (failed.error, failed.metrics, failed.num_examples, failed.user_id, failed.seconds) == (
        "timed out", {}, 0, None, None,
    )  # fmt: skip
    assert [c.node_id for c in ledger.client_results(run_id, round_number=2)] == ["11", "12", "13"]
    assert {c.round_number for c in ledger.client_results(run_id, round_number=2)} == {2}
    assert len(ledger.client_results(other_id)) == 0

    events = ledger.events(run_id)
    assert [(e.kind, e.round_number, e.node_id) for e in events] == [
        ("client-failed", 1, "13"), ("client-failed", 2, "13"), ("client-failed", 3, "13"),
        ("run-completed", None, None),
    ]  # fmt: skip
    assert events[-1].message == "3 rounds" and events[0].created_at <= events[-1].created_at
    assert ledger.events(other_id) == []


def test_rounds_are_read_in_number_order(ledger: Ledger) -> None:
    run_id = start_run(ledger)
    for number in (3, 1, 2):
        ledger.start_round(run_id, number, clients_sampled=number, bytes_down=0)
    assert [(r.number, r.clients_sampled, r.finished_at) for r in ledger.rounds(run_id)] == [
        (1, 1, None), (2, 2, None), (3, 3, None),
    ]  # fmt: skip


def test_records_stay_usable_after_the_ledger_is_closed(ledger_url: Target) -> None:
    with ledger_url.open() as ledger:
        run_id = start_run(ledger, lr=0.1)
        ledger.start_round(run_id, 1, clients_sampled=2, bytes_down=3)
        runs, rounds = ledger.runs(), ledger.rounds(run_id)
    assert runs[0].config == {"lr": 0.1} and rounds[0].clients_sampled == 2


@pytest.mark.parametrize(
    "flower_id", [MAX_UINT64, str(MAX_UINT64), np.uint64(MAX_UINT64)], ids=["int", "str", "numpy"]
)
def test_unsigned_64_bit_flower_ids_round_trip_exactly(ledger: Ledger, flower_id: Any) -> None:
    run_id = start_run(ledger, flower_id)
    ledger.start_round(run_id, 1, clients_sampled=1, bytes_down=0)
    ledger.record_client_result(run_id, 1, node_id=flower_id, status="ok")
    ledger.record_event(run_id, "update-rejected", "too large", round_number=1, node_id=flower_id)

    assert ledger.run(run_id).flower_run_id == "18446744073709551615"
    assert ledger.client_results(run_id)[0].node_id == "18446744073709551615"
    assert ledger.events(run_id)[0].node_id == "18446744073709551615"


def test_a_round_can_be_started_only_once_per_run(ledger: Ledger) -> None:
    run_id, other_id = start_run(ledger), start_run(ledger)
    ledger.start_round(run_id, 1, clients_sampled=2, bytes_down=10)
    with pytest.raises(LedgerError, match="round 1 of run .* already"):
        ledger.start_round(run_id, 1, clients_sampled=5, bytes_down=50)

    ledger.start_round(other_id, 1, clients_sampled=5, bytes_down=50)  # same number, another run
    ledger.start_round(run_id, 2, clients_sampled=2, bytes_down=10)  # the failed write left no mess
    assert [(r.number, r.clients_sampled) for r in ledger.rounds(run_id)] == [(1, 2), (2, 2)]


def test_writes_about_unknown_runs_or_rounds_are_refused(ledger: Ledger) -> None:
    run_id = start_run(ledger)
    with pytest.raises(LedgerError, match="no run 999"):
        ledger.start_round(999, 1, clients_sampled=1, bytes_down=0)
    with pytest.raises(LedgerError, match="no run 999"):
        ledger.run(999)
    with pytest.raises(LedgerError, match="round 4 of run .* never started"):
        ledger.record_client_result(run_id, 4, node_id=1, status="ok")
    with pytest.raises(LedgerError, match="round 4 of run .* never started"):
        ledger.finish_round(run_id, 4, clients_replied=0, clients_failed=0, metrics={}, bytes_up=0)
    with pytest.raises(LedgerError, match="no run 999"):
        ledger.record_event(999, "resume", "from round 3")
    assert ledger.rounds(999) == [] and ledger.events(999) == []


def test_invalid_statuses_are_rejected(ledger: Ledger) -> None:
    run_id = start_run(ledger)
    ledger.start_round(run_id, 1, clients_sampled=1, bytes_down=0)

    with pytest.raises(ValueError, match="'completed', 'failed', 'interrupted'.*'done'"):
        ledger.finish_run(run_id, "done")
    with pytest.raises(ValueError, match="not 'running'"):
        ledger.finish_run(run_id, "running")
    with pytest.raises(ValueError, match="'ok', 'failed', 'rejected'.*'success'"):
        ledger.record_client_result(run_id, 1, node_id=1, status="success")
    assert ledger.run(run_id).status == "running" and ledger.client_results(run_id) == []

    # The database refuses them too, for writers that bypass the Ledger.
    with pytest.raises(IntegrityError):
        with ledger.engine.begin() as connection:
            connection.execute(Run.__table__.update().values(status="done"))


def test_non_finite_metrics_are_stored_as_none(ledger: Ledger) -> None:
    nan, inf = float("nan"), float("inf")
    run_id = ledger.start_run(1, {"lr": nan, "clip": inf, "nested": {"a": [1.0, -inf]}}, "smollm2", "ab" * 32)
    ledger.start_round(run_id, 1, clients_sampled=1, bytes_down=0)
    client_metrics = {"loss": np.float32("nan"), "acc": 0.5}
    ledger.record_client_result(run_id, 1, node_id=1, status="ok", metrics=client_metrics)
    ledger.finish_round(
        run_id, 1, clients_replied=1, clients_failed=0,
        metrics={"loss": nan, "up": inf, "down": -inf, "acc": np.float64(0.75), "n": np.int64(3)}, bytes_up=0,
    )  # fmt: skip

    assert ledger.run(run_id).config == {"lr": None, "clip": None, "nested": {"a": [1.0, None]}}
    assert ledger.client_results(run_id)[0].metrics == {"loss": None, "acc": 0.5}
    metrics = ledger.rounds(run_id)[0].metrics
    assert metrics == {"loss": None, "up": None, "down": None, "acc": 0.75, "n": 3}
    assert type(metrics["n"]) is int


# --- checkpoints --------------------------------------------------------------------------------


def adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_A": rng.standard_normal((8, 16)).astype(np.float32),
        "layers.0.q_proj.lora_B": rng.standard_normal((16, 8)).astype(np.float16),
        "transposed": np.arange(12, dtype=np.int64).reshape(3, 4).T,  # not C-contiguous
        "scale": np.array(2.5),  # 0-d
        "with_nan": np.array([np.nan, -0.0, np.inf], dtype=np.float64),
    }


def assert_same_tensors(loaded: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert loaded.keys() == expected.keys()
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        assert loaded[name].tobytes() == np.ascontiguousarray(array).tobytes(), name


def test_checkpoints_round_trip_exactly(ledger: Ledger) -> None:
    run_id = start_run(ledger)
    first, second, legal = adapter(0), adapter(1), adapter(2)

    hash_1 = ledger.save_checkpoint(run_id, 1, first)
    hash_2 = ledger.save_checkpoint(run_id, 2, second)
    hash_legal = ledger.save_checkpoint(run_id, 1, legal, domain="legal")

    assert_same_tensors(ledger.load_checkpoint(run_id), second)  # latest round by default
    assert_same_tensors(ledger.load_checkpoint(run_id, 1), first)
    assert_same_tensors(ledger.load_checkpoint(run_id, domain="legal"), legal)
    assert len({hash_1, hash_2, hash_legal}) == 3 and len(hash_1) == 64
    assert ledger.save_checkpoint(run_id, 1, adapter(0)) == hash_1  # same content, same hash

    with ledger.engine.connect() as connection:
        data, num_bytes = connection.execute(
            text("SELECT data, num_bytes FROM checkpoints WHERE round_number = 2 AND domain = ''")
        ).one()
    assert hashlib.sha256(bytes(data)).hexdigest() == hash_2 and num_bytes == len(data)


def test_a_checkpoint_saved_again_replaces_the_earlier_one(ledger: Ledger) -> None:
    run_id = start_run(ledger)
    before = ledger.save_checkpoint(run_id, 1, adapter(0))
    changed = adapter(0)
    changed["layers.0.q_proj.lora_A"][0, 0] += 1.0
    after = ledger.save_checkpoint(run_id, 1, changed)

    assert after != before
    assert_same_tensors(ledger.load_checkpoint(run_id, 1), changed)


def test_loading_a_missing_checkpoint_raises(ledger: Ledger) -> None:
    run_id = start_run(ledger)
    with pytest.raises(LedgerError, match="no checkpoint"):
        ledger.load_checkpoint(run_id)
    ledger.save_checkpoint(run_id, 1, adapter(0), domain="legal")
    with pytest.raises(LedgerError, match="no checkpoint .* round 2"):
        ledger.load_checkpoint(run_id, 2, domain="legal")
    with pytest.raises(LedgerError, match="domain 'medical'"):
        ledger.load_checkpoint(run_id, domain="medical")


def test_a_corrupted_checkpoint_is_refused(ledger: Ledger) -> None:
    run_id = start_run(ledger)
    ledger.save_checkpoint(run_id, 1, adapter(0))
    with ledger.engine.begin() as connection:
        connection.execute(text("UPDATE checkpoints SET content_hash = :h"), {"h": "0" * 64})
    with pytest.raises(LedgerError, match="corrupted"):
        ledger.load_checkpoint(run_id)


# --- readers ------------------------------------------------------------------------------------


def test_a_read_only_ledger_sees_committed_rounds_while_the_writer_is_open(
    ledger_url: Target, ledger: Ledger
) -> None:
    run_id = start_run(ledger)
    ledger.start_round(run_id, 1, clients_sampled=2, bytes_down=100)

    with ledger_url.open(read_only=True) as reader:
        assert reader.engine is not ledger.engine
        assert [(r.number, r.finished_at) for r in reader.rounds(run_id)] == [(1, None)]

        ledger.finish_round(
            run_id, 1, clients_replied=2, clients_failed=0, metrics={"loss": 1.0}, bytes_up=10
        )
        ledger.start_round(run_id, 2, clients_sampled=2, bytes_down=100)
        rounds = reader.rounds(run_id)
        assert [r.number for r in rounds] == [1, 2]
        assert rounds[0].metrics == {"loss": 1.0} and rounds[0].finished_at is not None

        with pytest.raises(LedgerError, match="read-only"):
            reader.start_round(run_id, 3, clients_sampled=1, bytes_down=0)
        with pytest.raises(DBAPIError):  # also refused by the database itself
            with reader.engine.begin() as connection:
                connection.execute(text("DELETE FROM rounds"))
    assert len(ledger.rounds(run_id)) == 2

    if ledger_url.backend == "sqlite":
        with ledger.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_a_reader_in_another_process_sees_committed_rounds(ledger_url: Target, ledger: Ledger) -> None:
    run_id = start_run(ledger)
    for number in (1, 2):
        ledger.start_round(run_id, number, clients_sampled=2, bytes_down=100)
    ledger.finish_round(run_id, 1, clients_replied=2, clients_failed=0, metrics={"loss": 1.0}, bytes_up=10)
    script = textwrap.dedent(
        f"""
        from server.ledger import Ledger
        with Ledger({ledger_url.url!r}, schema={ledger_url.schema!r}, read_only=True) as reader:
            print([(r.number, r.finished_at is not None) for r in reader.rounds({run_id})])
        """
    )
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert output.strip() == "[(1, True), (2, False)]"


def test_a_read_only_ledger_needs_an_existing_ledger(ledger_url: Target) -> None:
    with pytest.raises(LedgerError, match="no such file|no tables yet"):
        ledger_url.open(read_only=True)
    if ledger_url.backend == "sqlite":
        assert not Path(ledger_url.url.removeprefix("sqlite:///")).exists()


# --- opening ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("not a url", "malformed ledger URL 'not a url'"),
        ("postgresql+psycopg://fedgraft:s3cret@db.example:port/x", "malformed ledger URL .*db.example"),
        ("mysql+pymysql://fedgraft:s3cret@db.example/ledger", "unsupported .* 'mysql'"),
        ("postgresql+psycopg://fedgraft:s3cret@127.0.0.1:1/test", "cannot open .*127.0.0.1.*1"),
        ("sqlite:////proc/fedgraft-no-such/ledger.db", "cannot create the folder .*fedgraft-no-such"),
    ],
)
def test_a_bad_url_raises_ledger_error_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(LedgerError, match=problem) as caught:
        Ledger(url)
    assert "s3cret" not in str(caught.value)


def test_schema_is_refused_for_sqlite(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only supported for PostgreSQL"):
        Ledger(Ledger.default_url(tmp_path), schema="fedgraft")


def test_default_url_is_a_sqlite_file_whose_folder_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "today"
    url = Ledger.default_url(folder)
    assert url == f"sqlite:///{folder / 'ledger.db'}"
    with Ledger(url) as ledger:
        start_run(ledger)
    assert (folder / "ledger.db").is_file()


def test_an_in_memory_sqlite_ledger_works_across_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with Ledger("sqlite://") as ledger:
        run_id = start_run(ledger)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(ledger.start_round, run_id, 1, 1, 0).result()
        assert [r.number for r in ledger.rounds(run_id)] == [1]
        assert len(ledger.runs()) == 1


def test_client_results_keep_their_phase(ledger_url):
    with ledger_url.open() as ledger:
        run_id = ledger.start_run(7, {}, "tiny", "0" * 64)
        ledger.start_round(run_id, 1, clients_sampled=1, bytes_down=10)
        ledger.record_client_result(run_id, 1, node_id=1, status="ok")
        ledger.record_client_result(run_id, 1, node_id=1, status="ok", phase="evaluate")
        assert [c.phase for c in ledger.client_results(run_id)] == ["train", "evaluate"]
        with pytest.raises(ValueError, match="phase"):
            ledger.record_client_result(run_id, 1, node_id=1, status="ok", phase="predict")

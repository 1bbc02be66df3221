"""Running the ledger's Alembic migrations from code, on a connection the caller owns.

No ``alembic.ini`` is needed: the config is built in code, with ``script_location`` pointing at the
``migrations`` folder inside this package, so it works from an installed wheel too.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection) -> Config:
    """An in-memory Alembic config whose ``env.py`` runs on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    url = connection.engine.url.render_as_string(hide_password=False)
    # ConfigParser interpolates "%": a percent-encoded password would otherwise break it.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(connection), revision)


def downgrade(connection: Connection, revision: str = "base") -> None:
    command.downgrade(alembic_config(connection), revision)


def head_revision() -> str | None:
    script = ScriptDirectory(str(MIGRATIONS))
    return script.get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    return MigrationContext.configure(connection).get_current_revision()

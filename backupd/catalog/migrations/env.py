"""Alembic environment for the backupd catalog.

backupd runs migrations programmatically (``backupd db upgrade`` passes an open connection in
``config.attributes["connection"]``); the ``alembic`` command line works too, with
``-x url=...`` or ``BACKUPD_DATABASE__URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from backupd.catalog.schema import Base

target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs table rebuilds for ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _configure(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ["BACKUPD_DATABASE__URL"]
    with create_engine(url).connect() as conn:
        _configure(conn)
        conn.commit()

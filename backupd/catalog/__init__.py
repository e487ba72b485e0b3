"""The catalog: the SQLAlchemy store, its schema, its Alembic migrations."""

"""Fixtures of the scale tests: a real PostgreSQL server (one per session, one database per test)."""

from __future__ import annotations

import pytest

from tests.scale.postgres_server import PostgresServer


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database for this test."""
    return postgres_server.new_database()

"""Session-wide fixtures: the real services (PostgreSQL, Redis) any test directory may use."""

from tests.services import postgres_db_url, postgres_url, redis_server

__all__ = ["postgres_db_url", "postgres_url", "redis_server"]

"""Fixtures of the peers' suites: the real Redis server of tests/test_locks.py."""

from ..test_locks import redis_url  # noqa: F401 - the session's Redis server

"""Shared pytest configuration of the test suite.

deepsec's fixtures are opt-in (no pytest11 entry point): a project that
installs deepsec without the ``testing`` extra must not have pytest import
the test servers, and fixture names like ``oracle`` must not appear in
everyone's test sessions uninvited.
"""

from __future__ import annotations

# oracle_server, oracle, local_idp, idp, redis_server, redis
pytest_plugins = ["deepsec.testing.pytest_plugin"]

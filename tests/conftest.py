"""Shared pytest configuration of the test suite.

deepsec's fixtures are opt-in (no pytest11 entry point): a project that
installs deepsec without the ``testing`` extra must not have pytest import
the test servers, and fixture names like ``oracle`` must not appear in
everyone's test sessions uninvited.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Test support code (helpers, test-only token modules such as ``spi_static``
# named by dotted path in end_user_sec_params, the Django test project) lives
# in tests/support/ and is imported by its plain module name.
SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

# oracle_server, oracle, local_idp, idp, redis_server, redis
pytest_plugins = ["deepsec.testing.pytest_plugin"]

"""flask_hr end to end: HTTP -> waitress -> Flask -> pool -> TCPS wire server."""

from __future__ import annotations

import pytest
from hr_common.testing import PlainFormSignInContract

pytestmark = pytest.mark.timeout(60)


class TestFlaskHR(PlainFormSignInContract):
    """Every check of ``hr_common.testing``; the browser test is in its own module."""

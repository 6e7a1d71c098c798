"""fastapi_hr end to end: HTTP -> uvicorn -> FastAPI -> async pool -> TCPS wire server."""

from __future__ import annotations

import pytest
from hr_common.testing import PlainFormSignInContract

pytestmark = pytest.mark.timeout(60)


class TestFastAPIHR(PlainFormSignInContract):
    """Every check of ``hr_common.testing``."""

"""The local identity provider's development-only sign-in shortcut.

``GET /dev/token?user=NAME`` answers that user's access token, standing in
for an interactive login in the demo and the example apps.
"""

from __future__ import annotations

import re
from typing import Any

from .base import TokenRequest
from .keys import SigningKey

#: The development-only sign-in shortcut (see :attr:`LocalIdP.dev_signin_url`).
DEV_TOKEN_PATH = "/dev/token"
_DEV_USER = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class DevSignIn(SigningKey):
    """The ``/dev/token`` endpoint (DEVELOPMENT ONLY)."""

    @property
    def dev_signin_url(self) -> str:
        """DEVELOPMENT ONLY: ``GET`` it with ``?user=NAME`` for that user's token.

        Stands in for the provider's interactive login in the demo and the
        example apps' "sign in as alice" pages: the token is what
        :meth:`issue_user_token <deepsec.testing.idp.LocalIdP.issue_user_token>`
        returns, signed by this provider.
        """
        return f"{self.base_url}{DEV_TOKEN_PATH}"

    def _dev_token(self, user: str) -> tuple[int, dict[str, Any]]:
        self._record(TokenRequest("GET", DEV_TOKEN_PATH, None, None, "other", status=200))
        if not _DEV_USER.fullmatch(user):
            return 400, {"error": "invalid_request", "error_description": "bad user name"}
        token = self.issue_user_token(user)
        return 200, {"access_token": token, "token_type": "Bearer", "user": user}

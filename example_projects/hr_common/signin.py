"""DEVELOPMENT ONLY sign-in: get an end user's token from the local IdP's dev endpoint.

``GET $HR_DEV_SIGNIN_URL?user=alice`` (started by ``python -m deepsec.demo``
and by the tests) returns a token signed by the local identity provider.  A
real deployment signs users in with its identity provider's login flow (for
Entra ID: MSAL's auth-code flow) and keeps the resulting access token in the
``identity`` cookie exactly as the example apps do.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.request
from urllib.parse import urlencode

USERS = ("alice", "bob", "carol")
_USER = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def fetch_dev_token(url: str, user: str, ca_file: str | None, timeout: float = 5.0) -> str:
    """An end-user access token for ``user`` from the dev sign-in endpoint."""
    if not _USER.fullmatch(user):
        raise ValueError("bad user name")
    if not url.startswith("https://"):
        raise ValueError("the dev sign-in endpoint must be https://")
    context = ssl.create_default_context(cafile=ca_file)
    request = urllib.request.Request(f"{url}?{urlencode({'user': user})}")
    with urllib.request.urlopen(request, context=context, timeout=timeout) as response:
        body = json.load(response)
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise RuntimeError("the dev sign-in endpoint returned no token")
    return token

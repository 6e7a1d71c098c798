"""What the web adapters record: requests they refused, and the end user on the server span.

Both go through :mod:`deepsec.lifecycle`.  The end user is recorded only when
an adapter opts in (``record_end_user``), and then only as a keyed hash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING

from .instruments import _instruments
from .names import ATTR_END_USER, ATTR_HTTP_STATUS, ATTR_REJECTION_REASON

if TYPE_CHECKING:
    from .._rejections import Rejection
    from ..context import EndUserContext

# -- rejected requests ---------------------------------------------------------------


def record_rejection(rejection: Rejection) -> None:
    """Count a request an adapter answered itself, by status and ``rejection.reason``.

    Called once, from :func:`deepsec.lifecycle.rejected`, the path every
    refused request takes.
    """
    inst = _instruments()
    if inst is None:
        return
    inst.rejected.add(
        1, {ATTR_HTTP_STATUS: int(rejection.status), ATTR_REJECTION_REASON: rejection.reason}
    )


# -- the end user on the server span (opt-in) ----------------------------------------

#: Key used when ``record_end_user=True``: pseudonyms correlate within this
#: process only.  Give a key (a string of 16+ characters) to correlate across
#: processes.
_PROCESS_KEY = os.urandom(32)


def end_user_pseudonym(identity: object, key: str | bytes | bool = True) -> str | None:
    """A keyed hash (HMAC-SHA256, 32 hex digits) of the end user, or None for no user.

    A token identity is hashed whole, a ``(name, key)`` local user by its
    name and key (the key is what the database checks).  Without the HMAC
    key the value cannot be linked back to the user.
    Why not the token's issuer and subject claims (stable across sign-ins):
    the pseudonym is set when the request starts, before anything verified
    the token, so a forged unsigned token with a victim's claims would carry
    the victim's pseudonym into the traces.  A whole token, signature
    included, cannot be forged.
    """
    if identity is None:
        return None
    if isinstance(identity, tuple):
        subject = f"local\x00{identity[0]}\x00{identity[1]}"
    elif isinstance(identity, str):
        subject = f"token\x00{identity}"
    else:
        subject = repr(identity)
    if key is True:
        secret = _PROCESS_KEY
    elif isinstance(key, str):
        secret = key.encode()
    elif isinstance(key, bytes):
        secret = key
    else:
        return None
    return hmac.new(secret, subject.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[
        :32
    ]


def record_end_user(setting: str | bytes | bool, context: EndUserContext | None) -> None:
    """Put the end user's pseudonym on the current (server) span, if opted in.

    ``setting`` is the adapters' ``record_end_user``: ``False`` does nothing,
    ``True`` uses a per-process key, a string is the key.
    """
    if not setting or context is None or context.identity is None:
        return
    inst = _instruments()
    if inst is None:
        return
    span = inst.get_current_span()
    if not span.is_recording():
        return
    pseudonym = end_user_pseudonym(context.identity, setting)
    if pseudonym is not None:
        span.set_attribute(ATTR_END_USER, pseudonym)

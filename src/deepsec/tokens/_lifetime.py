"""When a freshly issued token expires: lifetimes checked before anything is cached.

Internal module, shared by every token source (Entra ID, OCI IAM, custom
modules).  A provider's ``expires_in`` and a JWT's ``exp`` are untrusted
input: ``NaN`` compares false with everything, so a token "expiring" at NaN
was cached yet never served (a fetch on every call) and ``inf`` or a
thousand-year lifetime would never expire.  Anything but a finite, positive
lifetime of at most :data:`MAX_LIFETIME` is a typed
:class:`~deepsec.errors.TokenAcquisitionError` (``invalid_response``); no
token is cached.
"""

from __future__ import annotations

import math

from ..errors import TokenAcquisitionError
from .cache import jwt_expiry

__all__ = ["DEFAULT_LIFETIME", "MAX_LIFETIME", "checked_exp", "lifetime_seconds", "token_expiry"]

#: Lifetime assumed for a token whose reply gives neither ``expires_in`` nor an ``exp``.
DEFAULT_LIFETIME = 60.0
#: Longest lifetime accepted (seconds): a day, the most Entra ID or OCI IAM
#: issue a database-access token for.
MAX_LIFETIME = 86_400.0


def _invalid(what: str, detail: str) -> TokenAcquisitionError:
    return TokenAcquisitionError(
        f"{what}: the identity provider sent an invalid token lifetime ({detail}); "
        "the token was not used",
        error="invalid_response",
    )


def lifetime_seconds(value: object, what: str) -> float:
    """``expires_in`` as seconds: a finite number in ``(0, MAX_LIFETIME]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(what, f"expires_in is a {type(value).__name__}, not a number")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise _invalid(what, "expires_in is not finite")
    if seconds <= 0:
        raise _invalid(what, "expires_in is not positive")
    if seconds > MAX_LIFETIME:
        raise _invalid(what, f"expires_in is over {MAX_LIFETIME:.0f} s")
    return seconds


def checked_exp(token: str, now: float, what: str) -> float | None:
    """The JWT ``exp`` of ``token`` (``None`` if it has none), finite and not too far away."""
    try:
        exp = jwt_expiry(token)
    except (OverflowError, ValueError):  # an integer too big for a float
        raise _invalid(what, "the token's exp claim is not a finite number") from None
    if exp is None:
        return None
    if not math.isfinite(exp):
        raise _invalid(what, "the token's exp claim is not a finite number")
    if exp - now > MAX_LIFETIME:
        raise _invalid(what, f"the token's exp claim is over {MAX_LIFETIME:.0f} s away")
    return exp


def token_expiry(token: str, expires_in: object, started: float, what: str) -> float:
    """When a freshly issued token expires (epoch seconds).

    The reply's ``expires_in`` counted from ``started`` (the request time, so
    network delay shortens rather than lengthens it), capped by the JWT's own
    ``exp`` when there is one; the ``exp`` alone when the reply has no
    ``expires_in``; else :data:`DEFAULT_LIFETIME`.

    Raises:
        TokenAcquisitionError: ``invalid_response`` for a lifetime that is
            not a finite positive number of at most :data:`MAX_LIFETIME`.
    """
    exp = checked_exp(token, started, what)
    if expires_in is None:
        return exp if exp is not None else started + DEFAULT_LIFETIME
    expires_at = started + lifetime_seconds(expires_in, what)
    return min(expires_at, exp) if exp is not None else expires_at

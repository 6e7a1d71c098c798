"""The names deepsec's telemetry uses and the values its attributes may take.

Instrument, span and attribute names, and the fixed vocabularies that are the
only attribute values (token source, context action, rejection reason, known
error codes): a value outside them never reaches a metric, which keeps the
cardinality low and keeps secrets and raw identities out.
"""

from __future__ import annotations

from typing import Final, get_args

from .._rejections import Reason
from ..errors import TokenAcquisitionError

#: Name of the meter and of the tracer.
INSTRUMENTATION_NAME: Final = "deepsec"

# -- instrument and span names ---------------------------------------------------
TOKEN_REQUESTS: Final = "deepsec.token.requests"
TOKEN_FETCH_DURATION: Final = "deepsec.token.fetch.duration"
CONTEXT_CHANGES: Final = "deepsec.context.changes"
REQUESTS_REJECTED: Final = "deepsec.requests.rejected"
TOKEN_FETCH_SPAN: Final = "deepsec.token.fetch"

# -- attribute names -------------------------------------------------------------
ATTR_TOKEN_SOURCE: Final = "deepsec.token.source"
ATTR_SPI_TYPE: Final = "deepsec.spi_type"
ATTR_AUTH_FLOW: Final = "deepsec.auth_flow"
ATTR_ERROR_TYPE: Final = "error.type"
ATTR_SERVER_ADDRESS: Final = "server.address"
ATTR_CONTEXT_ACTION: Final = "deepsec.context.action"
ATTR_HTTP_STATUS: Final = "http.response.status_code"
ATTR_REJECTION_REASON: Final = "deepsec.rejection.reason"
#: OpenTelemetry's attribute for a pseudonymous end-user id (the keyed hash).
ATTR_END_USER: Final = "enduser.pseudo.id"

#: ``deepsec.token.source`` values: in-process cache, shared cache, identity provider.
TOKEN_SOURCES: Final = frozenset({"l1", "l2", "idp"})
#: ``deepsec.context.action`` values.
CONTEXT_ACTIONS: Final = frozenset({"set", "switch", "clear"})
#: ``deepsec.rejection.reason`` values: every ``Rejection.reason`` (deepsec.web).
REJECTION_REASONS: Final = frozenset(get_args(Reason))

# Error codes that may become ``error.type``: OAuth 2.0 / Entra ID / OCI codes
# and deepsec's own.  Anything else a provider sends is reported as the
# exception's class name: a provider-controlled string must not reach a
# metric (cardinality, and it could carry anything).
_KNOWN_ERRORS: Final = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_resource",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        "interaction_required",
        "consent_required",
        "login_required",
        "timeout",
        "connection_error",
        "invalid_response",
        "unexpected_error",
        "expired_token",
        "expired_user_token",
    }
)


# -- errors ------------------------------------------------------------------------


def error_type(exc: BaseException) -> str:
    """A low-cardinality ``error.type`` for ``exc`` (no message, no secret).

    A :class:`~deepsec.TokenAcquisitionError` gives its provider or deepsec
    error code when that code is a known one (``invalid_client``,
    ``timeout``...); every other exception gives its class name.
    """
    if isinstance(exc, TokenAcquisitionError) and exc.error in _KNOWN_ERRORS:
        return exc.error
    return type(exc).__name__

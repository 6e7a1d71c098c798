"""OpenTelemetry metrics and traces for deepsec (optional, through ``opentelemetry-api``).

The rest of the library calls the small ``record_*`` functions and
:class:`TokenTelemetry` methods below at its event points.  When
``opentelemetry`` cannot be imported they do nothing, and nothing is imported:
the import is tried lazily, on the first event.  When it can, events go to the
*globally configured* meter and tracer providers (meter and tracer named
``deepsec``); with no provider configured the API's no-op one answers.  There
is no deepsec setting to turn this on.

Security rule: attribute values come only from fixed vocabularies (token
source, context action, rejection reason, error codes from a known list),
from configuration that is not secret (``spi_type``, ``auth_flow``, the
identity provider's host) and from HTTP status codes.  Never a token, a
secret, an exception message (a provider's ``error_description`` may name
the user) or a raw identity; the opt-in end-user pseudonym is a keyed hash.

Instruments, attributes and the rejection reasons are documented in
``docs/observability.md``.

The package has one module per job; this module re-exports the public names,
so ``from deepsec import telemetry`` and ``telemetry.record_context_change(...)``
are the imports to use:

* :mod:`.names`: instrument, span and attribute names, their vocabularies, ``error.type``;
* :mod:`.instruments`: the instruments (loaded lazily, or swapped by
  :func:`use_providers`) and the context-change counts (:func:`record_context_change`);
* :mod:`.tokens`: :class:`TokenTelemetry` and :func:`record_token_request`;
* :mod:`.adapters`: rejected requests and the opt-in end-user pseudonym;
* :mod:`.summary`: the demo's metrics summary and :func:`metric_points`.
"""

from __future__ import annotations

from .adapters import end_user_pseudonym, record_end_user, record_rejection
from .instruments import available, record_context_change, use_providers
from .names import (
    ATTR_AUTH_FLOW,
    ATTR_CONTEXT_ACTION,
    ATTR_END_USER,
    ATTR_ERROR_TYPE,
    ATTR_HTTP_STATUS,
    ATTR_REJECTION_REASON,
    ATTR_SERVER_ADDRESS,
    ATTR_SPI_TYPE,
    ATTR_TOKEN_SOURCE,
    CONTEXT_ACTIONS,
    CONTEXT_CHANGES,
    INSTRUMENTATION_NAME,
    REJECTION_REASONS,
    REQUESTS_REJECTED,
    TOKEN_FETCH_DURATION,
    TOKEN_FETCH_SPAN,
    TOKEN_REQUESTS,
    TOKEN_SOURCES,
    error_type,
)
from .summary import collect_summary, metric_points
from .tokens import NO_TOKEN_TELEMETRY, TokenTelemetry, for_source, record_token_request

__all__ = [
    "ATTR_AUTH_FLOW",
    "ATTR_CONTEXT_ACTION",
    "ATTR_END_USER",
    "ATTR_ERROR_TYPE",
    "ATTR_HTTP_STATUS",
    "ATTR_REJECTION_REASON",
    "ATTR_SERVER_ADDRESS",
    "ATTR_SPI_TYPE",
    "ATTR_TOKEN_SOURCE",
    "CONTEXT_ACTIONS",
    "CONTEXT_CHANGES",
    "INSTRUMENTATION_NAME",
    "NO_TOKEN_TELEMETRY",
    "REJECTION_REASONS",
    "REQUESTS_REJECTED",
    "TOKEN_FETCH_DURATION",
    "TOKEN_FETCH_SPAN",
    "TOKEN_REQUESTS",
    "TOKEN_SOURCES",
    "TokenTelemetry",
    "available",
    "collect_summary",
    "end_user_pseudonym",
    "error_type",
    "for_source",
    "metric_points",
    "record_context_change",
    "record_end_user",
    "record_rejection",
    "record_token_request",
    "use_providers",
]

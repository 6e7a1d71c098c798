"""A short summary of deepsec's metrics, for the demo (and tests reading metrics).

:func:`collect_summary` records into an in-memory SDK reader for a block;
:func:`metric_points` flattens any reader's data into
``(instrument, attributes, value)`` tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .instruments import use_providers
from .names import (
    ATTR_CONTEXT_ACTION,
    ATTR_ERROR_TYPE,
    ATTR_TOKEN_SOURCE,
    CONTEXT_ACTIONS,
    CONTEXT_CHANGES,
    REQUESTS_REJECTED,
    TOKEN_FETCH_DURATION,
    TOKEN_REQUESTS,
)

# -- a short summary (the demo) -----------------------------------------------------


@contextmanager
def collect_summary() -> Iterator[Callable[[], str]]:
    """Record into an in-memory SDK reader for the block; yields ``summary()``.

    ``summary()`` describes tokens fetched vs served from cache and contexts
    set/switched/cleared.  Without the OpenTelemetry SDK it says so.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        yield (
            lambda: (
                "Metrics: not shown (install opentelemetry-sdk, e.g. the 'otel' extra "
                "plus opentelemetry-sdk, to see deepsec's OpenTelemetry metrics here)"
            )
        )
        return
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    final: list[tuple[str, dict[str, Any], float]] | None = None

    def summary() -> str:
        return _summarize(final if final is not None else metric_points(reader))

    try:
        with use_providers(meter_provider=provider):
            yield summary
    finally:
        final = metric_points(reader)  # what summary() shows after the block
        provider.shutdown()


def metric_points(reader: Any) -> list[tuple[str, dict[str, Any], float]]:
    """``(instrument, attributes, value)`` for every data point of ``reader``.

    A histogram point's value is its count.
    """
    data = reader.get_metrics_data()
    points: list[tuple[str, dict[str, Any], float]] = []
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count
                    points.append((metric.name, dict(point.attributes or {}), float(value)))
    return points


def _summarize(points: list[tuple[str, dict[str, Any], float]]) -> str:
    def total(name: str, attr: str, value: str) -> int:
        return int(sum(v for n, a, v in points if n == name and a.get(attr) == value))

    fetched = total(TOKEN_REQUESTS, ATTR_TOKEN_SOURCE, "idp")
    l1 = total(TOKEN_REQUESTS, ATTR_TOKEN_SOURCE, "l1")
    l2 = total(TOKEN_REQUESTS, ATTR_TOKEN_SOURCE, "l2")
    failed = int(sum(v for n, a, v in points if n == TOKEN_REQUESTS and ATTR_ERROR_TYPE in a))
    calls = int(sum(v for n, _, v in points if n == TOKEN_FETCH_DURATION))
    changes = {a: total(CONTEXT_CHANGES, ATTR_CONTEXT_ACTION, a) for a in CONTEXT_ACTIONS}
    rejected = int(sum(v for n, _, v in points if n == REQUESTS_REJECTED))
    # Tokens fetched are provider calls (the fetch histogram): lookups with
    # source idp also count callers that waited on another caller's fetch.
    cached = f"{l1} from the in-process cache" + (f", {l2} from the shared cache" if l2 else "")
    return (
        "OpenTelemetry metrics recorded by deepsec during these requests:\n"
        f"  tokens fetched     : {calls} identity-provider call(s)\n"
        f"  token lookups      : {cached}, {fetched} waited for a fetch"
        f"{f' ({failed} failed)' if failed else ''}\n"
        f"  contexts           : {changes['set']} set, {changes['switch']} switched, "
        f"{changes['clear']} cleared\n"
        f"  rejected requests  : {rejected}"
    )

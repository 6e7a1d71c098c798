"""Fault injection for the local identity provider: what can go wrong, and when.

Tests queue :class:`Fault` objects on :class:`Faults` (``idp.faults``); the
HTTP handler takes the first one matching each request and :func:`apply_fault`
turns it into what the request gets instead: an error answer, a broken body,
a delay, a dropped connection, or a slow delivery of the normal answer.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

FaultKind = Literal["status", "delay", "malformed_json", "drop", "drip", "stall"]
Target = Literal["any", "azure", "oci", "metadata"]


@dataclass
class Fault:
    """One injected fault on the token endpoints.

    Attributes:
        kind: ``"status"`` (answer ``status`` with an OAuth error body),
            ``"delay"`` (sleep ``seconds``, then answer normally),
            ``"malformed_json"`` (200 with ``body`` or a truncated JSON body),
            ``"drop"`` (close the connection without answering), ``"drip"``
            (answer normally, one byte every ``seconds``; with
            ``after_headers`` the headers go at once) or ``"stall"`` (headers
            at once, then ``seconds`` of silence before the body).
        times: how many requests it applies to; ``None`` = persistent.
        target: ``"azure"``, ``"oci"`` or ``"any"`` token endpoint, or
            ``"metadata"`` (OpenID discovery and JWKS, which MSAL reads when
            it builds an application).
    """

    kind: FaultKind
    status: int = 500
    error: str = "server_error"
    description: str = "injected fault"
    seconds: float = 0.0
    retry_after: float | None = None
    times: int | None = 1
    target: Target = "any"
    body: bytes | None = None
    after_headers: bool = False


class Faults:
    """Thread-safe fault queue.  The first matching fault applies to a request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        """Queue ``fault`` (applies after those queued before it are used up)."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def status(
        self,
        status: int,
        error: str | None = None,
        *,
        description: str = "injected fault",
        times: int | None = 1,
        retry_after: float | None = None,
        target: Target = "any",
    ) -> Fault:
        """Answer with HTTP ``status`` and ``{"error": error, ...}``."""
        default = {
            400: "invalid_grant",
            401: "invalid_client",
            429: "too_many_requests",
            503: "temporarily_unavailable",
        }.get(status, "server_error")
        return self.add(
            Fault(
                "status",
                status=status,
                error=error or default,
                description=description,
                times=times,
                retry_after=retry_after,
                target=target,
            )
        )

    def delay(self, seconds: float, *, times: int | None = 1, target: Target = "any") -> Fault:
        """Sleep ``seconds`` before answering."""
        return self.add(Fault("delay", seconds=seconds, times=times, target=target))

    def malformed_json(
        self, *, body: bytes | None = None, times: int | None = 1, target: Target = "any"
    ) -> Fault:
        """Answer 200 with a body that is not valid JSON (``body``, or a truncated object)."""
        return self.add(Fault("malformed_json", times=times, target=target, body=body))

    def throttle(
        self,
        retry_after: float = 60.0,
        *,
        status: int = 503,
        times: int | None = 1,
        target: Target = "any",
    ) -> Fault:
        """Answer ``status`` (503 or 429) with ``Retry-After: retry_after``."""
        return self.status(
            status, description="throttled", times=times, retry_after=retry_after, target=target
        )

    def drip(
        self,
        per_byte: float = 1.0,
        *,
        after_headers: bool = False,
        times: int | None = 1,
        target: Target = "any",
    ) -> Fault:
        """Send the answer one byte every ``per_byte`` seconds (a slow-loris provider)."""
        return self.add(
            Fault("drip", seconds=per_byte, after_headers=after_headers, times=times, target=target)
        )

    def stall(self, seconds: float, *, times: int | None = 1, target: Target = "any") -> Fault:
        """Send the headers, then nothing for ``seconds``, then the body."""
        return self.add(Fault("stall", seconds=seconds, times=times, target=target))

    def drop(self, *, times: int | None = 1, target: Target = "any") -> Fault:
        """Close the connection without sending a response."""
        return self.add(Fault("drop", times=times, target=target))

    def down(self, *, target: Target = "any") -> Fault:
        """Persistently drop every token request (the provider looks down)."""
        return self.drop(times=None, target=target)

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def take(self, target: Literal["azure", "oci", "metadata"]) -> Fault | None:
        """The fault for one request to ``target``, consuming a one-shot use.

        ``"any"`` faults apply to the token endpoints, not to metadata.
        """
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.target != target and not (fault.target == "any" and target != "metadata"):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[i]
                return fault
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._faults)


class Drop(Exception):
    """Internal: close the connection without a response."""


def apply_fault(
    fault: Fault | None,
) -> tuple[tuple[int, dict[str, Any] | bytes, dict[str, str]] | None, Fault | None]:
    """What ``fault`` does to a request: a reply instead of the normal one, or a delivery.

    Raises :class:`Drop` for a dropped connection; sleeps for a delay.
    """
    if fault is None:
        return None, None
    if fault.kind == "drop":
        raise Drop
    if fault.kind == "malformed_json":
        return (200, fault.body or b'{"token_type": "Bearer", "access_token": ', {}), None
    if fault.kind == "status":
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        body = {
            "error": fault.error,
            "error_description": fault.description,
            "correlation_id": str(uuid.uuid4()),
            "trace_id": str(uuid.uuid4()),
        }
        return (fault.status, body, headers), None
    if fault.kind == "delay":
        time.sleep(fault.seconds)
        return None, None
    return None, fault  # drip, stall: the normal answer, delivered slowly

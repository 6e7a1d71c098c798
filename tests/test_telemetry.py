"""OpenTelemetry metrics and traces, recorded by the real SDK.

Each test points deepsec's instruments at fresh SDK providers (an
``InMemoryMetricReader`` and an ``InMemorySpanExporter``) with
:func:`deepsec.telemetry.use_providers`: OpenTelemetry lets a process set its
global providers only once, so the global path is proven in a subprocess
(:func:`test_global_providers_are_used_without_any_deepsec_setting`).

Runs go through the real MSAL / requests stack to the local identity provider
and the real thin driver to the Oracle wire test server; a rejected request
goes through the Flask adapter served by waitress.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import oracledb
import pytest
from flask import Flask
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import deepsec
from adapter_support import waitress_server
from concurrency_support import run_threads
from deepsec import ConfigError, telemetry
from deepsec.config import parse_end_user_sec_params
from deepsec.context import EndUserContext
from deepsec.testing.idp import LocalIdP
from deepsec.testing.redis import RedisTestServer
from deepsec.web import WebSettings

pytestmark = pytest.mark.timeout(120)

USERNAME_SQL = "select xs_sys_context('xs$session','username') from dual"
TESTS = Path(__file__).resolve().parent / "support"
SRC = TESTS.parents[1] / "src"


class Recorded:
    """The in-memory reader and exporter of one test."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def points(self) -> list[tuple[str, dict[str, Any], float]]:
        return telemetry.metric_points(self.reader)

    def total(self, name: str, **attrs: Any) -> float:
        return sum(
            v
            for n, a, v in self.points()
            if n == name and all(a.get(k) == want for k, want in attrs.items())
        )

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.exporter.get_finished_spans())
        return spans if name is None else [s for s in spans if s.name == name]


@pytest.fixture
def otel() -> Iterator[Recorded]:
    recorded = Recorded()
    with telemetry.use_providers(recorded.meter_provider, recorded.tracer_provider):
        yield recorded
    recorded.meter_provider.shutdown()
    recorded.tracer_provider.shutdown()


@pytest.fixture
def instrumented_requests(otel: Recorded) -> Iterator[None]:
    instrumentor = RequestsInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tracer_provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


@pytest.fixture(autouse=True)
def _hook_installed() -> None:
    deepsec.install()


def connect(server: Any, params: dict[str, Any]) -> oracledb.Connection:
    return oracledb.connect(
        **server.connect_kwargs(), extra_auth_params={"end_user_sec_params": params}
    )


def whoami(conn: oracledb.Connection) -> str | None:
    with conn.cursor() as cur:
        cur.execute(USERNAME_SQL)
        row = cur.fetchone()
    return None if row is None else row[0]


def all_recorded_text(otel: Recorded) -> list[str]:
    """Every attribute key and value, span name, event and status text recorded."""
    texts: list[str] = []
    for name, attrs, _ in otel.points():
        texts.append(name)
        texts.extend(f"{k}={v}" for k, v in attrs.items())
    for span in otel.spans():
        texts.append(span.name)
        texts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        texts.append(span.status.description or "")
        for event in span.events:
            texts.append(event.name)
            texts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
    return texts


def assert_nothing_secret(otel: Recorded, idp: LocalIdP, *extra: str) -> None:
    secrets = [
        idp.client_secret,
        *idp.issued_tokens(),
        *extra,
    ]
    # Names of the users, in their token claims and as the database saw them.
    for user in ("alice", "bob", "carol"):
        secrets += [user, f"{user}@example.test"]
    texts = all_recorded_text(otel)
    assert texts, "nothing was recorded"
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret[:12], text[:80])
        # no JWT-shaped value at all
        assert "eyJ" not in text, text[:80]


def test_every_instrument_with_documented_attributes(
    idp: LocalIdP, oracle: Any, otel: Recorded, instrumented_requests: None
) -> None:
    alice = idp.issue_user_token("alice")
    bob = idp.issue_user_token("bob")
    carol = idp.issue_user_token("carol")
    conn = connect(oracle, idp.azure_params("on_behalf_of"))
    try:
        with deepsec.end_user(alice):  # miss: fetched; a new context: set
            assert whoami(conn) == "alice@example.test"
        with deepsec.end_user(bob):  # miss: fetched; another user: switch
            assert whoami(conn) == "bob@example.test"
        with deepsec.end_user(alice):  # switch (the hook reuses alice's prepared context)
            asyncio.run(deepsec.prepare())  # a lookup: hit, served from L1
            assert whoami(conn) == "alice@example.test"
            assert whoami(conn) == "alice@example.test"  # unchanged: nothing recorded
        assert whoami(conn) is None  # no end user: clear
        idp.faults.status(503, times=None)  # the provider fails for carol
        with deepsec.end_user(carol), pytest.raises(deepsec.TokenAcquisitionError):
            whoami(conn)
    finally:
        conn.close()

    base = {"deepsec.spi_type": "azure_tokens", "deepsec.auth_flow": "on_behalf_of"}
    host = "127.0.0.1" if "127.0.0.1" in idp.authority else "localhost"

    # deepsec.token.requests: one per lookup, by source, error.type on failure
    requests = [(a, v) for n, a, v in otel.points() if n == telemetry.TOKEN_REQUESTS]
    for attrs, _ in requests:
        assert set(attrs) <= {*base, "deepsec.token.source", "error.type"}
        assert {k: attrs[k] for k in base} == base
    assert otel.total(telemetry.TOKEN_REQUESTS, **{"deepsec.token.source": "idp"}) == 3
    ok = [v for a, v in requests if a["deepsec.token.source"] == "idp" and "error.type" not in a]
    assert sum(ok) == 2
    failed = [a for a, _ in requests if "error.type" in a]
    assert failed == [{**base, "deepsec.token.source": "idp", "error.type": "server_error"}]
    # exactly the one hit above: a miss re-reads its fresh entry without counting it
    assert otel.total(telemetry.TOKEN_REQUESTS, **{"deepsec.token.source": "l1"}) == 1

    # deepsec.token.fetch.duration: every provider call, with server.address
    durations = [(a, v) for n, a, v in otel.points() if n == telemetry.TOKEN_FETCH_DURATION]
    assert sum(v for _, v in durations) == 3
    for attrs, _ in durations:
        assert attrs["server.address"] == host
        assert {k: attrs[k] for k in base} == base
    assert any(a.get("error.type") == "server_error" for a, _ in durations)

    # deepsec.context.changes
    assert otel.total(telemetry.CONTEXT_CHANGES, **{"deepsec.context.action": "set"}) == 1
    assert otel.total(telemetry.CONTEXT_CHANGES, **{"deepsec.context.action": "switch"}) == 2
    assert otel.total(telemetry.CONTEXT_CHANGES, **{"deepsec.context.action": "clear"}) == 1

    # the span around each provider call, with an error status on failure
    fetches = otel.spans(telemetry.TOKEN_FETCH_SPAN)
    assert len(fetches) == 3
    for span in fetches:
        assert span.kind is SpanKind.INTERNAL
        assert span.attributes is not None
        assert span.attributes["server.address"] == host
        assert span.attributes["deepsec.spi_type"] == "azure_tokens"
    failed_spans = [s for s in fetches if s.status.status_code is StatusCode.ERROR]
    assert len(failed_spans) == 1
    assert failed_spans[0].attributes is not None
    assert failed_spans[0].attributes["error.type"] == "server_error"
    assert failed_spans[0].attributes["http.response.status_code"] == 503
    assert failed_spans[0].status.description == "server_error"
    assert not failed_spans[0].events  # no exception event: its message may name the user

    # requests' own HTTP client spans nest under deepsec.token.fetch
    http_spans = [s for s in otel.spans() if s.kind is SpanKind.CLIENT]
    assert http_spans, "the requests instrumentation recorded nothing"
    fetch_ids = {s.context.span_id for s in fetches}
    for span in http_spans:
        assert span.parent is not None and span.parent.span_id in fetch_ids, span.name

    assert_nothing_secret(otel, idp, alice, bob, carol)


def test_an_oci_provider_failure_and_retry_in_one_span(
    idp: LocalIdP, oracle: Any, otel: Recorded, instrumented_requests: None
) -> None:
    idp.faults.status(500, times=1, target="oci")  # retried inside the one provider call
    conn = connect(oracle, idp.oci_params())
    try:
        with deepsec.end_user(idp.issue_user_token("alice")):
            whoami(conn)
        idp.faults.status(401, "invalid_client", times=None, target="oci")
        deepsec.tokens.clear_token_sources()
        conn2 = connect(oracle, idp.oci_params())
        try:
            with (
                deepsec.end_user(idp.issue_user_token("bob")),
                pytest.raises(deepsec.TokenAcquisitionError),
            ):
                whoami(conn2)
        finally:
            conn2.close()
    finally:
        conn.close()
    fetches = otel.spans(telemetry.TOKEN_FETCH_SPAN)
    assert len(fetches) == 2
    first, second = sorted(fetches, key=lambda s: s.start_time or 0)
    children = [s for s in otel.spans() if s.parent and s.parent.span_id == first.context.span_id]
    assert len(children) == 2  # the failed attempt and its retry, under one fetch
    assert first.status.status_code is StatusCode.UNSET
    assert second.status.status_code is StatusCode.ERROR
    assert second.attributes is not None
    assert second.attributes["error.type"] == "invalid_client"
    assert second.attributes["deepsec.spi_type"] == "oci_tokens"
    failed = otel.total(
        telemetry.TOKEN_REQUESTS, **{"deepsec.token.source": "idp", "error.type": "invalid_client"}
    )
    assert failed == 1
    assert_nothing_secret(otel, idp)


def make_app(idp: LocalIdP, oracle: Any, **config: Any) -> Flask:
    from deepsec.flask import DeepSec

    app = Flask(__name__)
    app.config.update({f"DEEPSEC_{k.upper()}": v for k, v in config.items()})
    DeepSec(app)
    params = idp.azure_params("on_behalf_of")

    @app.get("/whoami")
    def whoami_view() -> dict[str, Any]:
        conn = connect(oracle, params)
        try:
            return {"user": whoami(conn)}
        finally:
            conn.close()

    return app


class ServerSpans:
    """WSGI middleware: a SERVER span per request, as an HTTP instrumentation makes."""

    def __init__(self, app: Any, tracer_provider: TracerProvider) -> None:
        self.app = app
        self.tracer = tracer_provider.get_tracer("test-server")

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self.tracer.start_as_current_span("GET /whoami", kind=SpanKind.SERVER):
            return list(self.app(environ, start_response))


def test_reattaching_the_same_end_user_after_ora_52602_is_not_a_context_change(
    idp: LocalIdP, oracle: Any, otel: Recorded
) -> None:
    alice = idp.issue_user_token("alice")
    conn = connect(oracle, idp.azure_params("on_behalf_of"))
    try:
        with deepsec.end_user(alice):
            assert whoami(conn) == "alice@example.test"  # set
            first = oracle.find_statements(USERNAME_SQL)[0].context.database_access_token
            oracle.token_validator = lambda kind, token: (
                not (kind == "database_access_token" and token == first)
            )
            with pytest.raises(oracledb.DatabaseError, match="ORA-52602"):
                whoami(conn)
            # a fresh token for the same end user: attached again, not a change
            assert whoami(conn) == "alice@example.test"
        assert whoami(conn) is None  # clear
    finally:
        conn.close()
    points = otel.points()
    action = "deepsec.context.action"
    changes = {a[action]: v for n, a, v in points if n == telemetry.CONTEXT_CHANGES}
    assert changes == {"set": 1.0, "clear": 1.0}
    assert otel.total(telemetry.TOKEN_REQUESTS, **{"deepsec.token.source": "idp"}) == 2


def test_rejected_requests_through_the_flask_adapter(
    idp: LocalIdP, oracle: Any, otel: Recorded
) -> None:
    alice = idp.issue_user_token("alice")
    deny = make_app(idp, oracle, no_identity="deny", strict=True)
    with waitress_server(deny) as url:
        assert httpx.get(f"{url}/whoami").status_code == 401  # no identity
        assert httpx.get(f"{url}/whoami").status_code == 401  # (a cached resolution)
        bad = {"Authorization": "Bearer not a token!"}
        assert httpx.get(f"{url}/whoami", headers=bad).status_code == 401  # malformed
        assert httpx.get(f"{url}/whoami", cookies={"identity": "[1,"}).status_code == 400
        idp.faults.status(503, times=None)
        auth = {"Authorization": f"Bearer {alice}"}
        answer = httpx.get(f"{url}/whoami", headers=auth)
        assert answer.status_code == 503  # provider unavailable
        idp.faults.clear()
        idp.faults.status(400, "invalid_grant", times=None)
        deepsec.tokens.clear_token_sources()
        assert httpx.get(f"{url}/whoami", headers=auth).status_code == 401  # user token refused

    def rejected(status: int, reason: str) -> float:
        return otel.total(
            telemetry.REQUESTS_REJECTED,
            **{"http.response.status_code": status, "deepsec.rejection.reason": reason},
        )

    assert rejected(401, "no_identity") == 2
    assert rejected(401, "malformed_identity") == 1
    assert rejected(400, "malformed_identity") == 1
    assert rejected(503, "provider_unavailable") == 1
    assert rejected(401, "user_token_rejected") == 1
    assert otel.total(telemetry.REQUESTS_REJECTED) == 6
    for name, attrs, _ in otel.points():
        if name == telemetry.REQUESTS_REJECTED:
            assert set(attrs) == {"http.response.status_code", "deepsec.rejection.reason"}
            assert attrs["deepsec.rejection.reason"] in telemetry.REJECTION_REASONS
    assert_nothing_secret(otel, idp, alice)


def test_record_end_user_puts_a_keyed_hash_on_the_server_span(
    idp: LocalIdP, oracle: Any, otel: Recorded
) -> None:
    key = "correlation-key-0123456789"
    alice1 = idp.issue_user_token("alice")
    alice2 = idp.issue_user_token("alice")  # signed in again: another token
    bob = idp.issue_user_token("bob")
    app = make_app(idp, oracle, record_end_user=key)
    with waitress_server(ServerSpans(app, otel.tracer_provider)) as url:
        for token in (alice1, alice1, alice2, bob):
            answer = httpx.get(f"{url}/whoami", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
        assert httpx.get(f"{url}/whoami").status_code == 200  # no end user: no attribute
    servers = sorted(
        (s for s in otel.spans() if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0
    )
    assert len(servers) == 5
    ids = [(s.attributes or {}).get(telemetry.ATTR_END_USER) for s in servers]
    assert ids[0] is not None and ids[0] == ids[1]  # one token: one pseudonym
    # A new token is a new pseudonym: claims are not verified when it is set.
    assert ids[2] is not None and ids[2] != ids[0]
    assert ids[3] is not None and ids[3] not in (ids[0], ids[2])
    assert ids[4] is None
    assert ids[0] == telemetry.end_user_pseudonym(alice1, key)
    assert ids[0] != telemetry.end_user_pseudonym(alice1, "another-key-0123456789")
    assert_nothing_secret(otel, idp, alice1, alice2, bob, key)


def test_record_end_user_is_set_on_every_repeat_asgi_request(otel: Recorded) -> None:
    """The ASGI middleware's raw-bytes hot path skips nothing record_end_user needs.

    A repeat of the same header bytes is a dictionary lookup that records
    nothing, so with ``record_end_user`` the middleware must resolve every
    request through the lifecycle, which puts the pseudonym on each span.
    """
    import asyncio

    from deepsec.asgi import EndUserSecMiddleware

    key = "correlation-key-0123456789"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    mw = EndUserSecMiddleware(app, record_end_user=key)
    tracer = otel.tracer_provider.get_tracer("test-server")
    headers = [(b"authorization", b"Bearer alice-token"), (b"cookie", b"theme=dark")]
    for _ in range(3):
        with tracer.start_as_current_span("GET /", kind=SpanKind.SERVER):
            asyncio.run(mw({"type": "http", "path": "/", "headers": headers}, receive, send))
    ids = [(s.attributes or {}).get(telemetry.ATTR_END_USER) for s in otel.spans("GET /")]
    assert ids == [telemetry.end_user_pseudonym("alice-token", key)] * 3


def test_a_forged_token_does_not_get_its_victims_pseudonym(idp: LocalIdP) -> None:
    # An unsigned token claiming the victim's issuer and subject: the
    # pseudonym is set before anything verifies a token, so it must differ.
    import base64

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    victim = idp.issue_user_token("alice")
    claims = json.loads(base64.urlsafe_b64decode(victim.split(".")[1] + "=="))
    forged = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."
    key = "correlation-key-0123456789"
    assert telemetry.end_user_pseudonym(forged, key) != telemetry.end_user_pseudonym(victim, key)
    # a local user's pseudonym depends on the key the database checks, too
    assert telemetry.end_user_pseudonym(("bob", "k1"), key) != telemetry.end_user_pseudonym(
        ("bob", "forged"), key
    )


def test_record_end_user_setting_is_checked_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        WebSettings(record_end_user="short-key")
    assert "record_end_user" in str(info.value) and "short-key" not in str(info.value)
    assert "correlation-key" not in repr(WebSettings(record_end_user="correlation-key-0123"))
    assert WebSettings(record_end_user=True).record_end_user is True


def test_context_changes_ignore_an_equal_context(otel: Recorded) -> None:
    alice = EndUserContext("token-a", ("hr",))
    telemetry.record_context_change(None, None)
    telemetry.record_context_change(alice, EndUserContext("token-a", ("hr",)))
    assert otel.total(telemetry.CONTEXT_CHANGES) == 0
    telemetry.record_context_change(alice, EndUserContext("token-a", ("payroll",)))
    assert otel.total(telemetry.CONTEXT_CHANGES, **{"deepsec.context.action": "switch"}) == 1


def test_a_shared_cache_reports_l2(idp: LocalIdP, redis: RedisTestServer, otel: Recorded) -> None:
    """Two sources sharing Redis stand for two processes: the second one's lookups
    (sync and asyncio) are answered by L2, then by its own L1; one provider call."""
    from deepsec.tokens.azure import AzureTokenSource
    from deepsec.tokens.shared import SharedTokenCache

    params = idp.azure_params("on_behalf_of", token_cache=redis.url, timeout=10.0)
    alice = idp.issue_user_token("alice")
    bob = idp.issue_user_token("bob")
    first = AzureTokenSource(parse_end_user_sec_params(params))
    second = AzureTokenSource(parse_end_user_sec_params(params))
    third = AzureTokenSource(parse_end_user_sec_params(params))
    token = first.get_token(EndUserContext(alice))  # idp
    assert second.get_token(EndUserContext(alice)) == token  # l2, through the miss path
    assert second.get_token(EndUserContext(alice)) == token  # l1
    first.get_token(EndUserContext(bob))  # idp
    got = asyncio.run(third.get_token_async(EndUserContext(bob)))  # l2, read before the miss
    assert got == first.cached_token(EndUserContext(bob))
    assert isinstance(second.cache, SharedTokenCache) and second.cache.l2_hits == 1
    assert isinstance(third.cache, SharedTokenCache) and third.cache.l2_hits == 1
    assert idp.token_requests("on_behalf_of") == 2

    def lookups(source: str) -> float:
        return otel.total(telemetry.TOKEN_REQUESTS, **{"deepsec.token.source": source})

    assert lookups("idp") == 2
    assert lookups("l2") == 2
    assert lookups("l1") == 2  # second's repeat, and cached_token() above
    # Only the provider calls are timed and traced, not the Redis reads.
    assert sum(v for n, _, v in otel.points() if n == telemetry.TOKEN_FETCH_DURATION) == 2
    assert len(otel.spans(telemetry.TOKEN_FETCH_SPAN)) == 2
    for name, attrs, _ in otel.points():
        if name == telemetry.TOKEN_REQUESTS:
            assert attrs["deepsec.spi_type"] == "azure_tokens"
            assert attrs["deepsec.auth_flow"] == "on_behalf_of"
    assert_nothing_secret(otel, idp, alice, bob, token, redis.url)


def test_record_token_request_for_caches_without_telemetry(otel: Recorded) -> None:
    config = parse_end_user_sec_params({"spi_type": "spi_static"})
    telemetry.record_token_request(config, "l2")
    assert otel.points() == [
        (
            telemetry.TOKEN_REQUESTS,
            {
                "deepsec.token.source": "l2",
                "deepsec.spi_type": "spi_static",
                "deepsec.auth_flow": "client_credentials",
            },
            1.0,
        )
    ]
    with pytest.raises(ValueError):
        telemetry.record_token_request(config, "l3")


def test_identity_not_accepted_is_counted_as_a_rejected_user_token(otel: Recorded) -> None:
    from deepsec import lifecycle

    error = deepsec.errors.IdentityNotAccepted("on_behalf_of needs the end user's token")
    rejection = lifecycle.answer(error, WebSettings())
    assert rejection is not None and rejection.reason == "user_token_rejected"
    assert otel.points() == [
        (
            telemetry.REQUESTS_REJECTED,
            {"http.response.status_code": 401, "deepsec.rejection.reason": "user_token_rejected"},
            1.0,
        )
    ]
    assert {
        "malformed_identity",
        "no_identity",
        "user_token_rejected",
        "provider_unavailable",
        "token_not_ready",
    } == telemetry.REJECTION_REASONS


def run_python(code: str) -> str:
    env = {"PYTHONPATH": f"{SRC}:{TESTS}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_global_providers_are_used_without_any_deepsec_setting() -> None:
    out = run_python(
        """
        import json
        import deepsec  # imported before the app configures OpenTelemetry
        from deepsec.config import parse_end_user_sec_params
        from deepsec.context import EndUserContext
        from deepsec.tokens import token_source_for
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from deepsec.telemetry import metric_points

        source = token_source_for(parse_end_user_sec_params({"spi_type": "spi_static"}))
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        ctx = EndUserContext("someone")
        source.get_token(ctx)
        source.get_token(ctx)
        print(json.dumps({
            "points": metric_points(reader),
            "spans": [s.name for s in exporter.get_finished_spans()],
        }))
        """
    )
    result = json.loads(out)
    sources = sorted(
        (a["deepsec.token.source"], v)
        for n, a, v in result["points"]
        if n == "deepsec.token.requests"
    )
    assert sources == [("idp", 1.0), ("l1", 1.0)]
    assert [n for n, _, _ in result["points"]].count("deepsec.token.fetch.duration") == 1
    assert result["spans"] == ["deepsec.token.fetch"]


def test_without_opentelemetry_nothing_is_imported() -> None:
    out = run_python(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import deepsec, deepsec.web, deepsec.flask
        from deepsec import telemetry
        from deepsec.config import parse_end_user_sec_params
        from deepsec.context import EndUserContext
        from deepsec.tokens import token_source_for
        from deepsec.lifecycle import start
        from deepsec.web import WebSettings

        source = token_source_for(parse_end_user_sec_params({"spi_type": "spi_static"}))
        ctx = EndUserContext("someone")
        source.get_token(ctx)
        source.get_token(ctx)
        telemetry.record_context_change(None, ctx)
        deny = WebSettings(no_identity="deny")
        assert start(deny, None, cookie_header=None, authorization=None).status == 401
        record = WebSettings(record_end_user=True)
        start(record, None, cookie_header=None, authorization="Bearer abc").end()
        assert source.cache.telemetry is telemetry.NO_TOKEN_TELEMETRY
        assert not telemetry.available()
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(loaded)
        """
    )
    assert out.strip() == "[]"


def test_a_broken_opentelemetry_install_disables_telemetry_with_one_warning(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "opentelemetry"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('half-upgraded install')\n")
    code = """
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
        import deepsec
        from deepsec import telemetry
        from deepsec.config import parse_end_user_sec_params
        from deepsec.context import EndUserContext
        from deepsec.lifecycle import start
        from deepsec.tokens import token_source_for
        from deepsec.web import WebSettings

        source = token_source_for(parse_end_user_sec_params({"spi_type": "spi_static"}))
        ctx = EndUserContext("someone")
        assert source.get_token(ctx) and source.get_token(ctx)
        telemetry.record_context_change(None, ctx)
        deny = WebSettings(no_identity="deny")
        assert start(deny, None, cookie_header=None, authorization=None).status == 401
        assert not telemetry.available()
        print("done")
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{SRC}:{TESTS}", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    warnings = [line for line in done.stderr.splitlines() if "OpenTelemetry" in line]
    assert warnings == [
        "WARNING deepsec.telemetry OpenTelemetry is installed but could not be loaded "
        "(RuntimeError); deepsec records no metrics or traces in this process"
    ]


def test_async_fetch_span_keeps_the_callers_trace(
    idp: LocalIdP, otel: Recorded, instrumented_requests: None
) -> None:
    from deepsec.tokens import token_source_for

    source = token_source_for(parse_end_user_sec_params(idp.azure_params("on_behalf_of")))
    alice = EndUserContext(idp.issue_user_token("alice"))
    tracer = otel.tracer_provider.get_tracer("test")

    async def request() -> None:
        with tracer.start_as_current_span("request", kind=SpanKind.SERVER):
            await source.get_token_async(alice)  # fetched in a worker thread
            await source.get_token_async(alice)  # L1

    asyncio.run(request())
    (server,) = otel.spans("request")
    (fetch,) = otel.spans(telemetry.TOKEN_FETCH_SPAN)
    assert fetch.parent is not None and fetch.parent.span_id == server.context.span_id
    http_spans = [s for s in otel.spans() if s.kind is SpanKind.CLIENT]
    assert http_spans and all(
        s.parent is not None and s.parent.span_id == fetch.context.span_id for s in http_spans
    )
    assert otel.total(telemetry.TOKEN_REQUESTS, **{"deepsec.token.source": "l1"}) == 1
    assert otel.total(telemetry.TOKEN_REQUESTS, **{"deepsec.token.source": "idp"}) == 1


def test_demo_summary_counts_fetches_hits_and_contexts() -> None:
    from deepsec.tokens import token_source_for

    config = parse_end_user_sec_params({"spi_type": "spi_static", "cache_size": 7})
    with telemetry.collect_summary() as summary:
        source = token_source_for(config)
        ctx = EndUserContext("someone")
        source.get_token(ctx)
        source.get_token(ctx)
        source.cached_token(ctx)
        telemetry.record_context_change(None, ctx)
        telemetry.record_context_change(ctx, None)
    text = summary()  # read after the block: the final numbers
    assert "token lookups      : 2 from the in-process cache, 1 waited for a fetch" in text
    assert "1 set, 0 switched, 1 cleared" in text
    assert "tokens fetched     : 1 identity-provider call(s)" in text


def test_demo_summary_tells_provider_calls_from_lookups_that_waited(idp: LocalIdP) -> None:
    # Concurrent misses share one provider call: five lookups waited for a
    # fetch, but one token was fetched.
    from deepsec.tokens import token_source_for

    # Generous (for a loaded machine): 30 s for the provider, and 2 s for the
    # other four threads to join the first one's fetch before it ends.
    params = idp.azure_params("on_behalf_of", timeout=30.0)
    source = token_source_for(parse_end_user_sec_params(params))
    alice = EndUserContext(idp.issue_user_token("alice"))
    idp.faults.delay(2.0)
    with telemetry.collect_summary() as summary:
        run_threads(lambda: source.get_token(alice), count=5, timeout=30)
    text = summary()
    assert idp.token_requests("on_behalf_of") == 1
    assert "tokens fetched     : 1 identity-provider call(s)" in text, text
    assert "0 from the in-process cache, 5 waited for a fetch" in text, text


def test_a_provider_description_naming_the_user_reaches_no_log(
    idp: LocalIdP, oracle: Any, otel: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    # The adapters' WARNING "answering 401 ..." names the error code, status
    # and correlation id, never the provider's text ("... user alice@...").
    caplog.set_level(logging.DEBUG, logger="deepsec")
    alice = idp.issue_user_token("alice")
    idp.faults.status(
        400, "invalid_grant", description="AADSTS50173: user alice@example.test revoked", times=None
    )
    with waitress_server(make_app(idp, oracle)) as url:
        answer = httpx.get(f"{url}/whoami", headers={"Authorization": f"Bearer {alice}"})
    assert answer.status_code == 401
    warnings = [r for r in caplog.records if r.getMessage().startswith("answering ")]
    assert warnings and "error=invalid_grant" in warnings[0].getMessage()
    for text in (answer.text, *(r.getMessage() for r in caplog.records)):
        assert "alice" not in text and "AADSTS50173" not in text, text
    assert_nothing_secret(otel, idp)


def test_the_context_change_counts_cover_every_action_once() -> None:
    from deepsec.telemetry import instruments

    assert sorted(instruments._ACTIONS) == sorted(telemetry.CONTEXT_ACTIONS)
    assert len(set(instruments._ACTIONS)) == len(instruments._ACTIONS)


def test_context_changes_are_reported_only_while_a_provider_records(oracle) -> None:
    """A use_providers block reports the changes made inside it, as a counter would.

    After the block its provider hears of no more; a later block on the same
    provider adds its own on top (the SDK keeps the first callback it got).
    """
    import oracledb
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from hook_support import params, user_token

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def sets() -> int:
        data = reader.get_metrics_data()
        return sum(
            point.value
            for rm in (data.resource_metrics if data else ())
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == telemetry.CONTEXT_CHANGES
            for point in metric.data.data_points
            if point.attributes.get("deepsec.context.action") == "set"
        )

    def one_request(pool: Any, name: str) -> None:
        with deepsec.end_user(user_token(name)), pool.acquire() as conn, conn.cursor() as cur:
            cur.execute("select 1 from dual")
            cur.fetchall()

    pool = oracledb.create_pool(**oracle.connect_kwargs(), extra_auth_params=params(), min=1, max=1)
    try:
        one_request(pool, "olga")  # before any block: not this provider's
        with telemetry.use_providers(provider):
            one_request(pool, "olga")
            assert sets() == 1
        for _ in range(3):
            one_request(pool, "olga")  # after the block: not this provider's either
        assert sets() == 1
        with telemetry.use_providers(provider):
            one_request(pool, "olga")
            assert sets() == 2
        assert sets() == 2
    finally:
        pool.close(force=True)
        provider.shutdown()


def test_a_block_on_the_global_meter_provider_leaves_it_recording() -> None:
    """use_providers(None, ...) records to the global provider: its end must not
    stop the global observer, which counts for the whole process."""
    from opentelemetry import metrics

    from deepsec.telemetry import instruments

    instruments._instruments()  # the global instruments exist
    observer = instruments._observers.get(metrics.get_meter_provider())
    if observer is None:
        pytest.skip("the global meter provider cannot be weakly referenced")
    assert observer.since is not None
    with telemetry.use_providers(None):
        pass
    assert observer.since is not None  # still recording

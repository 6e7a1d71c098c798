"""Adapter cost: bare app vs hand-written floor vs deepsec, per framework.

Run ``python bench/adapters.py [--requests N] [--rounds R] [--batch K] [--db-requests N]
[--block B] [--no-db] [--safe-floor]``.

Each WSGI/ASGI app is called in process with a request carrying an end-user
bearer token and two unrelated cookies, so every adapter does its full work.
The request is what a server hands over: a token of the size Entra ID issues
(about 2 KB), and header values that are new objects on every request
(a server decodes or parses them anew), so that per-byte work -- a floor
copying the token, a lookup hashing it -- costs what it costs in production.
Three apps per framework: **bare** (no identity handling), **floor** (the
adapter a competent developer writes by hand, ``bench/floors.py``: read the
header or cookie, set a contextvar, reset it) and **deepsec**.  Every round
builds every app anew and runs all variants of a framework interleaved; the
figures are medians, deltas paired within a batch (Table 1) or a round
(Table 2).  The FastAPI dependency's apps are a group of their own.  Targets
(issue 9): deepsec adds at most 1.5x what the floor adds over bare; the
FastAPI dependency at most 5 us above a minimal ``async def`` dependency
without ``yield``.  Each framework also runs a second, identical floor app:
"floor adds" is the mean of the two copies', and their difference (the last
column) is the run's noise.  With ``--safe-floor``, a fifth app, the **safe
floor**, is the floor plus the two safety properties deepsec keeps, written by
hand (``bench/floors.py``: a lease that ends the identity of work the request
spawned; a 401 for an end-user error before the response starts), and a
second table compares deepsec with it: a diagnostic of how much of deepsec's
distance to the floor those properties are, not a target.  Off by default: a
fifth app interleaved changes what the others' code shares (caches,
specialized instructions), so the targets' table is measured without it.

Table 1 (hello-world endpoints): CPU time per request, timed over batches
of ``--batch`` requests (20) per variant, the variants interleaved batch by
batch in shuffled order; a delta is the median over all batches of the
paired difference (``--requests`` per variant and round: with the
defaults, 15 batches a round).  Short interleaved batches see the same load of the machine; a
median over batches drops a batch that a preemption or a garbage collection
hit.  None is deepsec's: the bench counts the cyclic garbage each variant
leaves per request and prints it (equal in every variant).  Table 2 repeats it with an endpoint
that runs one ``select 1`` through a pool (python-oracledb thin, TCPS) to the
wire test server in its own process (``bench/_wire.py``): each request timed
on its own, variants interleaved in blocks of ``--block`` (order shuffled per
block), the median request per round; CPU and wall-clock time.  The pool is
the same plain pool for all apps, so the table isolates the adapter's share
of a realistic request (the driver hook's cost is ``bench/hook.py``'s
subject).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import io
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import floors


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _entra_sized_token() -> str:
    """A JWT of the size Entra ID issues for a user (about 2 KB; deepsec checks no signature).

    A realistic length matters: what an adapter does per byte of the token
    (a floor slices and copies it; a lookup keyed by it hashes it) is part of
    its cost.  Deterministic, so that every run sends the same bytes.
    """
    tenant, user = "72f988bf-86f1-41af-91ab-2d7cd011db47", "a6b0c1d2-e3f4-4a5b-8c6d-7e8f9a0b1c2d"
    claims = {
        "aud": "api://hr-app",
        "iss": f"https://login.microsoftonline.com/{tenant}/v2.0",
        "iat": 1765100000,
        "nbf": 1765100000,
        "exp": 1765104000,
        "aio": "AWQAm/8ZAAAA" + "x" * 120,
        "azp": "5f6e7d8c-9b0a-4c1d-8e2f-3a4b5c6d7e8f",
        "azpacr": "1",
        "groups": [f"{g:08x}-1111-4222-8333-444455556666" for g in range(8)],
        "name": "Alice Example",
        "oid": user,
        "preferred_username": "alice@example.com",
        "rh": "1.AXEAv4j5cvGGr0GRqy180BHbR" + "y" * 40,
        "roles": ["HR.Read", "HR.Write"],
        "scp": "user_impersonation",
        "sid": "00aa11bb-22cc-33dd-44ee-55ff66aa77bb",
        "sub": "Z2lvcmdpby5leGFtcGxlLnN1YmplY3Q" + "z" * 12,
        "tid": tenant,
        "uti": "AbCdEfGhIjKlMnOpQrStUv",
        "ver": "2.0",
        "wids": ["b79fbf4d-3ef9-4689-8143-76b194e85509"],
    }
    header = {"typ": "JWT", "alg": "RS256", "kid": "kWbkaa6qs8wsTnBwiiNYOhHbnAw"}
    signature = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(8))  # 256 bytes
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature))
    )


TOKEN = _entra_sized_token()
HEADERS = {"authorization": f"Bearer {TOKEN}", "cookie": "theme=dark; csrftoken=f00ba4"}
SELECT = "select 1 from dual"

#: Runs n requests; returns each one's (CPU seconds, wall-clock seconds), or
#: with ``each=False`` one entry: their mean, timed around the whole batch.
#: (Timing each request reads the thread's CPU clock, a system call, twice
#: per request: it adds about 3 us to a 15 us request and disturbs the CPU
#: caches every adapter's cost depends on, so Table 1 times batches.)
Runner = Callable[[int], list[tuple[float, float]]]

#: A second, identical floor app per framework: what it adds beyond the
#: first is the run's noise (two copies of one app differ by their place in
#: memory and the order they run in), printed beside the verdict.
FLOOR_COPY = "floor copy"

#: The floor plus the safety properties deepsec keeps (``bench/floors.py``,
#: "safe floors": a lease that ends spawned work's identity; a 401 for an
#: end-user error before the response started), written idiomatically:
#: how much of deepsec's cost above the floor those properties are.
SAFE_FLOOR = "safe floor"
#: ``[True]`` when the groups include the safe floor (``--safe-floor``).
WITH_SAFE_FLOOR: list[bool] = []


def _safe() -> tuple[str, ...]:
    """The safe floor's variant name when this run measures it, else nothing."""
    return (SAFE_FLOOR,) if WITH_SAFE_FLOOR else ()


# -- request drivers ---------------------------------------------------------------


def wsgi_environ(path: str) -> dict[str, Any]:
    """The bench request as a WSGI environ (without ``wsgi.input``: one per request)."""
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "HTTP_AUTHORIZATION": HEADERS["authorization"],
        "HTTP_COOKIE": HEADERS["cookie"],
    }


def wsgi_environs(path: str) -> Callable[[], dict[str, Any]]:
    """Makes each request's environ as a server does: its header values new str objects.

    (A server decodes them from the request's bytes anew: nothing has
    computed their hash yet.)
    """
    environ = wsgi_environ(path)
    fresh = [(k, environ[k].encode("latin-1")) for k in ("HTTP_AUTHORIZATION", "HTTP_COOKIE")]

    def new_environ() -> dict[str, Any]:
        env = dict(environ)
        for key, raw in fresh:
            env[key] = raw.decode("latin-1")
        env["wsgi.input"] = io.BytesIO()
        return env

    return new_environ


def wsgi_runner(app: Any, path: str, each: bool) -> Runner:
    new_environ = wsgi_environs(path)

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        assert status.startswith("200"), status

    def run(n: int) -> list[tuple[float, float]]:
        timed = []
        cpu_clock, clock = time.thread_time, time.perf_counter
        b0, s0 = cpu_clock(), clock()
        for _ in range(n):
            if each:
                c0, t0 = cpu_clock(), clock()
            body = app(new_environ(), start_response)
            try:
                for _chunk in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            if each:
                t1, c1 = clock(), cpu_clock()
                timed.append((c1 - c0, t1 - t0))
        return timed if each else [((cpu_clock() - b0) / n, (clock() - s0) / n)]

    return run


def asgi_runner(app: Any, loop: asyncio.AbstractEventLoop, path: str, each: bool) -> Runner:
    # Copied into new bytes objects for every request, as a server parses them.
    raw_headers = [(bytearray(k.encode()), bytearray(v.encode())) for k, v in HEADERS.items()]
    template = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],  # (each request's own: see below)
        "client": ("127.0.0.1", 1234),
        "server": ("bench", 80),
        # What uvicorn adds to every HTTP scope (a copy of the lifespan state).
        # Without it, FastAPI fills the scope dict to exactly its capacity and
        # the first key a middleware adds pays for resizing it.
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    async def many(n: int) -> list[tuple[float, float]]:
        timed = []
        cpu_clock, clock = time.thread_time, time.perf_counter
        b0, s0 = cpu_clock(), clock()
        for _ in range(n):
            if each:
                c0, t0 = cpu_clock(), clock()
            scope = dict(template)
            scope["headers"] = [(bytes(k), bytes(v)) for k, v in raw_headers]
            scope["state"] = {}
            await app(scope, receive, send)
            if each:
                t1, c1 = clock(), cpu_clock()
                timed.append((c1 - c0, t1 - t0))
        return timed if each else [((cpu_clock() - b0) / n, (clock() - s0) / n)]

    return lambda n: loop.run_until_complete(many(n))


# -- apps ------------------------------------------------------------------------------


class Pools:
    """The wire server's pools (``None`` without a database)."""

    sync: Any = None
    aio: Any = None


POOLS = Pools()


def sync_statement() -> None:
    with POOLS.sync.acquire() as conn, conn.cursor() as cur:
        cur.execute(SELECT)
        cur.fetchone()


async def async_statement() -> None:
    async with POOLS.aio.acquire() as conn:
        cur = conn.cursor()
        await cur.execute(SELECT)
        await cur.fetchone()


def flask_apps() -> dict[str, Any]:
    from flask import Flask

    from deepsec.flask import DeepSec

    def build(variant: str) -> Any:
        app = Flask(f"bench-{variant}")
        if variant.startswith("floor"):
            floors.install_flask_floor(app)
        elif variant == SAFE_FLOOR:
            floors.install_flask_safe_floor(app)
        elif variant == "deepsec":
            DeepSec(app)

        @app.get("/")
        def index() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/db")
        def db() -> dict[str, str]:
            sync_statement()
            return {"status": "ok"}

        return app

    return {v: build(v) for v in ("bare", "floor", FLOOR_COPY, "deepsec", *_safe())}


def _django_index(request: Any) -> Any:
    from django.http import JsonResponse

    return JsonResponse({"status": "ok"})


def _django_db(request: Any) -> Any:
    from django.http import JsonResponse

    sync_statement()
    return JsonResponse({"status": "ok"})


#: ``[True]`` once Django is configured for the bench (empty: not installed).
DJANGO: list[bool] = []


def django_setup() -> bool:
    """Configure Django once for the bench (again: nothing); False when it is not installed."""
    try:
        import django
        from django.conf import settings
        from django.urls import path

        import deepsec.django  # noqa: F401  (the INSTALLED_APPS entry below)
    except ImportError:
        return False
    if settings.configured:
        return True
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        # deepsec.django: the middleware refuses to run without its app (hook + checks).
        INSTALLED_APPS=["deepsec.django"],
        SECRET_KEY="bench-only",
        LOGGING_CONFIG=None,
    )
    globals()["urlpatterns"] = [path("", _django_index), path("db", _django_db)]
    django.setup()
    return True


def django_apps() -> dict[str, Any]:
    """New handlers, one per variant (after :func:`django_setup`)."""
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler

    import deepsec.django

    apps = {}
    for variant, middleware in (
        ("bare", []),
        ("floor", ["floors.django_floor"]),
        (FLOOR_COPY, ["floors.django_floor"]),
        ("deepsec", [deepsec.django.MIDDLEWARE_PATH]),
        *((v, ["floors.django_safe_floor"]) for v in _safe()),
    ):
        settings.MIDDLEWARE = middleware
        apps[variant] = WSGIHandler()
    return apps


def starlette_apps() -> dict[str, Any]:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from deepsec.asgi import EndUserSecMiddleware

    async def index(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def db(request: Request) -> JSONResponse:
        await async_statement()
        return JSONResponse({"status": "ok"})

    routes = [Route("/", index), Route("/db", db)]
    return {
        "bare": Starlette(routes=routes),
        "floor": Starlette(routes=routes, middleware=[Middleware(floors.ASGIFloor)]),
        FLOOR_COPY: Starlette(routes=routes, middleware=[Middleware(floors.ASGIFloor)]),
        "deepsec": Starlette(routes=routes, middleware=[Middleware(EndUserSecMiddleware)]),
        **{
            v: Starlette(routes=routes, middleware=[Middleware(floors.ASGISafeFloor)])
            for v in _safe()
        },
    }


def _fastapi_app(dependencies: list[Any], middleware: Any = None) -> Any:
    from fastapi import FastAPI

    app = FastAPI(dependencies=dependencies)
    if middleware is not None:
        app.add_middleware(middleware)

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/db")
    async def db() -> dict[str, str]:
        await async_statement()
        return {"status": "ok"}

    return app


def fastapi_apps() -> dict[str, Any]:
    """FastAPI with an ASGI middleware (the floor's or deepsec's)."""
    from deepsec.asgi import EndUserSecMiddleware

    return {
        "bare": _fastapi_app([]),
        "floor": _fastapi_app([], floors.ASGIFloor),
        FLOOR_COPY: _fastapi_app([], floors.ASGIFloor),
        "deepsec": _fastapi_app([], EndUserSecMiddleware),
        **{v: _fastapi_app([], floors.ASGISafeFloor) for v in _safe()},
    }


def fastapi_dependency_apps() -> dict[str, Any]:
    """FastAPI with an app-wide dependency (the floor's or deepsec's).

    Measured apart from the middleware apps, as an app uses one or the
    other: run in turn with them, deepsec's two adapters share code with two
    lease classes, which the floors do not, and CPython's specialized
    instructions for one class miss for the other.
    """
    from fastapi import Depends

    from deepsec.fastapi import end_user_identity

    floor = [Depends(floors.fastapi_floor_dependency)]
    return {
        "bare": _fastapi_app([]),
        "floor": _fastapi_app(floor),
        FLOOR_COPY: _fastapi_app(floor),
        "deepsec": _fastapi_app([Depends(end_user_identity)]),
        **{v: _fastapi_app([Depends(floors.fastapi_safe_floor_dependency)]) for v in _safe()},
    }


# -- measurement -----------------------------------------------------------------------


#: variant -> per round (Table 2) or per batch (Table 1): (cpu, wall) per request
Samples = dict[str, list[tuple[float, float]]]


def measure(
    build: Callable[[], dict[str, Runner]],
    n: int,
    rounds: int,
    *,
    block: int,
    stat: Callable[[list[float]], float] | None,
    seed: int = 0,
) -> Samples:
    """Each variant's ``stat`` of its per-request (cpu, wall) seconds, per round.

    With ``stat=None``, one sample per batch instead (the runner's mean over
    the batch): the variants' samples pair batch by batch.

    Every round builds every app anew (``build``) and warms it up untimed,
    then runs ``n`` requests per variant in blocks of ``block``, the order
    of the variants shuffled per block, so that they share the machine's
    load of the moment.  New apps each round: an app object's place in
    memory biases its timings for as long as it lives (two identical floor
    apps built once differed by up to 4.6 us per request under FastAPI), and
    building them anew turns that bias into noise the medians average out.
    """
    rng = random.Random(seed)
    samples: Samples = {}
    for _ in range(rounds):
        runners = build()
        for run in runners.values():
            run(max(n // 5, 10))  # warm up: caches, remembered resolutions
        names = list(runners)
        timed: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for start in range(0, n, block):
            rng.shuffle(names)
            for name in names:
                timed[name] += runners[name](min(block, n - start))
        if stat is None:
            for name, each in timed.items():
                samples.setdefault(name, []).extend(each)
            continue
        for name, each in timed.items():
            cpu = stat([c for c, _ in each])
            wall = stat([w for _, w in each])
            samples.setdefault(name, []).append((cpu, wall))
    return samples


def _median(samples: Samples, name: str, column: int) -> float:
    return statistics.median(s[column] for s in samples[name])


def _median_delta(samples: Samples, a: str, b: str, column: int) -> float:
    """Median of ``a - b`` over paired samples (one round or batch each: load cancels)."""
    return statistics.median(
        x[column] - y[column] for x, y in zip(samples[a], samples[b], strict=True)
    )


def _floor_adds(samples: Samples, column: int) -> tuple[float, float]:
    """What the floor adds over bare (the mean of both copies'), and the copies' difference."""
    first = _median_delta(samples, "floor", "bare", column)
    copy = _median_delta(samples, FLOOR_COPY, "bare", column)
    return (first + copy) / 2, copy - first


def row(samples: Samples, label: str, column: int) -> str:
    """One row of the targets' table: bare, floor and deepsec; the copies' difference last."""
    us = 1e6
    floor_adds, noise = _floor_adds(samples, column)
    ours_adds = _median_delta(samples, "deepsec", "bare", column)
    ratio = ours_adds / floor_adds if floor_adds > 0 else float("inf")
    above = ours_adds - floor_adds
    return (
        f"| {label} | {_median(samples, 'bare', column) * us:.1f} | "
        f"{_median(samples, 'floor', column) * us:.1f} | "
        f"{_median(samples, 'deepsec', column) * us:.1f} | "
        f"{floor_adds * us:+.1f} | {ours_adds * us:+.1f} | {above * us:+.1f} | {ratio:.2f}x | "
        f"{noise * us:+.1f} |"
    )


def safe_row(samples: Samples, label: str, column: int) -> str:
    """One row of the safe-floor table: what the safety properties cost when written by hand."""
    us = 1e6
    floor_adds, _noise = _floor_adds(samples, column)  # (as in the targets' table)
    safe_adds = _median_delta(samples, SAFE_FLOOR, "bare", column)
    ours_adds = _median_delta(samples, "deepsec", "bare", column)
    ratio = ours_adds / safe_adds if safe_adds > 0 else float("inf")
    return (
        f"| {label} | {floor_adds * us:+.1f} | {safe_adds * us:+.1f} | {ours_adds * us:+.1f} | "
        f"{(ours_adds - safe_adds) * us:+.1f} | {ratio:.2f}x |"
    )


def report(title: str, results: dict[str, Samples], column: int, how: str = "") -> None:
    unit = "CPU" if column == 0 else "wall-clock"
    how = how or f"medians of {unit} per round, deltas paired"
    print(f"\n{title} ({unit} us per request; {how})\n")
    print(
        "| framework | bare | floor | deepsec | floor adds | deepsec adds | deepsec - floor "
        "| deepsec adds / floor adds | A/A: floor copy - floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for framework, r in results.items():
        print(row(r, framework, column))
    if all(SAFE_FLOOR in r for r in results.values()):
        print(
            f"\n{title}, against the safe floor -- a diagnostic, not the issue-9 target "
            "(the floor plus the properties deepsec keeps: a lease that ends the identity of "
            "work spawned by the request, and a 401 for an end-user error before the response "
            "starts; bench/floors.py)\n"
        )
        print(
            "| framework | floor adds | safe floor adds | deepsec adds | deepsec - safe floor "
            "| deepsec adds / safe floor adds |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for framework, r in results.items():
            print(safe_row(r, framework, column))


#: The table's rows: each one's apps (variant -> app) and whether they are ASGI apps.
GROUPS: list[tuple[str, Callable[[], dict[str, Any]], bool]] = [
    ("Flask (DeepSec)", flask_apps, False),
    ("Django (middleware)", django_apps, False),
    ("Starlette (ASGI middleware)", starlette_apps, True),
    ("FastAPI (ASGI middleware)", fastapi_apps, True),
    ("FastAPI (dependency)", fastapi_dependency_apps, True),
]


def groups() -> list[tuple[str, Callable[[], dict[str, Any]], bool]]:
    """The rows this run measures (Django's only when it is installed)."""
    return [g for g in GROUPS if DJANGO or g[1] is not django_apps]


def runners(
    apps: Callable[[], dict[str, Any]],
    is_asgi: bool,
    loop: asyncio.AbstractEventLoop,
    path: str,
    each: bool,
) -> dict[str, Runner]:
    """New apps of one row, each as "serve n requests" (:data:`Runner`)."""
    if is_asgi:
        return {k: asgi_runner(a, loop, path, each) for k, a in apps().items()}
    return {k: wsgi_runner(a, path, each) for k, a in apps().items()}


def cyclic_garbage(loop: asyncio.AbstractEventLoop, requests: int = 500) -> str:
    """Cyclic garbage each variant leaves per request (what Table 1's medians may drop).

    Every variant serves ``requests`` with the collector off; a collection
    then counts what only it could free.  Equal counts: no variant makes the
    collector run more often than another.
    """
    import gc

    lines = []
    for label, apps, is_asgi in groups():
        counts = []
        for variant, run in runners(apps, is_asgi, loop, "/", False).items():
            run(20)
            gc.collect()
            gc.disable()
            try:
                run(requests)
            finally:
                gc.enable()
            counts.append(f"{variant} {gc.collect() / requests:.1f}")
        lines.append(f"{label}: " + ", ".join(counts))
    return "\nCyclic garbage per request (objects):\n" + "\n".join(lines)


def run_all(
    path: str,
    n: int,
    rounds: int,
    loop: asyncio.AbstractEventLoop,
    *,
    block: int,
    stat: Callable[[list[float]], float] | None,
) -> dict[str, Samples]:
    """Every row's samples; ``stat=None``: one per batch (:func:`measure`)."""
    each = stat is not None  # a median over a round needs each request's time
    results: dict[str, Samples] = {}
    for label, apps, is_asgi in groups():
        build = functools.partial(runners, apps, is_asgi, loop, path, each)
        results[label] = measure(build, n, rounds, block=block, stat=stat)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per round")
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=20, help="requests per app in a row")
    parser.add_argument("--db-requests", type=int, default=50, help="requests per round (db)")
    parser.add_argument("--block", type=int, default=10, help="requests per app in a row (db)")
    parser.add_argument("--no-db", action="store_true", help="skip the wire-server table")
    parser.add_argument(
        "--safe-floor",
        action="store_true",
        help="add the safe floor app and its table (a diagnostic; changes the interleaving)",
    )
    args = parser.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)
    DJANGO.extend([True] if django_setup() else [])
    WITH_SAFE_FLOOR.extend([True] if args.safe_floor else [])
    loop = asyncio.new_event_loop()
    try:
        print(f"python {sys.version.split()[0]}, {args.rounds} rounds")
        # Table 1: CPU per request over short interleaved batches, paired
        # batch by batch (medians: what a preemption hits is dropped).
        results = run_all("/", args.requests, args.rounds, loop, block=args.batch, stat=None)
        report("Table 1: no database", results, 0, "medians over batches of paired deltas")
        print(cyclic_garbage(loop))
        if not args.no_db:
            import oracledb
            from _wire import wire_server

            with wire_server() as wire:
                kwargs = {"user": wire.user, "password": wire.password, "dsn": wire.dsn}
                POOLS.sync = oracledb.create_pool(
                    min=1, max=1, ssl_context=wire.ssl_context(), **kwargs
                )

                async def make_async_pool() -> Any:
                    return oracledb.create_pool_async(
                        min=1, max=1, ssl_context=wire.ssl_context(), **kwargs
                    )

                POOLS.aio = loop.run_until_complete(make_async_pool())
                try:
                    # Table 2: the median request, variants interleaved in
                    # short blocks: a round trip's latency jitters by tens of
                    # microseconds, so a mean would be the jitter's.
                    results = run_all(
                        "/db",
                        args.db_requests,
                        args.rounds,
                        loop,
                        block=args.block,
                        stat=statistics.median,
                    )
                finally:
                    loop.run_until_complete(POOLS.aio.close(force=True))
                    POOLS.sync.close(force=True)
            report("Table 2: one statement through a pool to the wire test server", results, 0)
            report("Table 2 (same run)", results, 1)
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

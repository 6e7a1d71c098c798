"""Adapter overhead: requests/s of a bare app vs the same app with deepsec's adapter.

Run ``python bench/adapters.py [--requests N] [--rounds R]``.  No database and
no server: each WSGI/ASGI app is called directly, in process, with a request
carrying an end-user identity (a bearer token, or a ``["name", null]``
cookie) so the adapter does its full work: read the header or cookie, parse
and validate the identity, build and activate the context, reset it.  Bare
and adapted rounds are interleaved (and their order alternates) to cancel
drift and noise; the reported figure is the median per-request time.

Frameworks: Flask (:class:`deepsec.flask.DeepSec`), Starlette with the ASGI
middleware, FastAPI with the ``end_user_identity`` dependency (and with the
middleware), and Django when ``deepsec.django`` is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

TOKEN = (
    ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
        for part in ({"alg": "none"}, {"sub": "alice", "preferred_username": "alice"})
    )
    + ".sig"
)
HEADERS = {"authorization": f"Bearer {TOKEN}", "cookie": 'theme=dark; identity=["bob", null]'}

Runner = Callable[[int], float]  # run n requests, return seconds


# -- WSGI ------------------------------------------------------------------------


def wsgi_runner(app: Any, path: str = "/") -> Runner:
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "HTTP_AUTHORIZATION": HEADERS["authorization"],
        "HTTP_COOKIE": HEADERS["cookie"],
    }

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        assert status.startswith("200"), status

    def run(n: int) -> float:
        import io

        start = time.perf_counter()
        for _ in range(n):
            env = dict(environ)
            env["wsgi.input"] = io.BytesIO()
            body = app(env, start_response)
            try:
                for _chunk in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        return time.perf_counter() - start

    return run


def flask_apps() -> tuple[Any, Any]:
    from flask import Flask

    from deepsec.flask import DeepSec

    def build(adapted: bool) -> Any:
        app = Flask("bench")
        if adapted:
            DeepSec(app)

        @app.get("/")
        def index() -> dict[str, str]:
            return {"status": "ok"}

        return app

    return build(False), build(True)


def django_apps() -> tuple[Any, Any] | None:
    try:
        import django
        from django.conf import settings

        import deepsec.django
    except ImportError:
        return None
    from django.http import JsonResponse
    from django.urls import path

    def index(request: Any) -> Any:
        return JsonResponse({"status": "ok"})

    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        SECRET_KEY="bench-only",
        LOGGING_CONFIG=None,
    )
    globals()["urlpatterns"] = [path("", index)]
    django.setup()
    from django.core.handlers.wsgi import WSGIHandler

    bare = WSGIHandler()
    settings.MIDDLEWARE = [deepsec.django.MIDDLEWARE_PATH]
    adapted = WSGIHandler()
    return bare, adapted


# -- ASGI ------------------------------------------------------------------------


def asgi_runner(app: Any, loop: asyncio.AbstractEventLoop, path: str = "/") -> Runner:
    headers = [(k.encode(), v.encode()) for k, v in HEADERS.items()]
    scope_template = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("bench", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    async def many(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await app(dict(scope_template), receive, send)
        return time.perf_counter() - start

    return lambda n: loop.run_until_complete(many(n))


def starlette_apps() -> tuple[Any, Any]:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from deepsec.asgi import EndUserSecMiddleware

    async def index(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    bare = Starlette(routes=[Route("/", index)])
    adapted = Starlette(routes=[Route("/", index)], middleware=[Middleware(EndUserSecMiddleware)])
    return bare, adapted


def fastapi_apps() -> tuple[Any, Any, Any]:
    from fastapi import Depends, FastAPI

    from deepsec.asgi import EndUserSecMiddleware
    from deepsec.fastapi import end_user_identity

    def build(dependencies: list[Any], middleware: bool = False) -> Any:
        app = FastAPI(dependencies=dependencies)
        if middleware:
            app.add_middleware(EndUserSecMiddleware)

        @app.get("/")
        async def index() -> dict[str, str]:
            return {"status": "ok"}

        return app

    return build([]), build([Depends(end_user_identity)]), build([], middleware=True)


# -- measurement -----------------------------------------------------------------


def compare(name: str, bare: Runner, adapted: Runner, n: int, rounds: int) -> float:
    bare(max(n // 5, 50))  # warm up both
    adapted(max(n // 5, 50))
    times: dict[str, list[float]] = {"bare": [], "adapted": []}
    for i in range(rounds):
        order = [("bare", bare), ("adapted", adapted)]
        if i % 2:
            order.reverse()
        for label, run in order:
            times[label].append(run(n) / n)
    b, a = statistics.median(times["bare"]), statistics.median(times["adapted"])
    overhead = (a / b - 1) * 100
    print(
        f"{name:<28} {1 / b:>10,.0f} req/s {1 / a:>10,.0f} req/s "
        f"{(a - b) * 1e6:>7.1f} us {overhead:>+7.1f} %"
    )
    return overhead


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    args = parser.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)
    print(f"{'framework':<28} {'bare':>16} {'with deepsec':>16} {'added':>10} {'overhead':>9}")
    n, rounds = args.requests, args.rounds

    flask_bare, flask_adapted = flask_apps()
    compare("Flask (DeepSec)", wsgi_runner(flask_bare), wsgi_runner(flask_adapted), n, rounds)

    django = django_apps()
    if django is not None:
        compare("Django (middleware)", wsgi_runner(django[0]), wsgi_runner(django[1]), n, rounds)

    loop = asyncio.new_event_loop()
    try:
        s_bare, s_adapted = starlette_apps()
        compare(
            "Starlette (ASGI middleware)",
            asgi_runner(s_bare, loop),
            asgi_runner(s_adapted, loop),
            n,
            rounds,
        )
        f_bare, f_dep, f_mw = fastapi_apps()
        compare(
            "FastAPI (dependency)",
            asgi_runner(f_bare, loop),
            asgi_runner(f_dep, loop),
            n,
            rounds,
        )
        compare(
            "FastAPI (ASGI middleware)",
            asgi_runner(f_bare, loop),
            asgi_runner(f_mw, loop),
            n,
            rounds,
        )
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

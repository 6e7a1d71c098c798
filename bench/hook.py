"""Cost of deepsec's driver hook, side by side in one run.

    python bench/hook.py [--rounds R] [--requests N] [--users U]

1. **Requests through a pool** (the realistic figure): one request is "read
   the end user's bearer token, acquire a pooled connection, run
   ``select 1 from dual``, fetch, release", against the Oracle wire test
   server running in its own process (``bench/_wire.py``), over TCPS.  Three
   apps, each with its own pool, run in interleaved rounds (the order
   rotates, so machine noise and drift hit all alike); the figure is the
   median per-request wall-clock time:

   - ``bare``: no end-user context at all;
   - ``by hand``: what a competent developer writes without deepsec: a dict
     of built contexts per user token (``create_end_user_security_context``
     once per user), and ``conn.set_end_user_security_context(...)`` on every
     acquire (the pool clears it on release);
   - ``deepsec``: ``with deepsec.end_user(token):`` around the same request,
     on a pool created with ``end_user_sec_params``.

   The requests cycle through ``--users`` end users, and each request gets a
   fresh token string (as a header parser produces), so neither app can
   recognise a user by object identity.  deepsec's cost is the
   ``deepsec / by hand`` ratio (target: at most 1.03).
2. **The callback alone** on a connection whose context is unchanged (the
   hot path of later round trips of one request), against an empty callback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oracledb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import spi_static
from _wire import WireServer, wire_server

import deepsec

SQL = "select 1 from dual"
PARAMS = {"end_user_sec_params": {"spi_type": "spi_static", "client_id": "hr-app"}}

Request = Callable[[str], None]  # one request, given the Authorization header


def _pool(wire: WireServer, **extra: Any) -> Any:
    return oracledb.create_pool(
        user=wire.user,
        password=wire.password,
        dsn=wire.dsn,
        ssl_context=wire.ssl_context(),
        min=2,
        max=2,
        increment=0,
        **extra,
    )


def _query(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute(SQL)
        cur.fetchone()


def bare_app(pool: Any) -> Request:
    def request(header: str) -> None:
        header[7:]  # the app reads the header all the same
        with pool.acquire() as conn:
            _query(conn)

    return request


def by_hand_app(pool: Any) -> Request:
    access_token = spi_static.get_database_access_token({"client_id": "hr-app"}, None)
    contexts: dict[str, Any] = {}

    def request(header: str) -> None:
        token = header[7:]
        context = contexts.get(token)
        if context is None:
            context = contexts[token] = oracledb.create_end_user_security_context(
                access_token, end_user_identity=token
            )
        with pool.acquire() as conn:
            conn.set_end_user_security_context(context)
            _query(conn)

    return request


def deepsec_app(pool: Any) -> Request:
    def request(header: str) -> None:
        with deepsec.end_user(header[7:]), pool.acquire() as conn:
            _query(conn)

    return request


def run_round(app: Request, headers: list[str], n: int) -> tuple[float, float]:
    """Wall-clock and client CPU seconds per request, ``n`` requests over ``headers``."""
    fresh = [h.encode().decode() for h in headers]  # new str objects each round
    users = len(fresh)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        app(fresh[i % users])
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def per_call_ns(fn: Callable[[str], Any], n: int = 200_000) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn("execute")
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def bench_requests(wire: WireServer, rounds: int, n: int, users: int) -> None:
    headers = [
        "Bearer " + spi_static.make_jwt({"preferred_username": f"user{i}", "sub": f"s{i}"})
        for i in range(users)
    ]
    pools = {
        "bare": _pool(wire),
        "by hand": _pool(wire),
        "deepsec": _pool(wire, extra_auth_params=PARAMS),
    }
    apps = {
        "bare": bare_app(pools["bare"]),
        "by hand": by_hand_app(pools["by hand"]),
        "deepsec": deepsec_app(pools["deepsec"]),
    }
    try:
        for app in apps.values():  # warm up: connections, caches, statement cache
            run_round(app, headers, 200)
        wall: dict[str, list[float]] = {k: [] for k in apps}
        cpu: dict[str, list[float]] = {k: [] for k in apps}
        order = list(apps)
        for r in range(rounds):
            for name in order[r % 3 :] + order[: r % 3]:  # rotate: no order bias
                w, c = run_round(apps[name], headers, n)
                wall[name].append(w)
                cpu[name].append(c)
        print(
            f"requests through a pool to the wire test server in its own process "
            f"({rounds} rounds x {n} requests, {users} users; medians)"
        )
        print(f"  {'':10s} {'wall us':>9s} {'x bare':>7s} {'client CPU us':>14s} {'x bare':>7s}")
        mw = {k: statistics.median(v) * 1e6 for k, v in wall.items()}
        mc = {k: statistics.median(v) * 1e6 for k, v in cpu.items()}
        for k in apps:
            print(
                f"  {k:10s} {mw[k]:9.1f} {mw[k] / mw['bare']:7.3f} "
                f"{mc[k]:14.1f} {mc[k] / mc['bare']:7.3f}"
            )
        paired = [d / h for d, h in zip(wall["deepsec"], wall["by hand"], strict=True)]
        print(
            f"  deepsec / by hand, wall clock: {mw['deepsec'] / mw['by hand']:.3f} "
            f"(median of paired rounds {statistics.median(paired):.3f}; target <= 1.03)"
        )
        print(f"  deepsec - by hand, client CPU: {mc['deepsec'] - mc['by hand']:+.1f} us/request")
    finally:
        for pool in pools.values():
            pool.close(force=True)


def bench_callback(wire: WireServer) -> None:
    token = spi_static.make_jwt({"preferred_username": "alice"})
    with deepsec.end_user(token):
        conn = oracledb.connect(
            user=wire.user,
            password=wire.password,
            dsn=wire.dsn,
            ssl_context=wire.ssl_context(),
            extra_auth_params=PARAMS,
        )
        try:
            conn.ping()  # attach once; from here on the context is unchanged
            callback = conn.round_trip_callback
            empty_ns = per_call_ns(lambda name: None)
            ours_ns = per_call_ns(callback)
        finally:
            conn.close()
    print("\nper-round-trip callback, context unchanged (best of 5)")
    print(f"  empty callback      {empty_ns:8.0f} ns/call")
    print(f"  deepsec callback    {ours_ns:8.0f} ns/call")
    print(f"  added by deepsec    {ours_ns - empty_ns:8.0f} ns/call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--users", type=int, default=8)
    args = parser.parse_args()
    with wire_server() as wire:
        bench_requests(wire, args.rounds, args.requests, args.users)
        bench_callback(wire)


if __name__ == "__main__":
    main()

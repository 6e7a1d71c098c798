"""Cost of deepsec's per-round-trip callback, side by side in one run.

    python bench/hook.py

1. The callback alone on a real connection whose context is unchanged (the
   hot path: a contextvar read, a cache lookup, two comparisons), against an
   empty callback, in nanoseconds per call.
2. Whole round trips (``ping`` and a cached ``select``) over TCPS to the
   wire test server, interleaved in rounds so machine noise hits all alike:
   ``no context``; ``manual``, a context set once by hand with
   ``set_end_user_security_context`` and no deepsec callback; and
   ``deepsec``.  Every round trip with a context carries its payload, which
   the driver encodes and the (Python) test server decodes, so deepsec's own
   cost is the ``deepsec / manual`` ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import oracledb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import deepsec
import spi_static
from deepsec.testing.oracle import OracleTestServer

SQL = "select xs_sys_context('xs$session','username') from dual"


def per_call_ns(fn, n: int = 200_000) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn("execute")
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def round_trip_us(conn: oracledb.Connection, n: int) -> tuple[float, float]:
    cur = conn.cursor()
    start = time.perf_counter()
    for _ in range(n):
        conn.ping()
    ping = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(n):
        cur.execute(SQL)
        cur.fetchone()
    select = (time.perf_counter() - start) / n * 1e6
    return ping, select


def main() -> None:
    server = OracleTestServer(users={"app_user": "app_password"})
    server.start()
    kwargs = {
        "user": "app_user",
        "password": "app_password",
        "dsn": server.dsn,
        "ssl_context": server.client_ssl_context(),
    }
    token = spi_static.make_jwt({"preferred_username": "alice"})
    try:
        plain = oracledb.connect(**kwargs)
        with deepsec.end_user(token):
            ours = oracledb.connect(
                **kwargs, extra_auth_params={"end_user_sec_params": {"spi_type": "spi_static"}}
            )
            ours.ping()  # attach once; from here on the context is unchanged
            callback = ours.round_trip_callback
            empty_ns = per_call_ns(lambda name: None)
            ours_ns = per_call_ns(callback)
            print("per-round-trip callback, context unchanged")
            print(f"  empty callback      {empty_ns:8.0f} ns/call")
            print(f"  deepsec callback    {ours_ns:8.0f} ns/call")
            print(f"  added by deepsec    {ours_ns - empty_ns:8.0f} ns/call")

            manual = oracledb.connect(**kwargs)
            manual.set_end_user_security_context(
                oracledb.create_end_user_security_context(
                    spi_static.get_database_access_token({}, token), end_user_identity=token
                )
            )
            rounds, n = 7, 300
            conns = {"no context": plain, "manual": manual, "deepsec": ours}
            rows: dict[str, list[tuple[float, float]]] = {k: [] for k in conns}
            order = list(conns)
            for r in range(rounds):
                for name in order[r % 3 :] + order[: r % 3]:  # rotate: no order bias
                    rows[name].append(round_trip_us(conns[name], n))
        print(f"\nround trips over TCPS to the wire test server ({rounds} rounds x {n}, median)")
        print(f"  {'':10s} {'ping us':>10s} {'select us':>10s}")
        med = {
            k: (statistics.median(p for p, _ in v), statistics.median(s for _, s in v))
            for k, v in rows.items()
        }
        for k, (p, s) in med.items():
            print(f"  {k:10s} {p:10.1f} {s:10.1f}")
        print(
            f"  {'ratio':10s} {med['deepsec'][0] / med['manual'][0]:10.3f} "
            f"{med['deepsec'][1] / med['manual'][1]:10.3f}   (deepsec / manual; target <= 1.03)"
        )
        plain.close()
        manual.close()
        ours.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()

"""Token acquisition under load: deepsec vs python-oracledb's ``azure_tokens`` plugin.

Run with ``python bench/tokens.py``.  Both sides talk real HTTPS to a local
identity provider (:class:`deepsec.testing.idp.LocalIdP`) with the
on-behalf-of flow, on the same load:

* **cold start**: 64 threads ask for tokens on an empty cache, for 1 user and
  for 16 users (4 threads each); reported: identity-provider calls and the
  p50 / p99 latency of one ``get`` call;
* **hit path**: the token is cached; reported: p50 / p99 per call, measured in
  batches of 100 calls (a single call is shorter than the clock's resolution);
  with ``token_cache`` (L1 + Redis) beside the in-process cache alone,
  batches interleaved: the L1 hit path must not get slower;
* **fleet**: :data:`FLEET_PROCESSES` spawned processes x :data:`FLEET_THREADS`
  threads, cold, over :data:`FLEET_USERS` users, for the per-process cache,
  the L1 + L2 (Redis) cache and python-oracledb's plugin, rounds interleaved;
  reported: identity-provider calls per round and p50 / p99 latency.  Needs
  ``redis-server`` (``./run test`` installs it); skipped without it.

Pointing python-oracledb's plugin at a local provider without patching it:
the plugin builds ``msal.ConfidentialClientApplication(client_id,
client_credential, authority)`` with nothing else, so MSAL (a) runs instance
discovery against login.microsoftonline.com unless the authority looks like
Azure AD B2C, and (b) trusts what ``REQUESTS_CA_BUNDLE`` says.  The bench
gives the plugin the provider's B2C-style authority (``.../b2c_local``), which
MSAL accepts without instance discovery, and sets ``REQUESTS_CA_BUNDLE`` to the
test CA for this process.  deepsec's sessions ignore that variable
(``trust_env=False``) and use ``ca_file``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepsec.config import parse_end_user_sec_params
from deepsec.context import EndUserContext
from deepsec.testing.idp import LocalIdP
from deepsec.testing.pytest_plugin import reset_token_state
from deepsec.tokens import token_source_for

THREADS = 64
FLEET_PROCESSES = 8
FLEET_THREADS = 8
FLEET_USERS = 4
FLEET_ROUNDS = 2
HIT_BATCHES = 2_000
BATCH = 100


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cold_start(get: Callable[[str], str], users: list[str]) -> tuple[list[float], int]:
    """64 threads over ``users`` (round robin), all released at once."""
    barrier = threading.Barrier(THREADS)
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        user = users[i % len(users)]
        barrier.wait()
        started = time.perf_counter()
        try:
            get(user)
        except BaseException as exc:
            errors.append(exc)
            return
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]!r}")
    return latencies, len(latencies)


def hit_path(get: Callable[[], Any]) -> list[float]:
    """Per-call latency of a cached ``get``, from batches of ``BATCH`` calls."""
    for _ in range(1_000):
        get()
    per_call: list[float] = []
    for _ in range(HIT_BATCHES):
        started = time.perf_counter_ns()
        for _ in range(BATCH):
            get()
        per_call.append((time.perf_counter_ns() - started) / BATCH)
    return per_call


def hit_pair(get_a: Callable[[], Any], get_b: Callable[[], Any]) -> tuple[list[float], list[float]]:
    """:func:`hit_path` for two callables, batches interleaved (same conditions)."""
    for _ in range(1_000):
        get_a()
        get_b()
    per_a: list[float] = []
    per_b: list[float] = []
    for _ in range(HIT_BATCHES):
        for get, out in ((get_a, per_a), (get_b, per_b)):
            started = time.perf_counter_ns()
            for _ in range(BATCH):
                get()
            out.append((time.perf_counter_ns() - started) / BATCH)
    return per_a, per_b


def fleet_rows(idp: LocalIdP, ref_params: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Cold fleet rounds: per-process cache, L1 + L2, plugin (interleaved)."""
    from deepsec.testing.fleet import Fleet, Round
    from deepsec.testing.redis import RedisTestServer, redis_server_binary

    if redis_server_binary() is None:
        print("fleet rows skipped: redis-server is not installed")
        return []
    redis = RedisTestServer().start()
    modes = ("per-process cache", "L1 + L2 (Redis)", "python-oracledb plugin")
    rounds: dict[str, list[tuple[Round, int]]] = {m: [] for m in modes}
    try:
        with Fleet(FLEET_PROCESSES) as fleet:
            for n in range(FLEET_ROUNDS):
                for mode in modes:
                    users = [
                        idp.issue_user_token(f"fleet{n}-{mode[:2]}-{i}") for i in range(FLEET_USERS)
                    ]
                    redis.flush()
                    idp.reset()
                    if mode == "python-oracledb plugin":
                        result = fleet.run(ref_params, users, threads=FLEET_THREADS, mode="plugin")
                    else:
                        extra = {"token_cache": redis.url} if mode.startswith("L1") else {}
                        params = idp.azure_params("on_behalf_of", timeout=10.0, **extra)
                        result = fleet.run(params, users, threads=FLEET_THREADS)
                    if result.errors:
                        raise RuntimeError(
                            f"{mode}: {len(result.errors)} failed: {result.errors[0]}"
                        )
                    rounds[mode].append((result, idp.token_requests("on_behalf_of")))
    finally:
        redis.stop()
    rows = []
    label = f"fleet cold, {FLEET_PROCESSES} proc x {FLEET_THREADS} thr, {FLEET_USERS} users"
    for mode in modes:
        calls = [c for _, c in rounds[mode]]
        latencies = [x for r, _ in rounds[mode] for x in r.latencies]
        rows.append((label, mode, f"{'/'.join(map(str, calls)):>8}", fmt_ms(latencies)))
    return rows


def fmt_ms(values: list[float]) -> str:
    return f"{pct(values, 0.5) * 1e3:8.2f} / {pct(values, 0.99) * 1e3:8.2f}"


def fmt_ns(values: list[float]) -> str:
    return f"{pct(values, 0.5):8.0f} / {pct(values, 0.99):8.0f}"


def main() -> int:
    idp = LocalIdP().start()
    os.environ["REQUESTS_CA_BUNDLE"] = idp.ca_file  # for the reference plugin only
    os.environ.pop("MSAL_FORCE_REGION", None)
    rows: list[tuple[str, str, str]] = []
    try:
        user_tokens = {f"user{i}": idp.issue_user_token(f"user{i}") for i in range(16)}
        contexts = {name: EndUserContext(tok) for name, tok in user_tokens.items()}

        # --- deepsec ---------------------------------------------------------------
        ours: dict[str, Any] = {}
        for label, users in (("1 user", ["user0"]), ("16 users", list(user_tokens))):
            reset_token_state()
            source = token_source_for(parse_end_user_sec_params(idp.azure_params("on_behalf_of")))
            source.get_token(EndUserContext(idp.issue_user_token("warmup")))  # MSAL app built
            idp.reset()
            lat, _ = cold_start(lambda u, s=source: s.get_token(contexts[u]), users)
            ours[label] = (lat, idp.token_requests("on_behalf_of"))
        ctx = contexts["user0"]
        ours_get = hit_path(lambda: source.get_token(ctx))
        ours_peek = hit_path(lambda: source.cached_token(ctx))
        cache = source.cache  # type: ignore[attr-defined]
        key = next(iter(cache._data))
        ours_raw = hit_path(lambda: cache.peek(key))

        # --- the L1 hit path with and without the Redis L2 behind it ------------------
        from deepsec.testing.redis import RedisTestServer, redis_server_binary

        l1_rows: list[tuple[str, str, str]] = []
        if redis_server_binary() is not None:
            redis = RedisTestServer().start()
            try:
                reset_token_state()
                plain = token_source_for(
                    parse_end_user_sec_params(idp.azure_params("on_behalf_of"))
                )
                shared = token_source_for(
                    parse_end_user_sec_params(
                        idp.azure_params("on_behalf_of", token_cache=redis.url)
                    )
                )
                plain.get_token(ctx)
                shared.get_token(ctx)
                a, b = hit_pair(lambda: plain.get_token(ctx), lambda: shared.get_token(ctx))
                l1_rows.append(
                    ("hit path get_token, L1 only / L1+L2: p50/p99 ns", fmt_ns(a), fmt_ns(b))
                )
                a, b = hit_pair(lambda: plain.cached_token(ctx), lambda: shared.cached_token(ctx))
                l1_rows.append(
                    ("hit path cached_token, L1 only / L1+L2: p50/p99 ns", fmt_ns(a), fmt_ns(b))
                )
            finally:
                reset_token_state()
                redis.stop()

        # --- python-oracledb's plugin ----------------------------------------------------
        import oracledb
        from oracledb.plugins import azure_tokens

        ref_params = {
            "spi_type": "azure_tokens",
            "auth_flow": "on_behalf_of",
            "authority": idp.b2c_authority,
            "client_id": idp.client_id,
            "client_credential": idp.client_secret,
            "scopes": "api://oracle-db/.default",
        }
        ref: dict[str, Any] = {}
        for label, users in (("1 user", ["user0"]), ("16 users", list(user_tokens))):
            for name in user_tokens:  # the plugin's cache is process-wide
                oracledb.save_secret(
                    (
                        user_tokens[name],
                        ref_params["authority"],
                        ref_params["client_id"],
                        ref_params["client_credential"],
                        ref_params["scopes"],
                    ),
                    None,
                )
            idp.reset()
            lat, _ = cold_start(
                lambda u: azure_tokens.get_database_access_token(ref_params, user_tokens[u]),
                users,
            )
            ref[label] = (lat, idp.token_requests("on_behalf_of"), idp.requests())
        tok0 = user_tokens["user0"]
        ref_get = hit_path(lambda: azure_tokens.get_database_access_token(ref_params, tok0))
        fleet = fleet_rows(idp, ref_params)

        # --- report ----------------------------------------------------------------------
        for label in ("1 user", "16 users"):
            n_users = 1 if label == "1 user" else 16
            o_lat, o_calls = ours[label]
            r_lat, r_calls, r_log = ref[label]
            discovery = sum(1 for r in r_log if r.method == "GET")
            rows.append(
                (
                    f"cold start, {THREADS} threads, {label}: IdP token calls",
                    f"{o_calls:>8} (target {n_users})",
                    f"{r_calls:>8} (+{discovery} discovery GETs)",
                )
            )
            rows.append(
                (
                    f"cold start, {THREADS} threads, {label}: p50 / p99 ms",
                    fmt_ms(o_lat),
                    fmt_ms(r_lat),
                )
            )
        hit = "hit path get_token / plugin: p50 / p99 ns"
        rows.append((hit, fmt_ns(ours_get), fmt_ns(ref_get)))
        rows.append(("hit path cached_token (per operation): p50/p99 ns", fmt_ns(ours_peek), "-"))
        rows.append(("hit path TokenCache.peek(key): p50 / p99 ns", fmt_ns(ours_raw), "-"))
    finally:
        idp.stop()

    width = max(len(r[0]) for r in rows + l1_rows)
    print(f"python {sys.version.split()[0]}, local IdP over HTTPS, flow on_behalf_of")
    print(f"{'':{width}}  {'deepsec':>24}  {'python-oracledb plugin':>30}")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>24}  {b:>30}")
    if l1_rows:
        print(f"\n{'':{width}}  {'L1 only':>24}  {'L1 + L2 (Redis)':>30}")
        for name, a, b in l1_rows:
            print(f"{name:{width}}  {a:>24}  {b:>30}")
    if fleet:
        fw = max(len(r[0]) for r in fleet)
        print(f"\n{'':{fw}}  {'':24}  {'IdP calls/round':>16}  {'p50 / p99 ms':>20}")
        for label, mode, calls, lat in fleet:
            print(f"{label:{fw}}  {mode:24}  {calls:>16}  {lat:>20}")
        print(
            f"(target for L1 + L2: {FLEET_USERS} calls per round, one per user for the fleet; "
            f"{FLEET_ROUNDS} rounds per mode, interleaved, each with new users)"
        )
    print(
        "\nmedians of "
        f"{HIT_BATCHES} batches x {BATCH} calls; python-oracledb's plugin builds a new MSAL app "
        "(with an OpenID discovery GET) on every cache miss and has no single-flight."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

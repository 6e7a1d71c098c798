"""Built security contexts are shared between connections, and never wrongly.

Every pool acquire is a new Connection object, so the hook reuses built
contexts (keyed by config, identity, data roles, attributes and the
on-behalf-of decision; the token is checked on reuse).  These tests judge on
the wire that reuse never carries a stale or foreign context, and count
``create_end_user_security_context`` calls to show the reuse happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import oracledb
import pytest

import deepsec
import spi_static
from deepsec import _contexts
from deepsec.testing.oracle import decode_jwt_claims
from deepsec.tokens import token_source_for
from hook_support import USERNAME_SQL, fresh_hook_state, params, user_token


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    yield from fresh_hook_state()


@pytest.fixture
def builds(monkeypatch):
    """Counts the security contexts the hook builds (the real driver function runs)."""
    real = oracledb.create_end_user_security_context
    calls: list[object] = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("end_user_identity"))
        return real(*args, **kwargs)

    monkeypatch.setattr(oracledb, "create_end_user_security_context", counting)
    return calls


def run(pool, tag: str) -> str | None:
    with pool.acquire() as conn, conn.cursor() as cur:
        cur.execute(f"{USERNAME_SQL} /* {tag} */")
        return cur.fetchone()[0]


@pytest.mark.timeout(60)
def test_two_users_alternating_on_one_pooled_connection(oracle, builds):
    pool = oracledb.create_pool(**oracle.connect_kwargs(), extra_auth_params=params(), min=1, max=1)
    try:
        tokens = {"alice": user_token("alice"), "bob": user_token("bob")}
        for i in range(20):
            name = "alice" if i % 2 == 0 else "bob"
            # A new string object per request, as a header parser makes.
            header = f"Bearer {tokens[name]}"
            with deepsec.end_user(header[7:]):
                assert run(pool, f"alt-{i}-{name}") == name
    finally:
        pool.close(force=True)
    for i in range(20):
        name = "alice" if i % 2 == 0 else "bob"
        (trip,) = oracle.find_statements(f"alt-{i}-{name} ")
        assert trip.context is not None and trip.context.username == name
    assert len(builds) == 2  # one build per user, then reused across acquires
    assert len(spi_static.CALLS) == 2


@pytest.mark.timeout(60)
def test_a_new_token_builds_a_new_context(oracle, builds):
    pool = oracledb.create_pool(**oracle.connect_kwargs(), extra_auth_params=params(), min=1, max=1)
    ctx = deepsec.EndUserContext(user_token("cara"))
    try:
        with deepsec.end_user(ctx.identity):
            run(pool, "tok-1")
            run(pool, "tok-2")
            # The token is replaced in the token cache (a refresh, or the
            # database rejected it): within the hook's 1 s re-check bound the
            # next request carries the new one.
            config = deepsec.parse_end_user_sec_params(params()["end_user_sec_params"])
            token_source_for(config).invalidate(ctx)
            time.sleep(1.1)
            run(pool, "tok-3")
    finally:
        pool.close(force=True)
    first, second, third = (
        oracle.find_statements(f"/* {t} */")[0].context for t in ("tok-1", "tok-2", "tok-3")
    )
    assert first.database_access_token == second.database_access_token
    assert third.database_access_token != first.database_access_token
    assert decode_jwt_claims(third.database_access_token)["n"] == 2
    assert third.username == "cara"
    assert len(builds) == 2


@pytest.mark.timeout(60)
def test_roles_and_attributes_changes_rebuild(oracle, builds):
    pool = oracledb.create_pool(
        **oracle.connect_kwargs(),
        extra_auth_params=params(data_roles=["CONFIG_ROLE"]),
        min=1,
        max=1,
    )
    token = user_token("dev")
    cases = [
        ("r-config", {}),
        ("r-a", {"data_roles": ["ROLE_A"]}),
        ("r-b", {"data_roles": ["ROLE_B"]}),
        ("r-a-again", {"data_roles": ["ROLE_A"]}),
        ("at-1", {"attributes": {"region": "EU", "level": [1, 2]}}),
        ("at-2", {"attributes": {"region": "US", "level": [1, 2]}}),
        ("at-1-reordered", {"attributes": {"level": [1, 2], "region": "EU"}}),
    ]
    try:
        for tag, extra in cases:
            with deepsec.end_user(token, **extra):
                run(pool, tag)
    finally:
        pool.close(force=True)
    wire = {tag: oracle.find_statements(f"/* {tag} */")[0].context for tag, _ in cases}
    assert wire["r-config"].data_roles == ("CONFIG_ROLE",)
    assert wire["r-a"].data_roles == ("ROLE_A",) and wire["r-a-again"].data_roles == ("ROLE_A",)
    assert wire["r-b"].data_roles == ("ROLE_B",)
    assert wire["at-1"].attributes["region"] in ("EU", ["EU"])
    assert wire["at-2"].attributes != wire["at-1"].attributes
    assert wire["at-1-reordered"].attributes == wire["at-1"].attributes
    # config roles, A, B, attributes EU, attributes US: the repeats were reused
    assert len(builds) == 5


@pytest.mark.timeout(60)
def test_two_configs_never_share_a_context(oracle):
    """Same end user, two pools with different configured data roles."""
    one = oracledb.create_pool(
        **oracle.connect_kwargs(), extra_auth_params=params(data_roles=["ONE"]), min=1, max=1
    )
    two = oracledb.create_pool(
        **oracle.connect_kwargs(), extra_auth_params=params(data_roles=["TWO"]), min=1, max=1
    )
    try:
        with deepsec.end_user(user_token("eve")):
            for i in range(3):
                run(one, f"cfg-one-{i}")
                run(two, f"cfg-two-{i}")
    finally:
        one.close(force=True)
        two.close(force=True)
    for i in range(3):
        assert oracle.find_statements(f"cfg-one-{i} ")[0].context.data_roles == ("ONE",)
        assert oracle.find_statements(f"cfg-two-{i} ")[0].context.data_roles == ("TWO",)


@pytest.mark.timeout(60)
def test_async_acquire_with_the_token_cached_fetches_nothing(oracle, builds):
    async def main() -> list[str | None]:
        pool = oracledb.create_pool_async(
            **oracle.connect_kwargs(), extra_auth_params=params(), min=1, max=1
        )
        seen = []
        try:
            for i in range(6):
                name = "finn" if i % 2 else "gail"
                async with deepsec.end_user(user_token(name)), pool.acquire() as conn:
                    cur = conn.cursor()
                    await cur.execute(f"{USERNAME_SQL} /* async-{i} */")
                    seen.append((await cur.fetchone())[0])
        finally:
            await pool.close()
        return seen

    assert asyncio.run(main()) == ["gail", "finn"] * 3
    assert len(spi_static.CALLS) == 2 and len(builds) == 2
    for i in range(6):
        assert oracle.find_statements(f"async-{i} ")[0].context.username == (
            "finn" if i % 2 else "gail"
        )


@pytest.mark.timeout(30)
def test_prepared_contexts_are_bounded(oracle, monkeypatch):
    monkeypatch.setattr(_contexts, "_PREPARED_KEPT", 5)
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=params()) as conn:
        for i in range(12):
            with deepsec.end_user((f"user{i}", None)), conn.cursor() as cur:
                cur.execute(f"{USERNAME_SQL} /* bound-{i} */")
                assert cur.fetchone()[0] == f"user{i}"
    assert len(_contexts.prepared) <= 5
    _assert_identity_index_mirrors_prepared()


@pytest.mark.timeout(30)
def test_attributes_true_then_one_on_one_connection_attach_again(oracle):
    """True == 1 in Python, but the database must see exactly what was asked."""
    token = user_token("tess")
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=params()) as conn:
        for i, value in enumerate([True, 1, True, "1", {"a": [True]}, {"a": [1]}]):
            with deepsec.end_user(token, attributes={"clearance": value}), conn.cursor() as cur:
                cur.execute(f"select 1 from dual /* typed-{i} */")
                (seen,) = oracle.find_statements(f"/* typed-{i} */")
                got = seen.context.attributes["clearance"]
                assert got == value and type(got) is type(value), (value, got)
                if isinstance(value, dict):
                    assert type(got["a"][0]) is type(value["a"][0])


@pytest.mark.timeout(30)
def test_prepared_contexts_are_bounded_in_bytes(oracle, monkeypatch):
    """Long identities fill a byte budget, not only a count (65,535 chars each)."""
    monkeypatch.setattr(_contexts, "_PREPARED_BYTES", 40_000)
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=params()) as conn:
        for i in range(12):
            padding = "x" * 3000
            with deepsec.end_user(user_token(f"big{i}") + padding), conn.cursor() as cur:
                cur.execute(f"select 1 from dual /* bytes-{i} */")
        assert 0 < len(_contexts.prepared) < 12
        assert _contexts._total_cost <= 40_000
        assert _contexts._total_cost == sum(_contexts._costs.values())
        # An identity larger than one entry may be is served but never kept.
        huge = user_token("huge") + "y" * 60_000
        with deepsec.end_user(huge), conn.cursor() as cur:
            cur.execute("select 1 from dual /* bytes-huge */")
        assert oracle.find_statements("bytes-huge")[0].context is not None
        assert all(key[1] != huge for key in _contexts.prepared)
        _assert_identity_index_mirrors_prepared()
        assert all(huge not in index for index in _contexts._by_identity.values())


def _assert_identity_index_mirrors_prepared() -> None:
    """The hook's by-identity index holds exactly the plain entries of ``prepared``."""
    plain = {
        (key[0], key[1]): entry
        for key, entry in _contexts.prepared.items()
        if key[2] is None and key[3] is None and key[4] is False
    }
    indexed = {
        (fingerprint, identity): entry
        for fingerprint, index in _contexts._by_identity.items()
        for identity, entry in index.items()
    }
    assert indexed == plain


@pytest.mark.timeout(30)
def test_the_identity_index_follows_the_prepared_contexts(oracle):
    """Built, reused, rebuilt with roles, forgotten: the index never holds an entry
    ``prepared`` does not, so it can never serve a context the full key would not."""
    config = deepsec.parse_end_user_sec_params(params()["end_user_sec_params"])
    index = _contexts.identity_index(config)
    assert index is not None
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=params()) as conn:
        for name, extra in (("ivy", {}), ("ivy", {"data_roles": ["R"]}), ("jon", {})):
            with deepsec.end_user(user_token(name), **extra), conn.cursor() as cur:
                cur.execute(f"{USERNAME_SQL} /* index-{name} */")
                assert cur.fetchone()[0] == name
        assert sorted(decode_jwt_claims(i)["preferred_username"] for i in index) == ["ivy", "jon"]
        _assert_identity_index_mirrors_prepared()
        deepsec.hook.forget_security_contexts()
        assert index == {} and _contexts.identity_index(config) is index
        with deepsec.end_user(user_token("ivy")), conn.cursor() as cur:
            cur.execute(f"{USERNAME_SQL} /* index-again */")
            assert cur.fetchone()[0] == "ivy"
        _assert_identity_index_mirrors_prepared()
    obo = params(auth_flow="on_behalf_of")["end_user_sec_params"]
    assert _contexts.identity_index(deepsec.parse_end_user_sec_params(obo)) is None

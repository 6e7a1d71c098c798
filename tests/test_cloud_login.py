"""Cloud-token *login* (python-oracledb's plugins) and deepsec's end-user context together.

The application's own database login uses python-oracledb's ``azure_tokens``
or ``oci_tokens`` plugin (``extra_auth_params["auth_type"]``: the plugin sets
``access_token``), while deepsec's hook (``end_user_sec_params`` beside it:
deepsec sets ``on_connect_callback``) attaches each statement's end user.

The plugins talk only to the real cloud hosts, so a :class:`CloudProxy`
tunnels ``login.microsoftonline.com`` and ``auth.us-ashburn-1.oraclecloud.com``
(and nothing else) to a :class:`LocalIdP` whose certificate covers those
names; ``HTTPS_PROXY``/``NO_PROXY``/``REQUESTS_CA_BUNDLE`` are set per test
with ``monkeypatch``.  Neither MSAL, the OCI SDK, requests nor python-oracledb
is patched.  The wire test server shows the token login (the token the IdP
issued to the login client) and the end user of every statement.
"""

from __future__ import annotations

import hashlib
import importlib
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import oracledb
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import deepsec
import spi_static
from deepsec.compat import plugin_auth_type
from deepsec.hook import _registered_hooks, params_hook
from deepsec.testing.cloud import (
    AZURE_LOGIN_HOST,
    CLEARED_VARS,
    CloudProxy,
    cloud_environ,
    oci_auth_host,
)
from deepsec.testing.idp import OCI_SCOPED_TOKEN_PATH, LocalIdP
from deepsec.testing.pytest_plugin import reset_token_state

pytestmark = pytest.mark.timeout(30)

USERNAME_SQL = "select xs_sys_context('xs$session','username') from dual"
REGION = "us-ashburn-1"
OCI_HOST = oci_auth_host(REGION)
TENANT = "cloud-tenant"
LOGIN_CLIENT, LOGIN_SECRET = "db-login-app", "login-secret"  # the app's database login
DEEPSEC_CLIENT, DEEPSEC_SECRET = "deepsec-app", "deepsec-secret"  # end_user_sec_params
DB_SCOPE = "https://oracle-db.example/.default"
TENANCY = "ocid1.tenancy.oc1..aaaaaaaacloudlogintenancy"
OCI_USER = "ocid1.user.oc1..aaaaaaaacloudloginuser"
PLUGINS = ("oracledb.plugins.azure_tokens", "oracledb.plugins.oci_tokens")


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_idp() -> Iterator[LocalIdP]:
    """A provider of its own whose certificate also names the cloud hosts."""
    provider = LocalIdP(
        tenant=TENANT,
        clients={LOGIN_CLIENT: LOGIN_SECRET, DEEPSEC_CLIENT: DEEPSEC_SECRET},
        extra_hostnames=[AZURE_LOGIN_HOST, OCI_HOST],
    ).start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def proxy(cloud_idp: LocalIdP) -> Iterator[CloudProxy]:
    with CloudProxy.for_idp(cloud_idp) as p:
        yield p


@pytest.fixture(scope="module")
def plugins() -> Iterator[dict[str, ModuleType]]:
    """python-oracledb's cloud plugins, their hooks registered after deepsec's.

    Hooks this fixture registered (by importing the plugins) are unregistered
    afterwards, so the rest of the suite runs without them.
    """
    deepsec.install()
    modules: dict[str, ModuleType] = {}
    ours: list[Callable[..., Any]] = []
    for name in PLUGINS:
        before = list(_registered_hooks())
        module = importlib.import_module(name)
        hook = _plugin_hook(module)
        if hook not in _registered_hooks():
            oracledb.register_params_hook(hook)
        if hook not in before:
            ours.append(hook)
        modules[name.rsplit(".", 1)[1]] = module
    try:
        yield modules
    finally:
        for hook in ours:
            while hook in _registered_hooks():
                oracledb.unregister_params_hook(hook)


def _plugin_hook(module: ModuleType) -> Callable[..., Any]:
    hook: Callable[..., Any] = getattr(
        module, "azure_token_hook" if module.__name__.endswith("azure_tokens") else "oci_token_hook"
    )
    return hook


@dataclass
class Cloud:
    idp: LocalIdP
    proxy: CloudProxy
    azure: ModuleType
    oci: ModuleType
    oci_sdk: ModuleType


@pytest.fixture
def cloud(
    cloud_idp: LocalIdP,
    proxy: CloudProxy,
    plugins: dict[str, ModuleType],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cloud]:
    """The environment routed through the proxy for this test only (monkeypatch restores it)."""
    deepsec.install()
    cloud_idp.reset()
    cloud_idp.oci_api_keys.clear()
    proxy.clear()
    reset_token_state()
    oracledb.clear_all_secrets()
    for name in CLEARED_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in cloud_environ(proxy, cloud_idp.ca_file).items():
        monkeypatch.setenv(name, value)
    try:
        yield Cloud(
            cloud_idp,
            proxy,
            plugins["azure_tokens"],
            plugins["oci_tokens"],
            importlib.import_module("oci"),
        )
    finally:
        reset_token_state()
        oracledb.clear_all_secrets()
        cloud_idp.oci_api_keys.clear()


@pytest.fixture(autouse=True)
def _spi_static_reset() -> Iterator[None]:
    spi_static.reset()
    yield
    spi_static.reset()


# -- helpers -------------------------------------------------------------------------


def azure_login_params(cloud: Cloud, end_user_sec_params: dict[str, Any]) -> dict[str, Any]:
    """``extra_auth_params``: azure_tokens login plus deepsec's end-user context."""
    return {
        "auth_type": plugin_auth_type(cloud.azure.AuthType, "AzureServicePrincipal"),
        "authority": f"https://{AZURE_LOGIN_HOST}/{TENANT}",
        "client_id": LOGIN_CLIENT,
        "client_credential": LOGIN_SECRET,
        "scopes": DB_SCOPE,
        "end_user_sec_params": end_user_sec_params,
    }


def deepsec_params(idp: LocalIdP) -> dict[str, Any]:
    """deepsec's ``end_user_sec_params`` against the local IdP (direct, not proxied)."""
    return idp.azure_params(client_id=DEEPSEC_CLIENT, client_credential=DEEPSEC_SECRET)


def run(conn: oracledb.Connection, tag: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute(f"{USERNAME_SQL} /* {tag} */")
        row = cur.fetchone()
    return None if row is None else row[0]


def login_tokens(idp: LocalIdP) -> int:
    """Token requests of the login client (through the proxy)."""
    return sum(1 for r in idp.requests() if r.client_id == LOGIN_CLIENT and r.method == "POST")


def deepsec_tokens(idp: LocalIdP) -> int:
    return sum(1 for r in idp.requests() if r.client_id == DEEPSEC_CLIENT and r.method == "POST")


def assert_token_login(oracle: Any, idp: LocalIdP, conn_id: int) -> dict[str, Any]:
    """The connection logged in with a token the IdP issued to the login client."""
    record = oracle.connection(conn_id)
    assert record.method == "token" and record.logged_in
    assert record.access_token in idp.issued_tokens()
    claims = idp.decode(record.access_token)
    assert claims["sub"] == LOGIN_CLIENT and claims["aud"] == "https://oracle-db.example"
    return claims


def assert_statement(oracle: Any, idp: LocalIdP, tag: str, user: str | None, token: str) -> None:
    """The one statement tagged ``tag`` ran as ``user`` (``None``: no end user)."""
    (trip,) = oracle.find_statements(f"/* {tag} */")
    if user is None:
        assert trip.context is None, tag
        return
    assert trip.context is not None, tag
    assert trip.context.username == f"{user}@example.test", tag
    assert trip.context.end_user_token == token, tag
    assert idp.decode(trip.context.database_access_token)["sub"] == DEEPSEC_CLIENT, tag


@pytest.fixture(params=["deepsec_first", "plugin_first"])
def hook_order(request: pytest.FixtureRequest, plugins: dict[str, ModuleType]) -> Iterator[str]:
    """Registration order of deepsec's and the plugins' hooks (restored afterwards)."""
    hooks = [_plugin_hook(m) for m in plugins.values()]

    def arrange(plugin_first: bool) -> None:
        deepsec.uninstall()
        for hook in hooks:
            while hook in _registered_hooks():
                oracledb.unregister_params_hook(hook)
        if not plugin_first:
            deepsec.install()
        for hook in hooks:
            oracledb.register_params_hook(hook)
        if plugin_first:
            deepsec.install()

    arrange(request.param == "plugin_first")
    order = [h for h in _registered_hooks() if h in hooks or h is params_hook]
    assert (order[0] is params_hook) == (request.param == "deepsec_first")
    try:
        yield request.param
    finally:
        arrange(False)


# -- 1. azure_tokens login + deepsec end users on one connection ------------------


def test_azure_login_and_end_user_contexts_on_one_connection(
    cloud: Cloud, oracle: Any, hook_order: str
) -> None:
    idp = cloud.idp
    alice, bob = idp.issue_user_token("alice"), idp.issue_user_token("bob")
    conn = oracledb.connect(
        dsn=oracle.dsn,
        ssl_context=oracle.client_ssl_context(),
        extra_auth_params=azure_login_params(cloud, deepsec_params(idp)),
    )
    try:
        with deepsec.end_user(alice):
            assert run(conn, "c1-alice") == "alice@example.test"
        with deepsec.end_user(bob):
            assert run(conn, "c1-bob") == "bob@example.test"
        assert run(conn, "c1-none") is None
        with deepsec.end_user(alice):
            assert run(conn, "c1-alice-again") == "alice@example.test"
        session_id = conn.session_id
    finally:
        conn.close()

    # the login: python-oracledb's azure_tokens plugin, via MSAL, via the proxy
    assert_token_login(oracle, idp, session_id)
    assert login_tokens(idp) == 1
    # MSAL's discovery GET and token POST went to login.microsoftonline.com (the
    # proxy tunnelled them; the IdP closes every connection); deepsec's own
    # MSAL app talks to 127.0.0.1 directly (its session ignores the environment)
    assert cloud.proxy.tunnelled_hosts() == [AZURE_LOGIN_HOST, AZURE_LOGIN_HOST]
    assert cloud.proxy.refused() == []
    # the end users: deepsec's hook, on the same connection, per statement
    assert_statement(oracle, idp, "c1-alice", "alice", alice)
    assert_statement(oracle, idp, "c1-bob", "bob", bob)
    assert_statement(oracle, idp, "c1-none", None, "")
    assert_statement(oracle, idp, "c1-alice-again", "alice", alice)
    assert deepsec_tokens(idp) == 1  # deepsec's own client_credentials token, cached


# -- 2. the same through a pool, from threads -------------------------------------


def test_azure_login_and_end_users_through_a_pool_from_threads(cloud: Cloud, oracle: Any) -> None:
    idp = cloud.idp
    users = {name: idp.issue_user_token(name) for name in ("alice", "bob", "carol")}
    plan: list[str | None] = [*users, None]
    earlier = {c.conn_id for c in oracle.connections()}  # an earlier test's, closing
    pool = oracledb.create_pool(
        dsn=oracle.dsn,
        ssl_context=oracle.client_ssl_context(),
        extra_auth_params=azure_login_params(cloud, deepsec_params(idp)),
        min=0,
        max=3,
        increment=1,
        homogeneous=True,
    )
    errors: list[BaseException] = []
    expected: dict[str, str | None] = {}
    lock = threading.Lock()

    def worker(t: int) -> None:
        try:
            for i in range(6):
                name = plan[(t + i) % len(plan)]
                tag = f"p-{t}-{i}"
                with lock:
                    expected[tag] = name
                with pool.acquire() as conn:
                    if name is None:
                        got = run(conn, tag)
                    else:
                        with deepsec.end_user(users[name]):
                            got = run(conn, tag)
                    assert got == (None if name is None else f"{name}@example.test"), tag
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(25)
    pool.close(force=True)
    assert not errors, errors[0]

    assert len(expected) == 36
    conn_ids = set()
    for tag, name in expected.items():
        assert_statement(oracle, idp, tag, name, users[name] if name else "")
        conn_ids.add(oracle.find_statements(f"/* {tag} */")[0].conn_id)
    # every pooled connection logged in with a token the plugin got for the app
    for conn_id in conn_ids:
        assert_token_login(oracle, idp, conn_id)
    logins = [c for c in oracle.connections() if c.logged_in and c.conn_id not in earlier]
    assert 1 <= len(logins) <= 3
    assert all(c.method == "token" for c in logins)
    assert login_tokens(idp) == len(logins)  # the plugin asks once per new connection
    assert deepsec_tokens(idp) == 1
    assert set(cloud.proxy.tunnelled_hosts()) == {AZURE_LOGIN_HOST}


# -- 3. oci_tokens login (proof of possession) + end user ----------------------------


def _oci_api_key(tmp_path: Path, idp: LocalIdP) -> dict[str, str]:
    """An OCI API key in ``tmp_path``, registered with the IdP; config values."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "oci_api_key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = ":".join(f"{b:02x}" for b in hashlib.md5(der, usedforsecurity=False).digest())
    idp.oci_api_keys[f"{TENANCY}/{OCI_USER}/{fingerprint}"] = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return {
        "user": OCI_USER,
        "key_file": str(key_file),
        "fingerprint": fingerprint,
        "tenancy": TENANCY,
        "region": REGION,
    }


def oci_login_params(cloud: Cloud, tmp_path: Path, auth_type: str) -> dict[str, Any]:
    config = _oci_api_key(tmp_path, cloud.idp)
    params: dict[str, Any] = {
        "auth_type": plugin_auth_type(cloud.oci.AuthType, auth_type),
        "end_user_sec_params": {"spi_type": "spi_static", "client_id": "hr-app"},
    }
    if auth_type == "ConfigFileAuthentication":
        config_file = tmp_path / "oci_config"
        config_file.write_text(
            "[DEEPSEC]\n" + "".join(f"{k}={v}\n" for k, v in config.items()), encoding="utf-8"
        )
        params.update(file_location=str(config_file), profile="DEEPSEC")
    else:
        params.update(config, profile="DEFAULT")
    return params


@pytest.mark.parametrize("auth_type", ["ConfigFileAuthentication", "SimpleAuthentication"])
def test_oci_login_with_proof_of_possession_and_end_users(
    cloud: Cloud, oracle: Any, tmp_path: Path, auth_type: str
) -> None:
    alice = spi_static.make_jwt({"preferred_username": "alice"})
    bob = spi_static.make_jwt({"preferred_username": "bob"})
    conn = oracledb.connect(
        dsn=oracle.dsn,
        ssl_context=oracle.client_ssl_context(),
        extra_auth_params=oci_login_params(cloud, tmp_path, auth_type),
    )
    try:
        with deepsec.end_user(alice):
            assert run(conn, "o-alice") == "alice"
        with deepsec.end_user(bob):
            assert run(conn, "o-bob") == "bob"
        assert run(conn, "o-none") is None
        session_id = conn.session_id
    finally:
        conn.close()

    # the data plane call: signed with the API key (the IdP verified it), via the proxy
    (call,) = [r for r in cloud.idp.requests() if r.endpoint == "oci_dataplane"]
    assert call.path == OCI_SCOPED_TOKEN_PATH and call.status == 200
    assert call.subject == OCI_USER and call.client_id and call.client_id.startswith(TENANCY)
    assert cloud.proxy.tunnelled_hosts() == [OCI_HOST]
    # the login: that token, with a proof of possession made with the plugin's key pair
    record = oracle.connection(session_id)
    assert record.method == "token"
    assert record.access_token in cloud.idp.issued_tokens()
    claims = cloud.idp.decode(record.access_token)
    assert claims["sub"] == OCI_USER and claims["tenant"] == TENANCY
    assert claims["scope"] == "urn:oracle:db::id::*"
    bound_key = jwt.algorithms.RSAAlgorithm.from_jwk(claims["jwk"])
    assert isinstance(bound_key, rsa.RSAPublicKey)
    bound_pem = bound_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert record.pop_header is not None and "(request-target):" in record.pop_header
    assert record.verify_proof_of_possession(bound_pem)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert not record.verify_proof_of_possession(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # the end users: deepsec's hook, per statement
    contexts = {t: oracle.find_statements(f"/* {t} */")[0].context for t in ("o-alice", "o-bob")}
    assert contexts["o-alice"].username == "alice" and contexts["o-alice"].end_user_token == alice
    assert contexts["o-bob"].username == "bob" and contexts["o-bob"].end_user_token == bob
    assert oracle.find_statements("/* o-none */")[0].context is None
    assert spi_static.CALLS == ["hr-app", "hr-app"]  # one per end user, not per statement


def test_oci_data_plane_rejects_a_request_signed_with_another_key(
    cloud: Cloud, oracle: Any, tmp_path: Path
) -> None:
    params = oci_login_params(cloud, tmp_path, "ConfigFileAuthentication")
    ((key_id, _),) = cloud.idp.oci_api_keys.items()
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    cloud.idp.oci_api_keys[key_id] = impostor.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    # the token callback's error reaches the caller unchanged
    with pytest.raises(cloud.oci_sdk.exceptions.ServiceError) as info:
        oracledb.connect(
            dsn=oracle.dsn, ssl_context=oracle.client_ssl_context(), extra_auth_params=params
        )
    assert info.value.status == 401 and info.value.code == "NotAuthenticated"
    assert [r.status for r in cloud.idp.requests() if r.endpoint == "oci_dataplane"] == [401]
    assert not any(c.logged_in for c in oracle.connections())


# -- 4. the proxy lets nothing else out -------------------------------------------------


def _raw_proxy_request(proxy: CloudProxy, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply


def test_proxy_refuses_hosts_that_are_not_allow_listed(cloud: Cloud) -> None:
    proxy = cloud.proxy
    # requests (as MSAL and the OCI SDK use it) through the routed environment
    with pytest.raises(requests.exceptions.ProxyError, match="403"):
        requests.get("https://management.azure.com/", timeout=5)
    # raw requests: another host, an allowed host on another port, plain HTTP proxying
    for request in (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"CONNECT login.microsoftonline.com:80 HTTP/1.1\r\n\r\n",
        b"GET http://login.microsoftonline.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"garbage\r\n\r\n",
    ):
        assert _raw_proxy_request(proxy, request).startswith(b"HTTP/1.1 403 "), request
    refused = proxy.refused()
    assert [(r.host, r.port) for r in refused] == [
        ("management.azure.com", 443),
        ("example.com", 443),
        ("login.microsoftonline.com", 80),
        ("", 0),
        ("", 0),
    ]
    assert proxy.tunnelled_hosts() == []
    # an allow-listed host is tunnelled to the IdP (and its certificate names it)
    reply = requests.get(
        f"https://{AZURE_LOGIN_HOST}/{TENANT}/v2.0/.well-known/openid-configuration", timeout=5
    )
    assert reply.json()["token_endpoint"] == (
        f"https://{AZURE_LOGIN_HOST}/{TENANT}/oauth2/v2.0/token"
    )
    assert proxy.tunnelled_hosts() == [AZURE_LOGIN_HOST]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the plugins work with str on 3.12+")
def test_plain_string_auth_type_fails_before_python_312(cloud: Cloud, oracle: Any) -> None:
    """Why plugin_auth_type exists: ``"x" in AuthType`` raises TypeError before 3.12."""
    params = azure_login_params(cloud, {"spi_type": "spi_static"})
    params["auth_type"] = "AzureServicePrincipal"
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(oracledb.ProgrammingError, match="DPY-2061"),
    ):
        oracledb.connect(
            dsn=oracle.dsn, ssl_context=oracle.client_ssl_context(), extra_auth_params=params
        )
    assert cloud.idp.requests() == []

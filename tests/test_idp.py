"""The local identity provider itself (deepsec.testing.idp)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import requests

from concurrency_support import run_threads
from deepsec.testing.idp import JWT_BEARER, LocalIdP
from deepsec.testing.tls import TestCA


def session(idp: LocalIdP) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = idp.ca_file
    return s


def test_discovery_and_jwks(idp: LocalIdP) -> None:
    s = session(idp)
    for path in ("/v2.0/.well-known/openid-configuration", "/.well-known/openid-configuration"):
        config = s.get(idp.authority + path, timeout=2).json()
        assert config["issuer"] == idp.issuer
        assert config["token_endpoint"] == idp.token_url
    b2c = s.get(idp.b2c_authority + "/v2.0/.well-known/openid-configuration", timeout=2).json()
    assert b2c["token_endpoint"].startswith(idp.b2c_authority)
    jwks = s.get(config["jwks_uri"], timeout=2).json()
    key = jwt.PyJWKSet.from_dict(jwks).keys[0]
    user_token = idp.issue_user_token("alice", roles=["r1"])
    claims = jwt.decode(user_token, key.key, algorithms=["RS256"], audience="api://middle-tier")
    assert claims["preferred_username"] == "alice@example.test"
    assert claims["roles"] == ["r1"]
    assert {"sub", "oid", "tid", "exp", "iat", "iss"} <= set(claims)


def test_client_credentials_form_and_basic(idp: LocalIdP) -> None:
    s = session(idp)
    form = {"grant_type": "client_credentials", "scope": "api://db/.default"}
    r1 = s.post(
        idp.token_url,
        data={**form, "client_id": idp.client_id, "client_secret": idp.client_secret},
        timeout=2,
    )
    r2 = s.post(idp.token_url, data=form, auth=(idp.client_id, idp.client_secret), timeout=2)
    for r in (r1, r2):
        assert r.status_code == 200 and r.headers["Connection"] == "close"
        body = r.json()
        assert body["expires_in"] == 3600
        assert idp.decode(body["access_token"])["aud"] == "api://db"
    bad = s.post(idp.token_url, data=form, auth=(idp.client_id, "nope"), timeout=2)
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
    assert idp.token_requests("client_credentials") == 3


def test_obo_grant_verifies_the_assertion(idp: LocalIdP) -> None:
    s = session(idp)
    base = {
        "grant_type": JWT_BEARER,
        "requested_token_use": "on_behalf_of",
        "scope": "api://db/.default openid profile offline_access",
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
    }
    good = s.post(
        idp.token_url, data={**base, "assertion": idp.issue_user_token("bob")}, timeout=2
    ).json()
    at = idp.decode(good["access_token"])
    assert at["preferred_username"] == "bob@example.test" and at["scp"] == ".default"
    assert good["id_token"] and good["client_info"]
    forged = jwt.encode({"iss": idp.issuer, "sub": "x"}, "k" * 32, algorithm="HS256")
    bad = s.post(idp.token_url, data={**base, "assertion": forged}, timeout=2)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    expired = idp.issue_user_token("bob", expires_in=-5)
    assert s.post(idp.token_url, data={**base, "assertion": expired}, timeout=2).status_code == 400
    idp.obo_account_info = False
    bare = s.post(
        idp.token_url, data={**base, "assertion": idp.issue_user_token("bob")}, timeout=2
    ).json()
    assert "client_info" not in bare and "id_token" not in bare
    assert idp.token_requests("on_behalf_of") == 4
    assert next(r.subject for r in idp.requests() if r.grant_type == JWT_BEARER)


def test_oci_endpoint_needs_basic_auth(idp: LocalIdP) -> None:
    s = session(idp)
    form = {"grant_type": "client_credentials", "scope": "urn:oracle:db::id::*"}
    ok = s.post(idp.oci_token_url, data=form, auth=(idp.client_id, idp.client_secret), timeout=2)
    assert ok.status_code == 200 and idp.decode(ok.json()["access_token"])["sub"] == idp.client_id
    form_auth = {**form, "client_id": idp.client_id, "client_secret": idp.client_secret}
    assert s.post(idp.oci_token_url, data=form_auth, timeout=2).status_code == 401
    assert idp.token_requests(endpoint="oci") == 2


def test_expiry_and_claims_are_configurable(idp: LocalIdP) -> None:
    idp.expires_in = 7
    idp.extra_claims = {"tenant_region": "eu"}
    s = session(idp)
    body = s.post(
        idp.oci_token_url,
        data={"grant_type": "client_credentials", "scope": "s"},
        auth=(idp.client_id, idp.client_secret),
        timeout=2,
    ).json()
    claims = idp.decode(body["access_token"])
    assert body["expires_in"] == 7 and claims["exp"] - claims["iat"] == 7
    assert claims["tenant_region"] == "eu"
    idp.reset()
    assert idp.expires_in == 3600 and idp.extra_claims == {} and idp.token_requests() == 0


def test_faults_one_shot_persistent_and_targeted(idp: LocalIdP) -> None:
    s = session(idp)
    form = {"grant_type": "client_credentials", "scope": "s"}

    def post() -> requests.Response:
        return s.post(
            idp.oci_token_url, data=form, auth=(idp.client_id, idp.client_secret), timeout=2
        )

    idp.faults.status(503, retry_after=2)
    r = post()
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert r.json()["error"] == "temporarily_unavailable"
    assert post().status_code == 200  # one-shot

    idp.faults.status(500, times=2)
    assert [post().status_code for _ in range(3)] == [500, 500, 200]

    idp.faults.malformed_json()
    with pytest.raises(ValueError):
        post().json()

    idp.faults.drop()
    with pytest.raises(requests.ConnectionError):
        post()

    idp.faults.delay(0.3)
    started = time.perf_counter()
    assert post().status_code == 200
    assert time.perf_counter() - started >= 0.3

    idp.faults.status(400, target="azure", times=None)
    assert post().status_code == 200  # OCI endpoint untouched
    assert len(idp.faults) == 1
    idp.faults.clear()

    idp.faults.down()
    for _ in range(3):
        with pytest.raises(requests.ConnectionError):
            post()
    idp.faults.clear()
    assert post().status_code == 200


def test_request_counter_is_thread_safe(idp: LocalIdP) -> None:
    idp.clients["counter-client"] = "counter-secret"

    def worker() -> None:
        s = session(idp)
        for _ in range(5):
            s.post(
                idp.oci_token_url,
                data={"grant_type": "client_credentials", "scope": "s"},
                auth=("counter-client", "counter-secret"),
                timeout=5,
            )

    try:
        run_threads(worker, count=16)
    finally:
        del idp.clients["counter-client"]
    mine = [r for r in idp.requests() if r.client_id == "counter-client"]
    assert len(mine) == 80 and all(r.status == 200 for r in mine)
    assert idp.token_requests(endpoint="oci") >= 80


def test_stopped_provider_is_down() -> None:
    with TestCA() as ca:
        provider = LocalIdP(ca=ca).start()
        s = session(provider)
        url = provider.authority + "/.well-known/openid-configuration"
        assert s.get(url, timeout=2).ok
        provider.stop()
        with pytest.raises(requests.ConnectionError):
            s.get(url, timeout=2)


def test_client_info_is_base64url_json(idp: LocalIdP) -> None:
    s = session(idp)
    body = s.post(
        idp.token_url,
        data={
            "grant_type": JWT_BEARER,
            "requested_token_use": "on_behalf_of",
            "scope": "api://db/.default openid",
            "assertion": idp.issue_user_token("zed", oid="oid-zed"),
        },
        auth=(idp.client_id, idp.client_secret),
        timeout=2,
    ).json()
    raw = body["client_info"] + "=" * (-len(body["client_info"]) % 4)
    assert json.loads(base64.urlsafe_b64decode(raw)) == {"uid": "oid-zed", "utid": idp.tenant}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli(tmp_path: Path) -> None:
    port = _free_port()
    ca_file = f"{tmp_path}/idp-ca.pem"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepsec.testing.idp", "--port", str(port), "--ca-file", ca_file],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in first
        r = requests.get(
            f"https://127.0.0.1:{port}/test-tenant/v2.0/.well-known/openid-configuration",
            verify=ca_file,
            timeout=5,
        )
        assert r.json()["token_endpoint"].endswith("/oauth2/v2.0/token")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_dev_signin_endpoint_issues_a_signed_user_token(idp: LocalIdP) -> None:
    """The documented development shortcut the demo and examples sign in with."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=idp.ca_file)
    with urllib.request.urlopen(f"{idp.dev_signin_url}?user=alice", context=context) as reply:
        body = json.load(reply)
    assert body["user"] == "alice"
    assert idp.decode(body["access_token"])["preferred_username"] == "alice@example.test"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{idp.dev_signin_url}?user=Robert%27);--", context=context)
    assert info.value.code == 400


# --- slow and throttling faults ----------------------------------------------------------


def _raw_token_request(idp: LocalIdP) -> socket.socket:
    """A TLS connection that has sent one OCI token request (read the answer yourself)."""
    import ssl

    ctx = ssl.create_default_context(cafile=idp.ca_file)
    conn = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", idp.port)), server_hostname="127.0.0.1"
    )
    auth = base64.b64encode(f"{idp.client_id}:{idp.client_secret}".encode()).decode()
    body = "grant_type=client_credentials&scope=urn%3Aoracle%3Adb%3A%3Aid%3A%3A%2A"
    conn.sendall(
        (
            f"POST /oauth2/v1/token HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
    )
    return conn


def _read_for(conn: socket.socket, seconds: float) -> bytes:
    conn.settimeout(0.05)
    data = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return data


def test_drip_sends_one_byte_at_a_time_and_stops_on_reset(idp: LocalIdP) -> None:
    idp.faults.drip(0.1, target="oci")
    conn = _raw_token_request(idp)
    try:
        # Read for 1 s (a loaded machine may start the answer late): ~10
        # bytes, at most 1 s / 0.1 s + 1, never the whole answer.
        first = _read_for(conn, 1.0)
        assert first == b"HTTP/1.1 200 OK"[: len(first)]
        assert 2 <= len(first) <= 11
        idp.reset()  # ends the drip: the connection closes without the rest
        started = time.monotonic()
        rest = _read_for(conn, 5.0)
        assert time.monotonic() - started < 3.0 and len(rest) <= 2  # closed, not read out
    finally:
        conn.close()


def test_drip_after_headers_and_stall_send_the_headers_at_once(idp: LocalIdP) -> None:
    s = session(idp)
    auth = (idp.client_id, idp.client_secret)
    form = {"grant_type": "client_credentials", "scope": "urn:oracle:db::id::*"}
    idp.faults.stall(2.0, target="oci")  # long, so headers come well before its end
    started = time.monotonic()
    response = s.post(idp.oci_token_url, data=form, auth=auth, timeout=5, stream=True)
    assert response.status_code == 200 and time.monotonic() - started < 1.5
    assert response.json()["access_token"] and time.monotonic() - started >= 2.0
    idp.faults.drip(0.2, after_headers=True, target="oci")
    conn = _raw_token_request(idp)
    try:
        data = _read_for(conn, 1.0)  # ~5 body bytes; 1 s: the answer may start late
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length" in head
        assert 1 <= len(body) <= 6
    finally:
        conn.close()


def test_throttle_metadata_target_and_reply_expires_in(idp: LocalIdP) -> None:
    s = session(idp)
    discovery = idp.authority + "/v2.0/.well-known/openid-configuration"
    form = {
        "grant_type": "client_credentials",
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "scope": "api://oracle-db/.default",
    }
    idp.faults.throttle(60, status=429, target="metadata")
    assert s.post(idp.token_url, data=form, timeout=2).status_code == 200  # not a token fault
    answer = s.get(discovery, timeout=2)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "60"
    assert s.get(discovery, timeout=2).status_code == 200  # one-shot
    idp.faults.throttle(7)
    answer = s.post(idp.token_url, data=form, timeout=2)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "7"
    idp.reply_expires_in = float("nan")
    raw = s.post(idp.token_url, data=form, timeout=2).text
    assert '"expires_in": NaN' in raw
    claims = jwt.decode(json.loads(raw)["access_token"], options={"verify_signature": False})
    assert claims["exp"] > time.time()  # the token itself stays sane
    idp.reset()
    assert s.post(idp.token_url, data=form, timeout=2).json()["expires_in"] == idp.expires_in

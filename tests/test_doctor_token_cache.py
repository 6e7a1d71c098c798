"""``python -m deepsec doctor`` with ``token_cache``: Redis and key checked, no secret shown."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py

from deepsec.doctor import EXIT_CONFIG, EXIT_OK, main
from deepsec.testing.idp import LocalIdP
from deepsec.testing.redis import RedisTestServer, redis_server_binary

pytestmark = pytest.mark.timeout(60)


def run(tmp_path: Path, params: dict[str, object]) -> tuple[int, str]:
    path = tmp_path / "deepsec.json"
    path.write_text(json.dumps({"end_user_sec_params": params}))
    out = io.StringIO()
    return main(["--config", str(path)], stream=out), out.getvalue()


@pytest.fixture
def locked_redis() -> Iterator[RedisTestServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    server = RedisTestServer(password="pw-Secret-4242").start()
    try:
        yield server
    finally:
        server.stop()


def test_doctor_checks_redis_and_the_key(
    idp: LocalIdP, locked_redis: RedisTestServer, tmp_path: Path
) -> None:
    key = base64.urlsafe_b64encode(b"k" * 32).decode()
    params = idp.azure_params(token_cache=locked_redis.url, token_cache_key=key)
    code, text = run(tmp_path, params)
    assert code == EXIT_OK, text
    assert f"token_cache: redis://***@127.0.0.1:{locked_redis.port}/0" in text
    assert "key      : token_cache_key; key id " in text
    assert "redis    : OK" in text
    assert "pw-Secret-4242" not in text and key not in text and idp.client_secret not in text
    # The probe cleaned up after itself; the token acquired is shared, sealed.
    client = redis_py.Redis.from_url(locked_redis.url)
    try:
        keys = list(client.scan_iter("*"))
    finally:
        client.close()
    assert len(keys) == 1 and keys[0].startswith(b"deepsec:tok:v1:")


def _key_id(text: str) -> str:
    (line,) = [line for line in text.splitlines() if "key id" in line]
    return line


def test_doctor_key_id_is_equal_across_instances(
    idp: LocalIdP, redis: RedisTestServer, tmp_path: Path
) -> None:
    # Instances that differ only in how they reach Redis (host alias, URL
    # options: what a password rotation or a unix socket changes), timeout
    # or cache size share entries, and show one key id.
    alias = redis.url.replace("127.0.0.1", "localhost") + "?socket_keepalive=true"
    _, one = run(tmp_path, idp.azure_params(token_cache=redis.url))
    _, two = run(tmp_path, idp.azure_params(token_cache=alias, timeout=5.0, cache_size=50))
    assert _key_id(one) == _key_id(two)
    assert "derived from the client credential" in _key_id(one)
    # Instances that share nothing (other scopes: other tokens) show different ids.
    _, other = run(tmp_path, idp.azure_params(token_cache=redis.url, scopes="api://x/.default"))
    assert _key_id(other) != _key_id(one)


def test_doctor_reports_an_unreachable_redis(
    idp: LocalIdP, locked_redis: RedisTestServer, tmp_path: Path
) -> None:
    locked_redis.kill()
    code, text = run(tmp_path, idp.azure_params(token_cache=locked_redis.url))
    assert code == EXIT_CONFIG, text
    assert "redis    : FAILED: ConnectionError" in text
    assert "pw-Secret-4242" not in text


def test_doctor_reports_a_wrong_password(
    idp: LocalIdP, locked_redis: RedisTestServer, tmp_path: Path
) -> None:
    url = f"redis://:wrong-Pass-77@127.0.0.1:{locked_redis.port}/0"
    code, text = run(tmp_path, idp.azure_params(token_cache=url))
    assert code == EXIT_CONFIG, text
    assert "redis    : FAILED" in text and "wrong-Pass-77" not in text

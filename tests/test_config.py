"""``end_user_sec_params`` parsing: every key, every error, no secret shown."""

from __future__ import annotations

import logging

import pytest

from deepsec import ConfigError, parse_end_user_sec_params

SECRET = "client-secret-value-9f8e"

AZURE = {
    "spi_type": "azure_tokens",
    "auth_flow": "client_credentials",
    "authority": "https://login.example.test/tenant",
    "client_id": "app-id",
    "client_credential": SECRET,
    "scopes": "https://db.example.test/.default",
}


def test_reference_plugin_keys_are_accepted():
    config = parse_end_user_sec_params(AZURE)
    assert config.spi_type == "azure_tokens"
    assert config.scopes == ("https://db.example.test/.default",)
    assert config.client_credential == SECRET
    assert config.timeout == 10.0
    assert config.instance_discovery is True


def test_client_secret_alias_and_scope_list():
    params = {k: v for k, v in AZURE.items() if k != "client_credential"}
    config = parse_end_user_sec_params(
        {**params, "client_secret": SECRET, "scopes": ["a/.default", "b"]}
    )
    assert config.client_credential == SECRET
    assert config.scopes == ("a/.default", "b")


def test_certificate_credential():
    cert = {"private_key": "-----BEGIN PRIVATE KEY-----x", "thumbprint": "AB12"}
    config = parse_end_user_sec_params({**AZURE, "client_credential": cert})
    assert config.client_credential == cert
    assert "PRIVATE" not in repr(config)


def test_parsed_once_per_distinct_params():
    assert parse_end_user_sec_params(dict(AZURE)) is parse_end_user_sec_params(dict(AZURE))
    other = parse_end_user_sec_params({**AZURE, "client_id": "other"})
    assert other is not parse_end_user_sec_params(AZURE)
    assert other.fingerprint != parse_end_user_sec_params(AZURE).fingerprint


def test_every_problem_listed_in_one_error():
    bad = {
        "spi_type": "azure_tokens",
        "auth_flow": "implicit",
        "authority": "http://plain",
        "client_credential": 12345,
        "scopes": [],
        "data_roles": "hr",
        "timeout": -1,
        "surprise": True,
    }
    with pytest.raises(ConfigError) as info:
        parse_end_user_sec_params(bad)
    text = str(info.value)
    for fragment in (
        "missing required key(s) for azure_tokens: client_id",
        "unknown key(s) for spi_type 'azure_tokens': surprise",
        "auth_flow must be one of",
        "authority must be an https:// URL",
        "client_credential must be a non-empty string",
        "scopes must be",
        "data_roles must be a list",
        "timeout must be a positive number",
    ):
        assert fragment in text
    assert len(info.value.problems) == 8
    assert isinstance(info.value, ValueError)


def test_missing_spi_type_and_bad_module():
    with pytest.raises(ConfigError, match="spi_type is required"):
        parse_end_user_sec_params({"auth_flow": "client_credentials"})
    with pytest.raises(ConfigError, match="the module it names cannot be imported"):
        parse_end_user_sec_params({"spi_type": "no.such.module_xyz"})
    with pytest.raises(ConfigError, match="has no callable get_database_access_token"):
        parse_end_user_sec_params({"spi_type": "json"})
    with pytest.raises(ConfigError, match="must be a dict"):
        parse_end_user_sec_params(["spi_type"])  # type: ignore[arg-type]


def test_oci_rules():
    oci = {**AZURE, "spi_type": "oci_tokens", "authority": "https://idcs.test/oauth2/v1/token"}
    assert parse_end_user_sec_params(oci).spi_type == "oci_tokens"
    with pytest.raises(ConfigError, match="'oci_tokens' must be 'client_credentials'"):
        parse_end_user_sec_params({**oci, "auth_flow": "on_behalf_of"})
    with pytest.raises(ConfigError, match=r"unknown key.*instance_discovery"):
        parse_end_user_sec_params({**oci, "instance_discovery": False})
    with pytest.raises(ConfigError, match="client_credential must be a non-empty string, got"):
        parse_end_user_sec_params({**oci, "client_credential": {"private_key": 1}})


def test_custom_module_with_extra_keys():
    config = parse_end_user_sec_params({"spi_type": "spi_static", "lifetime": 5})
    assert config.module is not None and config.auth_flow == "client_credentials"
    assert config.raw_params() == {"spi_type": "spi_static", "lifetime": 5}
    with pytest.raises(ConfigError, match=r"unknown key.*bogus"):
        parse_end_user_sec_params({"spi_type": "spi_static", "bogus": 1})


def test_both_secret_spellings_rejected():
    with pytest.raises(ConfigError, match="not both"):
        parse_end_user_sec_params({**AZURE, "client_secret": SECRET})


def test_secrets_never_in_repr_errors_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    config = parse_end_user_sec_params(AZURE)
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert "client_credential='***'" in repr(config)
    for bad in (
        {**AZURE, "client_credential": [SECRET]},
        {**AZURE, "timeout": SECRET},
        {**AZURE, "bogus": SECRET},
        {**AZURE, "client_credential": {"thumbprint": SECRET}},
    ):
        with pytest.raises(ConfigError) as info:
            parse_end_user_sec_params(bad)
        assert SECRET not in str(info.value)
        assert SECRET not in repr(info.value)
    assert SECRET not in caplog.text


# Every key, known or not, given the secret as its value (or the secret as a
# key name, or inside a value): no ConfigError may show it.
_SECRET_PLACEMENTS: list[dict[str, object]] = [
    {**AZURE, "spi_type": SECRET},
    {**AZURE, "spi_type": f"pkg.{SECRET.replace('-', '_')}"},
    {**AZURE, "ca_file": SECRET},
    {**AZURE, "ca_file": f"/tmp/{SECRET}.pem"},
    {**AZURE, "auth_flow": SECRET},
    {**AZURE, "auth_flow": SECRET.replace("-", "_")},
    {**AZURE, "authority": SECRET},
    {**AZURE, "authority": [SECRET]},
    {**AZURE, "client_id": [SECRET]},
    {**AZURE, "scopes": [SECRET, 1]},
    {**AZURE, "timeout": SECRET},
    {**AZURE, "instance_discovery": SECRET},
    {**AZURE, "max_retries": SECRET},
    {**AZURE, "cache_size": SECRET},
    {**AZURE, "data_roles": SECRET},
    {**AZURE, "data_roles": [SECRET, ""]},
    {**AZURE, "attributes": {SECRET: object()}},
    {**AZURE, "attributes": {"x": {SECRET}}},
    {**AZURE, "client_credential": [SECRET]},
    {**AZURE, "client_credential": {"thumbprint": SECRET}},
    {**AZURE, "bogus": SECRET},
    {**AZURE, SECRET: "value"},
    {**AZURE, "client_secret": SECRET},
    {"spi_type": "oci_tokens", "client_credential": {"private_key": SECRET}},
    {"spi_type": "spi_static", "bogus": SECRET, "ca_file": SECRET},
]


@pytest.mark.parametrize("params", _SECRET_PLACEMENTS, ids=[f"placement{i}" for i in range(25)])
def test_no_config_error_ever_echoes_a_secret(params: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_end_user_sec_params(params)
    for text in (str(info.value), repr(info.value), *info.value.problems):
        assert SECRET not in text
        assert SECRET.replace("-", "_") not in text


def test_config_errors_still_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_end_user_sec_params({**AZURE, "ca_file": SECRET, "auth_flow": "client_credential"})
    text = str(info.value)
    assert "ca_file must be the path of a readable PEM file" in text
    assert "did you mean 'client_credentials'?" in text
    with pytest.raises(ConfigError, match=r"unknown key\(s\).*1 key\(s\) whose names are not"):
        parse_end_user_sec_params({**AZURE, "Not A Key!": 1})

"""What the doctor checks: the JSON ``--config`` file, or a Django ``--settings`` module."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..context import Identity
from .report import Target, UsageError

#: Top-level keys of a ``--config`` file that are not ``end_user_sec_params``.
CONFIG_FILE_KEYS = ("dsn", "DEEPSEC")


def _params_from_json(data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: expected a JSON object")
    if "extra_auth_params" in data:
        extra = data["extra_auth_params"]
        if not isinstance(extra, Mapping) or "end_user_sec_params" not in extra:
            raise UsageError(f"{where}: extra_auth_params has no end_user_sec_params")
        return extra["end_user_sec_params"]
    if "end_user_sec_params" in data:
        return data["end_user_sec_params"]
    if "spi_type" in data:
        # The parameters themselves, next to the file's own keys (not parameters).
        return {k: v for k, v in data.items() if k not in CONFIG_FILE_KEYS}
    raise UsageError(
        f"{where}: no end_user_sec_params, extra_auth_params or spi_type key at the top level"
    )


def _load_config_file(path: str) -> list[Target]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.__class__.__name__})") from None
    params = _params_from_json(data, path)
    web = data.get("DEEPSEC")
    target = Target(path, params, web if isinstance(web, Mapping) else None)
    dsn = data.get("dsn")
    if isinstance(dsn, str) and dsn:
        from ..dsn import dsn_tcps_problem

        found = dsn_tcps_problem(dsn, data, what="dsn")
        if found is not None and found.certain:
            target.errors.append(f"dsn: {found.message}")
        elif found is not None:
            target.problems.append(found.message)
    return [target]


def load_targets(settings: str | None, config: str | None, database: str | None) -> list[Target]:
    """The configurations named on the command line.

    Raises:
        UsageError: nothing usable to check.
    """
    if bool(settings) == bool(config):
        raise UsageError("give exactly one of --settings MODULE or --config FILE")
    if config:
        return _load_config_file(config)
    assert settings is not None
    from .settings import import_settings, targets_from_settings

    return targets_from_settings(import_settings(settings), settings, database)


def parse_identity(value: str | None) -> Identity | None:
    """The ``--identity`` argument: a token, or JSON ``["name", key|null]``."""
    if value is None:
        return None
    from ..web import MalformedIdentity, identity_from_cookie

    try:
        return identity_from_cookie(value, max_size=65535)
    except MalformedIdentity as exc:
        raise UsageError(f"--identity: {exc}") from None

"""A custom ``spi_type`` whose identity provider is always down (for tests)."""

from __future__ import annotations

from typing import Any

from deepsec import TokenAcquisitionError


def get_database_access_token(end_user_sec_params: dict[str, Any], identity: Any) -> str:
    raise TokenAcquisitionError("the identity provider is down", error="temporarily_unavailable")

"""oracledb-deepsec: the end user of each request, carried into Oracle Deep Data Security.

``import deepsec`` registers one python-oracledb params hook.  Connections and
pools whose ``extra_auth_params`` hold ``end_user_sec_params`` then run every
database operation under the end user of the request (thread or asyncio task)
that issued it, and under no end user once that request is over.
"""

from __future__ import annotations

from .config import EndUserSecConfig, parse_end_user_sec_params
from .context import (
    EndUserContext,
    Identity,
    as_application,
    current_end_user,
    end_user,
    get_end_user_attributes,
    get_end_user_data_roles,
    get_end_user_identity,
    set_end_user_attributes,
    set_end_user_data_roles,
    set_end_user_identity,
)
from .errors import (
    ConfigError,
    DeepSecError,
    IdentityError,
    IdentityNotAccepted,
    NoEndUserError,
    TokenAcquisitionError,
    TokenNotReadyError,
)
from .hook import install, installed, uninstall
from .prefetch import prepare

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeepSecError",
    "EndUserContext",
    "EndUserSecConfig",
    "Identity",
    "IdentityError",
    "IdentityNotAccepted",
    "NoEndUserError",
    "TokenAcquisitionError",
    "TokenNotReadyError",
    "__version__",
    "as_application",
    "current_end_user",
    "end_user",
    "get_end_user_attributes",
    "get_end_user_data_roles",
    "get_end_user_identity",
    "install",
    "installed",
    "parse_end_user_sec_params",
    "prepare",
    "set_end_user_attributes",
    "set_end_user_data_roles",
    "set_end_user_identity",
    "uninstall",
]

install()

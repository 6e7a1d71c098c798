"""Workarounds for python-oracledb behaviour deepsec users meet.

:func:`plugin_auth_type`: before Python 3.12, ``"x" in SomeEnum`` raises
``TypeError``, and python-oracledb 26.1's cloud-token plugins
(``oracledb.plugins.azure_tokens`` / ``oci_tokens``) evaluate
``auth_type.lower() in AuthType`` in their params hooks, so a plain string
``auth_type`` makes every connect fail with DPY-2061 on Python 3.10 and 3.11
once either plugin is imported.  Nothing is patched: the value passed is a
string that the plugin's own check accepts.
"""

from __future__ import annotations

import enum
import sys
from typing import Any

__all__ = ["plugin_auth_type"]


class _PluginAuthType(str):
    """A string ``auth_type`` whose ``lower()`` is the plugin's enum member."""

    member: enum.Enum

    def __new__(cls, value: str, member: enum.Enum) -> _PluginAuthType:
        obj = super().__new__(cls, value)
        obj.member = member
        return obj

    def lower(self) -> Any:
        """The plugin's ``AuthType`` member (an ``enum.Enum``, so ``in`` works)."""
        return self.member


def plugin_auth_type(auth_types: type[enum.Enum], name: str) -> str:
    """``name`` as an ``auth_type`` python-oracledb's cloud plugins accept here.

    On Python 3.12 and newer this is ``name`` itself.  Before 3.12 it is a
    ``str`` equal to ``name`` whose ``lower()`` is the member of
    ``auth_types`` (the plugin's ``AuthType``), for which ``in`` is defined:
    the owning plugin matches it, the other plugin's check is simply false.

    Example::

        from oracledb.plugins import azure_tokens
        from deepsec.compat import plugin_auth_type

        extra_auth_params = {
            "auth_type": plugin_auth_type(azure_tokens.AuthType, "AzureServicePrincipal"),
            ...,
            "end_user_sec_params": {...},
        }

    Args:
        auth_types: ``oracledb.plugins.azure_tokens.AuthType`` or
            ``oracledb.plugins.oci_tokens.AuthType``.
        name: the auth type, e.g. ``"AzureServicePrincipal"``.

    Raises:
        ValueError: ``name`` is not one of ``auth_types``.
    """
    member = auth_types(name.lower())
    if sys.version_info >= (3, 12):
        return name
    return _PluginAuthType(name, member)

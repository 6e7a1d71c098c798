"""The demo's HR data: the canned ``employees`` table and the emulated grant on it.

:func:`hr_row_policy` is what the wire test server applies to each row;
:func:`visible_employees` is what it should return for a user, which the
scenario and the example projects' tests check the app's pages against.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

#: Users the sign-in pages offer.
DEMO_USERS: tuple[str, ...] = ("alice", "bob", "carol")
#: Columns of the canned ``employees`` table.
EMPLOYEE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "varchar"),
    ("department", "varchar"),
    ("salary", "number"),
)
#: Rows of the canned ``employees`` table (what :func:`hr_row_policy` filters).
EMPLOYEES: tuple[tuple[str, str, int], ...] = (
    ("alice", "Engineering", 9800),
    ("bob", "Sales", 7200),
    ("carol", "Human Resources", 8900),
    ("dave", "Engineering", 6500),
)
#: Data roles the example apps configure in ``end_user_sec_params``.
DEMO_DATA_ROLES: tuple[str, ...] = ("hr_viewer",)
#: Who the emulated database grants each data role to.  The apps ask for
#: ``hr_viewer`` for everyone; as in Deep Data Security, a requested data role
#: counts only for an end user it is granted to.
DATA_ROLE_GRANTS: Mapping[str, frozenset[str]] = MappingProxyType(
    {"hr_viewer": frozenset({"carol@example.test"})}
)


def hr_row_policy(context: Any, row: Mapping[str, Any]) -> bool:
    """The demo database's grant on ``employees``, for the wire test server's ``row_policy``.

    Shaped like a typical Deep Data Security grant: no end user sees no rows;
    an end user holding the ``hr_viewer`` data role (requested by the app and
    granted in :data:`DATA_ROLE_GRANTS`) sees every row; any other end user
    sees only their own row (``name`` is the part of the user name before
    ``@``).  An emulation for the demo and tests, not Oracle's policy language.
    """
    user = getattr(context, "username", None)
    if not user:
        return False
    requested = getattr(context, "data_roles", None) or ()
    if any(user in DATA_ROLE_GRANTS.get(role, ()) for role in requested):
        return True
    return bool(row["name"] == user.partition("@")[0])


def visible_employees(db_user: str | None) -> list[str]:
    """The names :func:`hr_row_policy` shows ``db_user`` (the apps request ``hr_viewer``)."""
    from types import SimpleNamespace

    context = SimpleNamespace(username=db_user, data_roles=DEMO_DATA_ROLES)
    return [
        name
        for name, department, salary in sorted(EMPLOYEES)
        if hr_row_policy(context, {"name": name, "department": department, "salary": salary})
    ]

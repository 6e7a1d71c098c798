"""hr_common: what the three HR example apps share, whatever their framework.

* :mod:`hr_common.settings`: the ``HR_*`` environment configuration and the
  ``end_user_sec_params`` deepsec receives;
* :mod:`hr_common.signin`: the DEVELOPMENT ONLY token fetch behind the sign-in form;
* ``templates/``: the Jinja2 pages of ``flask_hr`` and ``fastapi_hr``
  (``django_hr`` keeps its own, in the Django template language);
* :mod:`hr_common.testing`: helpers and the behaviour every app's tests check.

Each app (``django_hr``, ``flask_hr``, ``fastapi_hr``) keeps only its
framework's own idiom: wiring, views or routes, and the connection pool.
"""

from __future__ import annotations

from pathlib import Path

#: The database's view of the current end user.
USERNAME_SQL = "select xs_sys_context('xs$session','username') from dual"
#: The page's table.
EMPLOYEES_SQL = "select name, department, salary from employees order by name"
#: The cookie holding the signed-in user's access token (deepsec's default name).
COOKIE = "identity"
#: The Jinja2 templates shared by ``flask_hr`` and ``fastapi_hr``.
TEMPLATES = Path(__file__).resolve().with_name("templates")

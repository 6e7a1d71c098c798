"""The Flask HR app: pages for browsers, a JSON API for bearer tokens."""

from __future__ import annotations

from typing import Any

import oracledb
from flask import Blueprint, Flask, abort, current_app, redirect, render_template, request
from hr_common import COOKIE, EMPLOYEES_SQL, TEMPLATES, USERNAME_SQL
from hr_common.settings import HRSettings
from hr_common.signin import USERS, fetch_dev_token

from deepsec.flask import DeepSec

bp = Blueprint("hr", __name__)


def request_attributes(req: Any) -> dict[str, Any]:
    """End-user attributes sent with each statement: which app and channel."""
    return {"app": "flask_hr", "channel": "api" if req.path.startswith("/api/") else "web"}


def pool() -> oracledb.ConnectionPool:
    """The app's connection pool."""
    return current_app.extensions["hr_pool"]


def who_and_employees() -> tuple[str | None, list[dict[str, Any]]]:
    """What the database says about the current end user, and the employees it returns."""
    with pool().acquire() as conn, conn.cursor() as cursor:
        cursor.execute(USERNAME_SQL)
        row = cursor.fetchone()
        cursor.execute(EMPLOYEES_SQL)
        rows = cursor.fetchall()
    employees = [{"name": n, "department": d, "salary": int(s)} for n, d, s in rows]
    return (row[0] if row else None), employees


@bp.get("/")
def home() -> str:
    db_user, employees = who_and_employees()
    return render_template("home.html", db_user=db_user, employees=employees)


@bp.get("/signin")
def signin_page() -> str:
    enabled = bool(current_app.config["HR_SETTINGS"].dev_signin_url)
    return render_template("signin.html", users=USERS, enabled=enabled)


@bp.post("/signin")
def signin() -> Any:
    cfg: HRSettings = current_app.config["HR_SETTINGS"]
    user = request.form.get("user", "")
    if not cfg.dev_signin_url:
        abort(404)
    if user not in USERS:
        abort(400)
    token = fetch_dev_token(cfg.dev_signin_url, user, cfg.idp_ca_file)
    response = redirect("/", code=303)
    response.set_cookie(
        COOKIE, token, httponly=True, secure=request.is_secure, samesite="Lax", path="/"
    )
    return response


@bp.post("/signout")
def signout() -> Any:
    response = redirect("/", code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@bp.get("/api/employees")
def api_employees() -> dict[str, Any]:
    """JSON for API clients sending ``Authorization: Bearer <token>``."""
    db_user, employees = who_and_employees()
    return {"db_user": db_user, "employees": employees}


@bp.get("/api/whoami")
def api_whoami() -> dict[str, Any]:
    """Only the database's view of the current end user."""
    with pool().acquire() as conn, conn.cursor() as cursor:
        cursor.execute(USERNAME_SQL)
        row = cursor.fetchone()
    return {"db_user": row[0] if row else None}


def create_app(settings: HRSettings | None = None) -> Flask:
    """Application factory; configuration comes from ``HR_*`` variables unless given."""
    cfg = settings or HRSettings.from_env()
    app = Flask(__name__, template_folder=TEMPLATES)  # shared with fastapi_hr
    app.config["HR_SETTINGS"] = cfg
    # Identity from the ``identity`` cookie or ``Authorization: Bearer``.
    DeepSec(app, attributes=request_attributes)
    app.extensions["hr_pool"] = oracledb.create_pool(
        **cfg.pool_params(),
        min=0,
        max=8,
        increment=1,
    )
    app.register_blueprint(bp)
    return app

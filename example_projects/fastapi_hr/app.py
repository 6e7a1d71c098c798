"""The FastAPI HR app: pages for browsers, a JSON API for bearer tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import parse_qs

import oracledb
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from hr_common import COOKIE, EMPLOYEES_SQL, TEMPLATES, USERNAME_SQL
from hr_common.settings import HRSettings
from hr_common.signin import USERS, fetch_dev_token
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

import deepsec  # noqa: F401  (registers the driver hook)
from deepsec import EndUserContext
from deepsec.fastapi import EndUserIdentity

from . import jobs

templates = Jinja2Templates(directory=TEMPLATES)  # shared with flask_hr


def request_attributes(connection: HTTPConnection) -> dict[str, Any]:
    """End-user attributes sent with each statement: which app and channel."""
    channel = "api" if connection.url.path.startswith("/api/") else "web"
    return {"app": "fastapi_hr", "channel": channel}


# Identity from the ``identity`` cookie or ``Authorization: Bearer``.
identity = EndUserIdentity(attributes=request_attributes)
EndUser = Annotated[EndUserContext | None, Depends(identity)]


async def who_and_employees(pool: oracledb.AsyncConnectionPool) -> tuple[str | None, list[dict]]:
    """What the database says about the current end user, and the employees it returns."""
    async with pool.acquire() as conn:
        cursor = conn.cursor()
        await cursor.execute(USERNAME_SQL)
        row = await cursor.fetchone()
        await cursor.execute(EMPLOYEES_SQL)
        rows = await cursor.fetchall()
    employees = [{"name": n, "department": d, "salary": int(s)} for n, d, s in rows]
    return (row[0] if row else None), employees


async def db_user(pool: oracledb.AsyncConnectionPool) -> str | None:
    """What the database says the current end user is (``None``: no end user)."""
    async with pool.acquire() as conn:
        cursor = conn.cursor()
        await cursor.execute(USERNAME_SQL)
        row = await cursor.fetchone()
    return row[0] if row else None


def create_app(settings: HRSettings | None = None) -> FastAPI:
    """Build the app; configuration comes from ``HR_*`` variables unless given."""
    cfg = settings or HRSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = oracledb.create_pool_async(
            **cfg.pool_params(),
            min=0,
            max=4,
        )
        try:
            yield
        finally:
            await app.state.pool.close(force=True)

    app = FastAPI(title="fastapi_hr", lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request, user: EndUser) -> Response:
        db_user, employees = await who_and_employees(request.app.state.pool)
        return templates.TemplateResponse(
            request,
            "home.html",
            {"db_user": db_user, "employees": employees, "signed_in": user is not None},
        )

    @app.get("/signin", response_class=HTMLResponse)
    async def signin_page(request: Request) -> Response:
        return templates.TemplateResponse(
            request, "signin.html", {"users": USERS, "enabled": bool(cfg.dev_signin_url)}
        )

    @app.post("/signin")
    async def signin(request: Request) -> Response:
        # A plain urlencoded form, parsed here (no python-multipart needed).
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        user = form.get("user", [""])[0]
        if not cfg.dev_signin_url:
            raise HTTPException(404, "dev sign-in is not configured (HR_DEV_SIGNIN_URL)")
        if user not in USERS:
            raise HTTPException(400, "unknown user")
        token = await run_in_threadpool(fetch_dev_token, cfg.dev_signin_url, user, cfg.idp_ca_file)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            secure=request.url.scheme == "https",
            samesite="lax",
            path="/",
        )
        return response

    @app.post("/signout")
    async def signout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/api/employees")
    async def api_employees(request: Request, user: EndUser) -> dict[str, Any]:
        """JSON for API clients sending ``Authorization: Bearer <token>``."""
        db_user, employees = await who_and_employees(request.app.state.pool)
        return {"db_user": db_user, "employees": employees}

    @app.get("/api/whoami")
    async def api_whoami(request: Request, user: EndUser) -> dict[str, Any]:
        """Only the database's view of the current end user."""
        async with request.app.state.pool.acquire() as conn:
            cursor = conn.cursor()
            await cursor.execute(USERNAME_SQL)
            row = await cursor.fetchone()
        return {"db_user": row[0] if row else None}

    @app.post("/api/exports", status_code=202)
    async def queue_export(user: EndUser) -> dict[str, Any]:
        """Queue a Celery export that runs as this request's end user."""
        jobs.configure(cfg)
        jobs.ensure_worker()
        # Published in a worker thread that carries this request's end user.
        result = await run_in_threadpool(jobs.export_employees.delay)
        return {"task_id": result.id}

    @app.get("/api/exports/{task_id}")
    async def export_status(request: Request, task_id: str, user: EndUser) -> dict[str, Any]:
        """The export's state, and its result once done -- to the end user who queued it only.

        A task id is no capability: the rows are returned only when the
        database says the requester is the end user the export ran as (the
        database, which verifies tokens, rather than an unverified claim).
        """
        result = jobs.celery_app.AsyncResult(task_id)
        if not result.ready():
            return {"state": result.state}
        if result.failed():
            return {"state": "FAILURE", "error": type(result.result).__name__}
        export = result.result
        requester = await db_user(request.app.state.pool)
        if not isinstance(export, dict) or export.get("db_user") != requester:
            raise HTTPException(status_code=404, detail="no such export")
        return {"state": "SUCCESS", **export}

    return app

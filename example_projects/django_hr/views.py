"""Views of the Django HR app: pages for browsers, a JSON API for bearer tokens."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from hr_common import COOKIE, EMPLOYEES_SQL, USERNAME_SQL
from hr_common.signin import USERS, fetch_dev_token


def request_attributes(request: HttpRequest) -> dict[str, Any]:
    """End-user attributes sent with each statement (``DEEPSEC["attributes"]``)."""
    return {"app": "django_hr", "channel": "api" if request.path.startswith("/api/") else "web"}


def who_and_employees() -> tuple[str | None, list[dict[str, Any]]]:
    """What the database says about the current end user, and the employees it returns."""
    with connection.cursor() as cursor:
        cursor.execute(USERNAME_SQL)
        row = cursor.fetchone()
        cursor.execute(EMPLOYEES_SQL)
        rows = cursor.fetchall()
    employees = [{"name": n, "department": d, "salary": int(s)} for n, d, s in rows]
    return (row[0] if row else None), employees


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    db_user, employees = who_and_employees()
    return render(request, "django_hr/home.html", {"db_user": db_user, "employees": employees})


@require_http_methods(["GET", "POST"])
def signin(request: HttpRequest) -> HttpResponse:
    url = settings.HR.dev_signin_url
    if request.method == "GET":
        return render(request, "django_hr/signin.html", {"users": USERS, "enabled": bool(url)})
    user = request.POST.get("user", "")
    if not url or user not in USERS:
        return HttpResponseBadRequest("unknown user or dev sign-in off")
    token = fetch_dev_token(url, user, settings.HR.idp_ca_file)
    response = redirect("home")
    response.status_code = 303
    response.set_cookie(
        COOKIE, token, httponly=True, secure=request.is_secure(), samesite="Lax", path="/"
    )
    return response


@require_POST
def signout(request: HttpRequest) -> HttpResponse:
    response = redirect("home")
    response.status_code = 303
    response.delete_cookie(COOKIE, path="/", samesite="Lax")
    return response


@require_GET
def api_employees(request: HttpRequest) -> JsonResponse:
    """JSON for API clients sending ``Authorization: Bearer <token>``."""
    db_user, employees = who_and_employees()
    return JsonResponse({"db_user": db_user, "employees": employees})


@require_GET
def api_whoami(request: HttpRequest) -> JsonResponse:
    """Only the database's view of the current end user."""
    with connection.cursor() as cursor:
        cursor.execute(USERNAME_SQL)
        row = cursor.fetchone()
    return JsonResponse({"db_user": row[0] if row else None})

"""Views that run tagged SQL, so tests find each request's statements on the wire.

Every view takes ``?db=<alias>`` (default ``default``) and ``?tag=<text>``;
the tag goes into the SQL as a comment (``/* tag */``) and the wire server's
records are matched on it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

import deepsec

_TAG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
WHOAMI_SQL = "select xs_sys_context('xs$session','username') /* {tag} */ from dual"
PING_SQL = "select 1 /* {tag} */ from dual"


def _params(request: HttpRequest) -> tuple[str, str]:
    alias = request.GET.get("db", "default")
    tag = request.GET.get("tag", "untagged")
    if not _TAG.fullmatch(tag):
        raise ValueError("bad tag")
    return alias, tag


def query_username(alias: str, tag: str) -> Any:
    """Run the tagged statements and return xs_sys_context's username."""
    with connections[alias].cursor() as cursor:
        cursor.execute(PING_SQL.format(tag=tag))
        cursor.fetchall()
        cursor.execute(WHOAMI_SQL.format(tag=tag))
        return cursor.fetchone()[0]


def _describe() -> str | None:
    ctx = deepsec.current_end_user()
    return None if ctx is None else repr(ctx)


def whoami(request: HttpRequest) -> JsonResponse:
    alias, tag = _params(request)
    return JsonResponse({"username": query_username(alias, tag), "context": _describe()})


async def awhoami(request: HttpRequest) -> JsonResponse:
    alias, tag = _params(request)
    username = await sync_to_async(query_username)(alias, tag)
    return JsonResponse({"username": username, "context": _describe()})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    alias, tag = _params(request)
    chunks = int(request.GET.get("chunks", "3"))

    def body() -> Iterator[str]:
        try:
            for i in range(chunks):
                yield f"{query_username(alias, f'{tag}-{i}')}\n"
        finally:
            # Runs when the body is exhausted or closed early.
            query_username(alias, f"{tag}-finally")

    return StreamingHttpResponse(body(), content_type="text/plain")


async def astream(request: HttpRequest) -> StreamingHttpResponse:
    alias, tag = _params(request)
    chunks = int(request.GET.get("chunks", "3"))

    async def body() -> AsyncIterator[str]:
        for i in range(chunks):
            name = await sync_to_async(query_username)(alias, f"{tag}-{i}")
            yield f"{name}\n"

    return StreamingHttpResponse(body(), content_type="text/plain")


def boom(request: HttpRequest) -> JsonResponse:
    alias, tag = _params(request)
    query_username(alias, tag)
    raise RuntimeError("view failed after a query")


def data_roles(request: HttpRequest) -> list[str]:
    """``DEEPSEC["data_roles"]`` for the tests (given as a dotted path)."""
    return ["hr_reader"]


def attributes(request: HttpRequest) -> dict[str, Any]:
    """``DEEPSEC["attributes"]`` for the tests (given as a dotted path)."""
    return {"tenant": request.META.get("HTTP_X_TENANT", "none")}

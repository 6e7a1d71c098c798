"""A stand-in for AuthenticationMiddleware that needs no user table.

``X-Test-User: alice`` makes ``request.user`` an authenticated user named
alice; without the header the user is anonymous.  Sync and async capable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.contrib.auth.models import AnonymousUser


class HeaderUser:
    """Just enough of a Django user for ``deepsec.django.resolvers.django_user``."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, username: str) -> None:
        self.username = username

    def get_username(self) -> str:
        return self.username


class header_user:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def _set_user(self, request: Any) -> None:
        name = request.META.get("HTTP_X_TEST_USER")
        request.user = HeaderUser(name) if name else AnonymousUser()

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        self._set_user(request)
        return self.get_response(request)

    async def __acall__(self, request: Any) -> Any:
        self._set_user(request)
        return await self.get_response(request)

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("signin", views.signin, name="signin"),
    path("signout", views.signout, name="signout"),
    path("api/employees", views.api_employees, name="api-employees"),
    path("api/whoami", views.api_whoami, name="api-whoami"),
]

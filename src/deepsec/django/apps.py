"""The ``deepsec.django`` application configuration."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["DeepSecConfig"]


class DeepSecConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    """Registers the python-oracledb hook and deepsec's system checks."""

    name = "deepsec.django"
    label = "deepsec"
    verbose_name = "Oracle Deep Data Security end users"
    default = True

    def ready(self) -> None:
        """Import deepsec (registers the params hook once) and the checks."""
        import deepsec

        from . import checks

        deepsec.install()
        checks.register()

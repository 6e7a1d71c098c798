"""django_hr: a small HR project whose every query runs as the signed-in end user.

Django idiom: ``DATABASES[...]["OPTIONS"]["extra_auth_params"]``,
``deepsec.django.middleware.EndUserSecMiddleware`` and the ``DEEPSEC``
setting, function views, templates, CSRF-protected forms.
``DJANGO_SETTINGS_MODULE=django_hr.settings``.
"""

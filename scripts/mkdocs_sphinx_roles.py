"""A griffe extension: Sphinx roles in docstrings become cross-references in the API reference.

deepsec's docstrings use Sphinx roles (``:class:`~deepsec.web.WebSettings```),
which Google-style rendering would show as literal text.  Before mkdocstrings
renders a docstring, each role becomes an mkdocs-autorefs reference: a link
when the target is documented, plain code otherwise (``optional``, so a role
naming something outside the API reference, like ``oracledb.Connection``, is
not a broken link).  Names are resolved in the docstring's own scope, as
Sphinx does (``:meth:`mark``` inside a class, an imported name in a module).

Loaded from mkdocs.yml (mkdocstrings ``extensions``); ``rewrite_roles`` is
also what the tests exercise.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from typing import Any

import griffe

#: The Sphinx roles rewritten here (and looked for by ``check_docs_roles.py``).
ROLES = ("class", "func", "meth", "data", "attr", "exc", "mod", "obj", "const")
#: ``:class:`target```, ``:py:meth:`~a.b```, ``:func:`title <target>```.
ROLE_RE = re.compile(r":(?:py:)?(?P<role>" + "|".join(ROLES) + r"):`(?P<body>[^`]+)`")


def rewrite_roles(text: str, resolve: Callable[[str], str | None] = lambda name: None) -> str:
    """``text`` with every Sphinx role replaced by an optional autorefs reference."""

    def replace(match: re.Match[str]) -> str:
        body = match["body"].strip()
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^<>]+)>", body)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            title = target = body
        short = target.startswith("~")
        target = target.lstrip("~!").lstrip(".")
        if not explicit:
            title = target.rpartition(".")[2] if short else target
        identifier = resolve(target) or target
        return (
            f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )

    return ROLE_RE.sub(replace, text)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Called once the whole package is loaded, so every name can be resolved."""
        for obj in _walk(pkg):
            if obj.docstring is None or ":" not in obj.docstring.value:
                continue

            def resolve(name: str, scope: griffe.Object = obj) -> str | None:
                if name.startswith(pkg.name + "."):
                    return name
                try:
                    return scope.resolve(name)
                except Exception:  # not in scope: keep the name as written
                    return None

            obj.docstring.value = rewrite_roles(obj.docstring.value, resolve)

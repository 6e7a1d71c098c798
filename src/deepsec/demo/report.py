"""The table the demo prints: one row per request, no token or secret in it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .scenario import RequestReport


def _fmt_roles(values: Sequence[tuple[str, ...] | None]) -> str:
    shown = {",".join(v) if v else "-" for v in values}
    return " | ".join(sorted(shown)) or "-"


def _fmt_attrs(values: Sequence[Mapping[str, Any]]) -> str:
    shown = {
        ", ".join(f"{k}={_attr_value(v)}" for k, v in sorted(a.items())) or "-" for a in values
    }
    return " | ".join(sorted(shown)) or "-"


def _attr_value(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return str(value)


def format_reports(reports: Sequence[RequestReport]) -> str:
    """The table the demo prints (no token or secret in it)."""
    headers = (
        "request",
        "GET",
        "db user (xs$session)",
        "context",
        "access token of",
        "data roles",
        "attributes",
        "stmts",
        "rows the database returned",
        "",
    )
    rows = []
    for r in reports:
        users = sorted({u or "-" for u in r.db_users}) or ["-"]
        kinds = sorted(set(r.kinds)) or ["-"]
        attached = "attached (" + ",".join(kinds) + ")" if r.expected_user else ",".join(kinds)
        if not r.expected_user and kinds == ["none"]:
            attached = "none"
        rows.append(
            (
                r.label,
                r.path,
                ",".join(users),
                attached,
                ",".join(sorted({t or "-" for t in r.app_tokens})) or "-",
                _fmt_roles(r.data_roles),
                _fmt_attrs(r.attributes),
                str(r.statements),
                ", ".join(r.rows_seen) if r.rows_seen else "(none)",
                "ok" if r.ok else "FAIL",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in reports:
        for problem in r.problems:
            out.append(f"FAIL {r.label} {r.path}: {problem}")
    return "\n".join(out)

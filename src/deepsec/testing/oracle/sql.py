"""The tiny SQL engine: ``select ... from dual`` expressions, canned tables, no-op DDL/DML."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from .codec import Column, ColumnType, OracleError, Value
from .policy import Row, RowPolicy
from .records import WireContext

# ---------------------------------------------------------------------------
# Tables, result sets and the tiny SQL engine
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    name: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[Value, ...], ...]


@dataclass
class _Result:
    """What one statement produced."""

    columns: tuple[Column, ...] | None = None  # None: not a query
    rows: list[tuple[Value, ...]] = field(default_factory=list)
    rowcount: int = 0


@dataclass
class _Session:
    """The per-connection state the SQL engine may read."""

    schema_user: str
    context: WireContext | None


_NUMBER_LITERAL_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_DDL_WORDS = frozenset(
    {
        "alter", "analyze", "associate", "audit", "comment", "commit", "create",
        "disassociate", "drop", "flashback", "grant", "lock", "noaudit", "purge",
        "rename", "revoke", "rollback", "savepoint", "set", "truncate",
    }
)  # fmt: skip
_PLSQL_WORDS = frozenset({"begin", "declare", "call"})
_CONTEXT_CALL_RE = re.compile(r"(xs_sys_context|sys_context)\('([^']*)','([^']*)'(?:,\d+)?\)")


def strip_sql_comments(sql: str) -> str:
    """``sql`` without ``/* */`` and ``--`` comments (string literals are respected)."""
    out: list[str] = []
    pos = 0
    for match in re.finditer(r"'(?:[^']|'')*'|/\*.*?\*/|--[^\n]*", sql, re.S):
        out.append(sql[pos : match.start()])
        token = match.group(0)
        out.append(token if token.startswith("'") else " ")
        pos = match.end()
    out.append(sql[pos:])
    return "".join(out)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, quote, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
        elif not quote and depth == 0 and ch == sep:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _find_keyword(text: str, keyword: str) -> int:
    """Index of ``keyword`` (a whole word) at parenthesis depth 0 outside quotes, or -1."""
    depth, quote = 0, False
    lower = text.lower()
    n = len(keyword)
    for i, ch in enumerate(text):
        if ch == "'":
            quote = not quote
        elif quote:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif (
            depth == 0
            and lower.startswith(keyword, i)
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_$#"))
            and (i + n == len(text) or not (text[i + n].isalnum() or text[i + n] in "_$#"))
        ):
            return i
    return -1


def _placeholders(sql_no_comments: str) -> list[str]:
    """Bind placeholder names in order of occurrence (outside string literals)."""
    names = []
    for match in re.finditer(r"'(?:[^']|'')*'|:(\"[^\"]+\"|\w+)", sql_no_comments):
        if match.group(1):
            names.append(match.group(1).strip('"').upper())
    return names


def _literal(text: str) -> tuple[bool, Value]:
    text = text.strip()
    if _NUMBER_LITERAL_RE.match(text):
        num = Decimal(text)
        integral = "e" not in text.lower() and "." not in text
        return True, int(num) if integral else num
    if len(text) >= 2 and text[0] == "'" and text[-1] == "'":
        return True, text[1:-1].replace("''", "'") or None
    if text.lower() == "null":
        return True, None
    return False, None


def _unquote_ident(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text.upper()


def _type_of(value: Value) -> ColumnType:
    numeric = isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)
    return "number" if numeric else "varchar"


class _SqlEngine:
    """Answers the few statement shapes the project's tests and demos need."""

    def __init__(self, tables: Mapping[str, _Table], row_policy: RowPolicy | None = None) -> None:
        self.tables = tables
        self.row_policy = row_policy

    def run(self, sql: str, binds: Sequence[Value], session: _Session) -> _Result:
        text = strip_sql_comments(sql).strip().rstrip(";").strip()
        names = _placeholders(text)
        if len(binds) < len(names):
            raise OracleError(1008)
        bind_map: dict[str, Value] = {}
        for name, value in zip(names, binds[: len(names)], strict=True):
            bind_map.setdefault(name, value)
        first = text.split(None, 1)[0].lower() if text else ""
        first = first.lstrip("(")
        if first in ("select", "with"):
            return self._select(text, bind_map, session)
        if first == "insert":
            return _Result(rowcount=1)
        if first in ("update", "delete", "merge"):
            return _Result(rowcount=0)
        if first in _DDL_WORDS or first in _PLSQL_WORDS:
            return _Result()
        raise OracleError(900)

    # -- select ----------------------------------------------------------------

    def _select(self, text: str, binds: Mapping[str, Value], session: _Session) -> _Result:
        if text.lower().startswith("with"):
            raise OracleError(942)
        body = text[len("select") :].strip()
        from_at = _find_keyword(body, "from")
        if from_at < 0:
            raise OracleError(923)
        select_list = body[:from_at].strip()
        rest = body[from_at + 4 :].strip()
        end = len(rest)
        for kw in ("where", "order", "group", "fetch", "offset", "for"):
            at = _find_keyword(rest, kw)
            if 0 <= at < end:
                end = at
        source = rest[:end].strip()
        tail = rest[end:].strip()
        source_name = source.split()[0] if source.split() else ""
        table_name = _unquote_ident(source_name.split(".")[-1]) if source_name else ""
        if table_name == "DUAL":
            result = self._select_dual(select_list, binds, session)
            if not self._dual_where_matches(tail, binds):
                result.rows = []
            return result
        table = self.tables.get(table_name)
        if table is None:
            raise OracleError(942)
        return self._select_table(table, select_list, tail, binds, session.context)

    def _expr_value(
        self, expr: str, binds: Mapping[str, Value], session: _Session
    ) -> tuple[bool, Value]:
        ok, value = _literal(expr)
        if ok:
            return True, value
        compact = re.sub(r"\s+", "", expr).lower()
        if compact.startswith(":"):
            name = compact[1:].strip('"').upper()
            return (name in binds), binds.get(name)
        if compact == "user":
            return True, session.schema_user
        call = _CONTEXT_CALL_RE.fullmatch(compact)
        if call:
            func, namespace, attribute = call.groups()
            ctx = session.context
            if func == "xs_sys_context" and namespace == "xs$session":
                if attribute in ("username", "session_xs_user", "current_xs_user"):
                    return True, ctx.username if ctx is not None else None
                return True, None
            if func == "sys_context" and namespace == "userenv":
                if attribute in ("current_user", "session_user"):
                    return True, "XS$NULL" if ctx is not None else session.schema_user
                if attribute == "current_schema":
                    return True, session.schema_user
                return True, None
            return True, None
        return False, None

    @staticmethod
    def _split_alias(item: str) -> tuple[str, str | None]:
        match = re.match(r"^(.*?)(?:\s+as)?\s+(\"[^\"]+\"|[A-Za-z_][\w$#]*)$", item, re.S | re.I)
        if match and match.group(1).strip() and not match.group(1).strip().endswith(("(", ",")):
            expr = match.group(1).strip()
            if expr.count("(") == expr.count(")") and expr.count("'") % 2 == 0:
                return expr, _unquote_ident(match.group(2))
        return item.strip(), None

    def _select_dual(
        self, select_list: str, binds: Mapping[str, Value], session: _Session
    ) -> _Result:
        columns: list[Column] = []
        row: list[Value] = []
        for item in _split_top_level(select_list):
            expr, alias = self._split_alias(item)
            ok, value = self._expr_value(expr, binds, session)
            if not ok:
                ok, value = self._expr_value(item, binds, session)
                alias = None
                expr = item
            if not ok:
                raise OracleError(904, f'"{expr.upper()}": invalid identifier')
            name = alias or re.sub(r"\s+", "", expr).upper()
            col_type = _type_of(value)
            if re.fullmatch(r"[+-]?[\d.]+(?:[eE][+-]?\d+)?", expr.strip()):
                col_type = "number"
            columns.append(Column(name, col_type))
            row.append(value)
        return _Result(columns=tuple(columns), rows=[tuple(row)])

    def _dual_where_matches(self, tail: str, binds: Mapping[str, Value]) -> bool:
        """Evaluate ``where dummy = ...`` on DUAL; other conditions are treated as true."""
        where_at = _find_keyword(tail, "where")
        if where_at < 0:
            return True
        cond = tail[where_at + 5 :]
        for kw in ("order", "group", "fetch", "offset", "for"):
            at = _find_keyword(cond, kw)
            if at >= 0:
                cond = cond[:at]
        dual = _Table("DUAL", (Column("DUMMY"),), (("X",),))
        try:
            return bool(self._filter(dual, {"DUMMY": 0}, list(dual.rows), cond.strip(), binds))
        except OracleError:
            return True

    def _select_table(
        self,
        table: _Table,
        select_list: str,
        tail: str,
        binds: Mapping[str, Value],
        context: WireContext | None = None,
    ) -> _Result:
        index = {c.name: i for i, c in enumerate(table.columns)}
        rows = self._visible_rows(table, index, context)
        where_at = _find_keyword(tail, "where")
        if where_at >= 0:
            cond = tail[where_at + 5 :]
            for kw in ("order", "group", "fetch", "offset", "for"):
                at = _find_keyword(cond, kw)
                if at >= 0:
                    cond = cond[:at]
            rows = self._filter(table, index, rows, cond.strip(), binds)
        items = _split_top_level(select_list)
        count_expr, alias = self._split_alias(items[0]) if len(items) == 1 else ("", None)
        if re.fullmatch(r"count\(\s*\*\s*\)", count_expr, re.I):
            return _Result(columns=(Column(alias or "COUNT(*)", "number"),), rows=[(len(rows),)])
        picks: list[int] = []
        columns: list[Column] = []
        for item in items:
            if item == "*" or item.endswith(".*"):
                picks.extend(range(len(table.columns)))
                columns.extend(table.columns)
                continue
            expr, alias = self._split_alias(item)
            name = _unquote_ident(expr.split(".")[-1])
            if name not in index:
                raise OracleError(904, f'"{expr.upper()}": invalid identifier')
            picks.append(index[name])
            columns.append(Column(alias or name, table.columns[index[name]].type))
        return _Result(columns=tuple(columns), rows=[tuple(r[i] for i in picks) for r in rows])

    def _visible_rows(
        self, table: _Table, index: Mapping[str, int], context: WireContext | None
    ) -> list[tuple[Value, ...]]:
        """The rows the row policy lets this round trip's end user see (all without one)."""
        policy = self.row_policy
        if policy is None:
            return list(table.rows)
        try:
            return [r for r in table.rows if policy(context, Row(table.name, index, r))]
        except Exception as exc:
            # Oracle answers a failing policy function with ORA-28113; never all rows.
            raise OracleError(28113, f"row policy raised {type(exc).__name__}") from exc

    def _filter(
        self,
        table: _Table,
        index: Mapping[str, int],
        rows: list[tuple[Value, ...]],
        cond: str,
        binds: Mapping[str, Value],
    ) -> list[tuple[Value, ...]]:
        terms = re.split(r"\s+and\s+", cond, flags=re.I)
        for term in terms:
            match = re.fullmatch(r"\s*([\w$#.\"]+)\s*=\s*(.+?)\s*", term, re.S)
            if not match:
                raise OracleError(900, "only 'column = value [and ...]' conditions are supported")
            name = _unquote_ident(match.group(1).split(".")[-1])
            if name not in index:
                raise OracleError(904, f'"{match.group(1).upper()}": invalid identifier')
            rhs = match.group(2)
            if rhs.startswith(":"):
                key = rhs[1:].strip('"').upper()
                if key not in binds:
                    raise OracleError(1008)
                wanted = binds[key]
            else:
                ok, wanted = _literal(rhs)
                if not ok:
                    raise OracleError(904, f'"{rhs.upper()}": invalid identifier')
            pos = index[name]
            rows = [r for r in rows if _values_equal(r[pos], wanted)]
        return rows


def _values_equal(left: Value, right: Value) -> bool:
    if left is None or right is None:
        return False
    numeric = (int, float, Decimal)
    if isinstance(left, numeric) or isinstance(right, numeric):
        try:
            return Decimal(str(left)) == Decimal(str(right))
        except ArithmeticError:
            return False
    return str(left) == str(right)

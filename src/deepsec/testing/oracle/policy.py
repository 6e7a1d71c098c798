"""Row policies: an **emulation**, for tests and demos, of a database that filters rows by end user.

A real Oracle AI Database 26ai decides which rows an end user sees with Deep
Data Security grants written in SQL in the database.  The wire test server
has no policy language; instead the app or test hands it a Python callable
(:data:`RowPolicy`), asked once per row of every canned table
(:meth:`OracleTestServer.add_table`) with the end-user context of the round
trip (``None`` when none travelled with it).  This lets a test or demo show
that *what the database receives* decides *what the database returns*; it
says nothing about how to write the real grants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from .codec import Value
from .records import WireContext

__all__ = ["Row", "RowPolicy"]


class Row(Mapping[str, Value]):
    """One row of a canned table as a row policy sees it.

    ``row["name"]`` reads a column (names are case-insensitive, as Oracle's
    unquoted identifiers are); ``row.table`` is the (upper-case) table name.
    """

    __slots__ = ("_index", "_values", "table")

    def __init__(self, table: str, index: Mapping[str, int], values: tuple[Value, ...]) -> None:
        self.table = table
        self._index = index
        self._values = values

    def __getitem__(self, column: str) -> Value:
        return self._values[self._index[column.upper()]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"Row({self.table!r}, {dict(self)!r})"


#: ``policy(context, row) -> bool``: whether the end user of ``context`` (``None``:
#: no end-user context on this round trip) may see ``row``.  An exception raised
#: by the policy answers ORA-28113 ("policy predicate has error"), as Oracle does
#: for a failing policy function.
RowPolicy = Callable[[WireContext | None, Row], bool]

"""Which of deepsec's instructions on the request path CPython could not specialize.

Run ``python bench/specialization.py [--requests N]`` (CPython 3.11 or 3.12).

CPython 3.11+ rewrites a hot instruction into a specialized form (an
attribute read at a known offset, a call of a known kind); where it cannot,
the instruction stays *adaptive* and takes the generic path on every run --
for an attribute, a lookup through the type-attribute cache, whose cost
depends on which other types share its slots (``bench/instructions.py``
sees that as layout noise).  This serves each deepsec variant of
``bench/adapters.py``, then a few more requests, and lists the adaptive
instructions of deepsec's own code whose inline cache changed in those last
requests: the ones that ran, unspecialized.

Some are inherent (calling the framework's app object, making the bound
method handed to it as ``send``, ``object.__new__``); the ones worth a look
are attribute reads and method calls on deepsec's own objects -- e.g. calling
a slot's value as a method, ``self._send(message)``, which 3.11 cannot
specialize, where ``send = self._send; send(message)`` is two specialized
instructions.  A figure of cost, not a target: read it next to
``bench/instructions.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import dis
import gc
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapters
import instructions

#: (label, framework, variant of bench/adapters.py)
VARIANTS = [
    ("Flask (DeepSec)", "flask", "deepsec"),
    ("Django (middleware)", "django", "deepsec"),
    ("Starlette (ASGI middleware)", "starlette", "deepsec"),
    ("FastAPI (ASGI middleware)", "fastapi", "deepsec"),
    ("FastAPI (dependency)", "fastapi-dependency", "deepsec"),
]


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def deepsec_code() -> list[types.CodeType]:
    """Every code object of deepsec's package that exists now (closures included)."""
    package = str(Path(adapters.__file__).resolve().parent.parent / "src" / "deepsec")
    import deepsec

    roots = {str(Path(p).resolve()) for p in deepsec.__path__} | {package}
    found = {}
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            for code in _codes(obj.__code__):
                if any(code.co_filename.startswith(root) for root in roots):
                    found[id(code)] = code
    return list(found.values())


def unspecialized(run: Callable[[int], object], requests: int) -> list[str]:
    """The adaptive instructions of deepsec's code that ran in ``requests`` more requests."""
    codes = deepsec_code()
    before = {id(c): c._co_code_adaptive for c in codes}  # type: ignore[attr-defined]
    run(requests)
    rows = []
    for code in codes:
        after = code._co_code_adaptive  # type: ignore[attr-defined]
        old = before[id(code)]
        if after == old:
            continue
        changed = {i for i in range(0, len(after), 2) if after[i : i + 2] != old[i : i + 2]}
        owner = None
        reported: set[int] = set()
        for ins in dis.get_instructions(code, adaptive=True, show_caches=True):
            if ins.opname != "CACHE":
                owner = ins
            if (
                owner is not None
                and ins.offset in changed
                and "ADAPTIVE" in owner.opname
                and owner.offset not in reported
            ):
                reported.add(owner.offset)
                where = f"{Path(code.co_filename).name}:{owner.positions.lineno}"
                rows.append(f"  {where:24} {code.co_qualname:40} {owner.opname} {owner.argrepr}")
    return sorted(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="warm-up requests per app")
    args = parser.parse_args(argv)
    if not hasattr(types.CodeType, "_co_code_adaptive") or sys.version_info >= (3, 13):
        print("bench/specialization.py reads CPython 3.11/3.12's inline caches", file=sys.stderr)
        return 2
    loop = asyncio.new_event_loop()
    print(f"python {sys.version.split()[0]}: deepsec instructions that ran unspecialized\n")
    for label, framework, variant in VARIANTS:
        run = instructions.app_runner(framework, variant, loop)
        run(args.requests)
        rows = unspecialized(run, 10)
        print(f"{label}: {len(rows)}")
        print("\n".join(rows) if rows else "  (none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

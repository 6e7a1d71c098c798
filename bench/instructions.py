"""Adapter and hook cost in machine instructions per request: counted, where CPU time is timed.

Run ``python bench/instructions.py [--requests N] [--layouts L] [--hook]`` (needs
Valgrind: ``apt-get install valgrind``; five to fifteen minutes on two cores,
by machine; ``--hook`` about three).

``bench/adapters.py`` times the adapters, and on a shared machine two
identical apps can differ by half a microsecond per request.  This counts
instead: every app of ``bench/adapters.py`` (bare, hand-written floor,
deepsec; the same request), and Django's middlewares alone around a view
that returns at once (:func:`django_alone`: the steadier Django figure),
runs in a process of its own under Valgrind's
cachegrind, once with a warm-up only and once with ``N`` more requests; the
difference of the two counts divided by ``N`` is what one request costs
(start-up, imports and warm-up cancel out).  The machine's load does not
change a count: one process run twice agrees to the instruction.

What does change it is the process's layout.  CPython looks type attributes
up through a small cache whose slots depend on the order types were created
in, so one more class imported anywhere moves a Django request by up to
1.5k instructions, in every variant and not alike.  Each child therefore
first creates ``0 .. L-1`` throwaway types (``L`` layouts), the variants of
one layout are compared with each other, and the figures are medians over
the layouts.  Not the issue-9 target (CPU time): an instruction that misses
the CPU caches costs more than one that does not.  Read it as the share of
the work, and as the tool to judge a change the timing bench cannot resolve.

``--hook`` counts the driver hook's apps of ``bench/hook.py`` instead (a
request through a pool to the wire test server, which runs in a process of
its own that Valgrind does not trace): the client's instructions per
request, against "by hand", whose wall clock is the hook's 1.03 target.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapters

#: (row label, framework, bare, floor, deepsec): the variants of ``adapters``.
ROWS = [
    ("Flask (DeepSec)", "flask", "bare", "floor", "deepsec"),
    ("Django (middleware)", "django", "bare", "floor", "deepsec"),
    ("Django (the middleware alone)", "django-alone", "bare", "floor", "deepsec"),
    ("Starlette (ASGI middleware)", "starlette", "bare", "floor", "deepsec"),
    ("FastAPI (ASGI middleware)", "fastapi", "bare", "floor", "deepsec"),
    ("FastAPI (dependency)", "fastapi-dependency", "bare", "floor", "deepsec"),
]
WARM_UP = 300
#: The driver hook's apps (``bench/hook.py``) that ``--hook`` counts, "by hand" first.
HOOK_APPS = ("by hand", "callback only", "minimal hook", "deepsec", "deepsec (adapter)")


def app_runner(
    framework: str, variant: str, loop: asyncio.AbstractEventLoop
) -> Callable[[int], object]:
    """The variant's hello-world app (``bench/adapters.py``), as "serve n requests"."""
    if framework == "flask":
        return adapters.wsgi_runner(adapters.flask_apps()[variant], "/", False)
    if framework in ("django", "django-alone"):
        adapters.django_setup()
        if framework == "django-alone":
            return django_alone(variant)
        return adapters.wsgi_runner(adapters.django_apps()[variant], "/", False)
    if framework == "starlette":
        return adapters.asgi_runner(adapters.starlette_apps()[variant], loop, "/", False)
    if framework == "fastapi-dependency":
        return adapters.asgi_runner(adapters.fastapi_dependency_apps()[variant], loop, "/", False)
    return adapters.asgi_runner(adapters.fastapi_apps()[variant], loop, "/", False)


def serve(framework: str, variant: str, requests: int) -> None:
    """The child process: build the variant's app, warm it up, serve ``requests``."""
    logging.disable(logging.WARNING)
    if framework == "hook":
        serve_hook(variant, requests)
        return
    run = app_runner(framework, variant, asyncio.new_event_loop())
    run(WARM_UP)
    # What the app built and the warm-up left is long-lived: frozen, a full
    # collection does not scan it, so the two runs (with and without
    # ``requests``) differ by what the requests cost and by nothing else.
    gc.collect()
    gc.freeze()
    if requests:
        run(requests)


def serve_hook(variant: str, requests: int) -> None:
    """:func:`serve` for a driver hook app: its own pool, the wire server in another process."""
    import hook  # bench/hook.py (it puts tests/support on sys.path)

    headers = hook.user_headers(8)
    build, extra = hook.app_builders({}, headers)[variant]
    with hook.wire_server() as wire:
        pool = hook._pool(wire, **extra)
        try:
            request = build(pool)
            # New str objects, as a header parser makes (and hook.run_round).
            fresh = [h.encode().decode() for h in headers]
            for i in range(WARM_UP):
                request(fresh[i % len(fresh)])
            gc.collect()
            gc.freeze()
            for i in range(requests):
                request(fresh[i % len(fresh)])
        finally:
            pool.close(force=True)


def django_alone(variant: str) -> Callable[[int], object]:
    """Django's middleware alone: a new request object each time, a view that returns at once.

    No URL resolution, response handling or WSGI iteration: what they cost
    moves with the process layout by more than a middleware costs (the full
    Django row), and cancels out of "adds" anyway.
    """
    import floors
    from django.core.handlers.wsgi import WSGIRequest
    from django.http import HttpResponse

    import deepsec.django.middleware

    response = HttpResponse(b"ok")

    def view(request: Any) -> HttpResponse:
        return response

    middleware = {
        "bare": view,
        "floor": floors.django_floor(view),
        "deepsec": deepsec.django.middleware.EndUserSecMiddleware(view),
    }[variant]
    new_environ = adapters.wsgi_environs("/")

    def run(n: int) -> None:
        for _ in range(n):
            middleware(WSGIRequest(new_environ()))

    return run


def _shift_layout(types: int) -> None:
    """Create and look up ``types`` throwaway types: later types get other cache slots."""
    for i in range(types):
        getattr(type(f"Layout{i}", (), {}), "attribute", None)


def instructions(framework: str, variant: str, requests: int, layout: int) -> int:
    """Instructions the whole child process executes (Valgrind's "I refs")."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--serve",
            framework,
            variant,
            str(requests),
            str(layout),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{framework} {variant}: the child failed\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(framework: str, variant: str, requests: int, layout: int) -> float:
    """Instructions one request costs in one layout: the difference of two runs."""
    served = instructions(framework, variant, requests, layout)
    return (served - instructions(framework, variant, 0, layout)) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per app")
    parser.add_argument("--layouts", type=int, default=3, help="process layouts per app")
    parser.add_argument(
        "--hook", action="store_true", help="count bench/hook.py's pooled requests instead"
    )
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.layouts < 1:
        parser.error("--requests and --layouts must be at least 1")
    if args.serve:
        framework, variant, n, layout = args.serve
        _shift_layout(int(layout))
        serve(framework, variant, int(n))
        return 0
    if shutil.which("valgrind") is None:
        print("bench/instructions.py needs Valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    if args.hook:
        wanted = {("hook", v) for v in HOOK_APPS}
    else:
        wanted = {(row[1], v) for row in ROWS for v in row[2:]}
    jobs = sorted((f, v, layout) for f, v in wanted for layout in range(args.layouts))
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    try:
        counts = pool.map(lambda job: per_request(job[0], job[1], args.requests, job[2]), jobs)
        counted = dict(zip(jobs, counts, strict=True))
    finally:  # a failed child: report it now, not after every other job ran
        pool.shutdown(cancel_futures=True)
    print(
        f"python {sys.version.split()[0]}, instructions per request "
        f"({args.requests} counted; medians of {args.layouts} layouts)\n"
    )
    (print_hook_table if args.hook else print_adapter_table)(counted, args.layouts)
    return 0


#: What the tables are printed from: instructions per request by (framework, variant, layout).
Counted = dict[tuple[str, str, int], float]


def _median_and_each(ratios: list[float], fmt: str, unit: str = "") -> str:
    """A ratio's median over the layouts, then each layout's: ``1.60x (1.60, 1.60, 1.59)``."""
    each = ", ".join(format(r, fmt) for r in ratios)
    return f"{format(statistics.median(ratios), fmt)}{unit} ({each})"


def print_adapter_table(counted: Counted, layouts: int) -> None:
    """Each adapter's instructions above the bare app, against its floor's."""
    print(
        "| framework | bare | floor | deepsec | floor adds | deepsec adds "
        "| deepsec adds / floor adds: median (each layout) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    median = statistics.median
    for label, framework, bare, floor, ours in ROWS:
        b, f, o = (
            [counted[framework, v, layout] for layout in range(layouts)]
            for v in (bare, floor, ours)
        )
        floor_adds = [y - x for x, y in zip(b, f, strict=True)]
        ours_adds = [y - x for x, y in zip(b, o, strict=True)]
        ratios = [y / x for x, y in zip(floor_adds, ours_adds, strict=True)]
        print(
            f"| {label} | {median(b):,.0f} | {median(f):,.0f} | {median(o):,.0f} | "
            f"{median(floor_adds):+,.0f} | {median(ours_adds):+,.0f} | "
            f"{_median_and_each(ratios, '.2f', 'x')} |"
        )


def print_hook_table(counted: Counted, layouts: int) -> None:
    """The client's instructions per pooled request, against "by hand"."""
    print("| app (bench/hook.py) | client instructions | - by hand | / by hand (each layout) |")
    print("|---|---:|---:|---:|")
    median = statistics.median
    hand = [counted["hook", "by hand", layout] for layout in range(layouts)]
    for variant in HOOK_APPS:
        mine = [counted["hook", variant, layout] for layout in range(layouts)]
        above = median(y - x for x, y in zip(hand, mine, strict=True))
        ratios = [y / x for x, y in zip(hand, mine, strict=True)]
        print(
            f"| {variant} | {median(mine):,.0f} | {above:+,.0f} | "
            f"{_median_and_each(ratios, '.3f')} |"
        )


if __name__ == "__main__":
    sys.exit(main())

"""A fleet of worker processes asking for tokens at once (tests and benches).

:class:`Fleet` starts ``processes`` Python processes (``spawn``: nothing is
inherited but the environment) that stay up across rounds, so one test or
bench can run several cold starts without paying the start-up each time.  In
a round (:meth:`Fleet.run`) every process builds its token source from the
same ``end_user_sec_params`` with an empty in-process cache, waits at a
barrier with every other process, then ``threads`` threads (or asyncio
tasks) each ask once for the token of one identity.  The round returns each
call's latency and every error, so a caller can count identity-provider
calls (the provider's own request log) and failures.

``mode="plugin"`` calls python-oracledb's own ``azure_tokens`` plugin instead
(``REQUESTS_CA_BUNDLE`` must be set in the environment before the fleet
starts, for the plugin's MSAL to trust a local provider).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Fleet", "Round"]

Mode = Literal["deepsec", "plugin"]


@dataclass
class Round:
    """What one round measured, over every process."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Tokens taken from the shared cache (L2) instead of the provider.
    l2_hits: int = 0

    def pct(self, q: float) -> float:
        """The ``q`` quantile of the latencies, in seconds."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _get_fn(mode: Mode, params: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """(sync get, async get, source) for ``mode``; the cache is empty."""
    if mode == "plugin":
        from oracledb.plugins import azure_tokens

        def plugin_get(identity: str) -> str:
            token = azure_tokens.get_database_access_token(  # type: ignore[no-untyped-call]
                dict(params), identity
            )
            return str(token)

        return plugin_get, None, None

    from ..config import parse_end_user_sec_params
    from ..context import EndUserContext
    from ..tokens import token_source_for
    from .pytest_plugin import reset_token_state

    reset_token_state()
    source = token_source_for(parse_end_user_sec_params(dict(params)))

    def get(identity: str) -> str:
        return source.get_token(EndUserContext(identity))

    async def aget(identity: str) -> str:
        return await source.get_token_async(EndUserContext(identity))

    return get, aget, source


def _round(index: int, job: dict[str, Any], barrier: Any) -> tuple[list[float], list[str], int]:
    get, aget, source = _get_fn(job["mode"], job["params"])
    identities: Sequence[str] = job["identities"]
    threads: int = job["threads"]
    mine = [identities[(index * threads + i) % len(identities)] for i in range(threads)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def record(started: float, exc: BaseException | None) -> None:
        with lock:
            if exc is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    barrier.wait(timeout=120)  # every process is ready: start together
    if job["use_async"]:
        import asyncio

        async def task(identity: str, start: asyncio.Event) -> None:
            await start.wait()
            started = time.perf_counter()
            try:
                await aget(identity)
            except Exception as exc:
                record(started, exc)
            else:
                record(started, None)

        async def main() -> None:
            start = asyncio.Event()
            tasks = [asyncio.create_task(task(i, start)) for i in mine]
            await asyncio.sleep(0)
            start.set()
            await asyncio.gather(*tasks)

        asyncio.run(main())
    else:
        gate = threading.Barrier(threads)

        def worker(identity: str) -> None:
            gate.wait()
            started = time.perf_counter()
            try:
                get(identity)
            except Exception as exc:
                record(started, exc)
            else:
                record(started, None)

        workers = [threading.Thread(target=worker, args=(i,)) for i in mine]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    hits = getattr(getattr(source, "cache", None), "l2_hits", 0)
    return latencies, errors, int(hits)


def _child(index: int, jobs: Any, results: Any, barrier: Any) -> None:
    # Imported before the first round, so start-up is not part of a cold start.
    import msal  # noqa: F401

    from .. import config, tokens  # noqa: F401

    results.put(("ready", index, None))
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            results.put(("done", index, _round(index, job, barrier)))
        except BaseException as exc:
            results.put(("crashed", index, f"{type(exc).__name__}: {exc}"))


class Fleet:
    """``processes`` worker processes; use as a context manager."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        ctx = multiprocessing.get_context("spawn")
        self._barrier = ctx.Barrier(processes + 1)
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(processes)]
        self._procs = [
            ctx.Process(
                target=_child,
                args=(i, self._jobs[i], self._results, self._barrier),
                name=f"deepsec-fleet-{i}",
                daemon=True,
            )
            for i in range(processes)
        ]

    def __enter__(self) -> Fleet:
        for proc in self._procs:
            proc.start()
        for _ in self._procs:
            kind, index, detail = self._results.get(timeout=120)
            if kind != "ready":  # pragma: no cover - start-up failed
                raise RuntimeError(f"fleet process {index} failed to start: {detail}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        params: Mapping[str, Any],
        identities: Sequence[str],
        *,
        threads: int = 16,
        use_async: bool = False,
        mode: Mode = "deepsec",
        timeout: float = 120.0,
    ) -> Round:
        """One cold round: every process, ``threads`` callers each, started together."""
        job = {
            "mode": mode,
            "params": dict(params),
            "identities": list(identities),
            "threads": threads,
            "use_async": use_async,
        }
        for queue in self._jobs:
            queue.put(job)
        self._barrier.wait(timeout=timeout)
        result = Round()
        for _ in self._procs:
            kind, index, detail = self._results.get(timeout=timeout)
            if kind != "done":
                raise RuntimeError(f"fleet process {index} crashed: {detail}")
            latencies, errors, hits = detail
            result.latencies += latencies
            result.errors += errors
            result.l2_hits += hits
        return result

    def close(self) -> None:
        """Stop every process (each finishes its round first)."""
        for queue in self._jobs:
            queue.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():  # pragma: no cover - stuck: it is ours to end
                proc.kill()
                proc.join(timeout=5)

"""Celery end to end: a real Redis broker, a worker in its own process, the wire server.

The worker (``celery -A jobs_app worker``) is started once per pool kind
(prefork, threads) on a Redis database and queue of its own, with the wire
test server's DSN and CA passed in the environment; the test process
publishes with the same app.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "support"
SRC = HERE.parents[1] / "src"
for folder in (HERE, TESTS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

#: A Redis database no other test uses: the broker and result backend.
BROKER_DB = 11


@dataclass
class Worker:
    """A running worker process and what the test needs to talk to it."""

    pool: str
    proc: subprocess.Popen[bytes]
    logfile: Path
    jobs: ModuleType

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


@pytest.fixture(scope="session")
def jobs(redis_server: Any, oracle_server: Any) -> ModuleType:
    """The ``jobs_app`` module in the test process, pointed at Redis and the wire server."""
    os.environ["DEEPSEC_TEST_BROKER"] = redis_server.url_for(BROKER_DB)
    os.environ["DEEPSEC_TEST_DSN"] = oracle_server.dsn
    os.environ["DEEPSEC_TEST_CA"] = oracle_server.ca_pem_path
    os.environ["DEEPSEC_TEST_QUEUE"] = f"deepsec-tests-{uuid.uuid4().hex[:8]}"
    import jobs_app

    return jobs_app


def _wait_ready(worker: Worker, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"the {worker.pool} worker exited:\n{worker.log()[-3000:]}")
        if worker.logfile.exists() and " ready." in worker.log():
            return
        time.sleep(0.1)
    raise RuntimeError(f"the {worker.pool} worker did not start:\n{worker.log()[-3000:]}")


@pytest.fixture(scope="module", params=["prefork", "threads"])
def worker(
    request: pytest.FixtureRequest, jobs: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """``celery -A jobs_app worker`` with the prefork or threads pool, concurrency 4."""
    pool = request.param
    logfile = tmp_path_factory.mktemp(f"worker-{pool}") / "worker.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(TESTS), str(SRC), env.get("PYTHONPATH", "")]
    )
    cmd = [
        sys.executable, "-m", "celery", "-A", "jobs_app", "worker",
        "--pool", pool, "--concurrency", "4", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--hostname", f"{pool}-{uuid.uuid4().hex[:6]}@localhost",
        "--logfile", str(logfile),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    w = Worker(pool, proc, logfile, jobs)
    try:
        _wait_ready(w)
        yield w
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

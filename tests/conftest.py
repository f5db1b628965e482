"""Shared fixtures (Prefect's environment is set in the root conftest.py)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from samplepipe.testing import random_samples


@pytest.fixture(scope="session")
def prefect_harness():
    """One real Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def dask_client():
    """A real distributed cluster: two worker processes, no dashboard."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def make_samples(n, n_features=4, start=0, prefix="s", seed=0):
    """``n`` samples with keys ``<prefix>/<i>`` and ``target``/``offset``."""
    return random_samples(
        n, n_features=n_features, seed=seed, prefix=prefix, start=start
    )


@pytest.fixture
def samples():
    return make_samples(20)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server with its own PREFECT_HOME; yields its environment."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        DO_NOT_TRACK="1",
        # SQLite waits this long for a lock before answering 503 (default 10 s):
        # several flow runs and a serve process write at once in these tests
        PREFECT_SERVER_DATABASE_TIMEOUT="60",
    )
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        env["PREFECT_API_URL"] = url
        yield env
    finally:
        stop_process(proc)
        log.close()

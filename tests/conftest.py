"""Shared fixtures (Prefect's environment is set in the root conftest.py)."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.server import free_port, stop_process
from samplepipe.testing import CountingTransformer, local_cluster, random_samples

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def prefect_harness():
    """One real Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def session_dask_client():
    """A real distributed cluster: two worker processes, no dashboard.

    Not the process's default client (see `dask_client`).
    """
    with local_cluster(set_as_default=False) as client:
        yield client


@pytest.fixture
def dask_client(session_dask_client):
    """The session's cluster, Dask's current client within the test only.

    A default client would outlive the test: ``prefect_dask.DaskTaskRunner``
    takes ``distributed.get_client()``'s cluster over its ``address=``, so the
    flows of later tests would run on this cluster, not on the one they name.
    """
    with session_dask_client.as_current():
        yield session_dask_client


def make_samples(n, n_features=4, start=0, prefix="s", seed=0):
    """``n`` samples with keys ``<prefix>/<i>`` and ``target``/``offset``."""
    return random_samples(
        n, n_features=n_features, seed=seed, prefix=prefix, start=start
    )


@pytest.fixture
def samples():
    return make_samples(20)


def counting_checkpoint(tmp_path, offset=1.0, stateless=True, **kwargs):
    """A checkpointed `CountingTransformer` and its call log, under ``tmp_path``."""
    log = str(tmp_path / "calls.log")
    inner = SampleWrapper(
        CountingTransformer(offset=offset, log_path=log, stateless=stateless)
    )
    kwargs.setdefault("features_dir", str(tmp_path / "features"))
    return CheckpointWrapper(inner, **kwargs), log


def command_env(home, api_url=None):
    """Environment of a ``samplepipe`` subprocess with its own Prefect home.

    No Prefect setting of this process and no ``home`` on PYTHONPATH; with
    ``api_url``, the command uses that server instead of starting its own.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    paths = [
        p
        for p in env.pop("PYTHONPATH", "").split(os.pathsep)
        if p and os.path.abspath(p) != str(home)
    ]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(
        PREFECT_HOME=str(Path(home) / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        COLUMNS="200",
        # two cores shared with other jobs: give `samplepipe run`'s server time
        SAMPLEPIPE_SERVER_TIMEOUT="180",
    )
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


SCRIPT = (str(BIN / "samplepipe"),)  # the console script
PYTHON_M = (sys.executable, "-m", "samplepipe")


def samplepipe(*args, cwd, env=None, command=SCRIPT):
    """``samplepipe ARGS`` run as a user runs it: a ``CompletedProcess`` (text)."""
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def random_samples_options(n_train, n, seed, prefix):
    """Options of ``samplepipe run`` and ``serve`` for ``testing:random_samples``."""
    return [
        "--train-samples",
        "samplepipe.testing:random_samples",
        "--train-samples-kwargs",
        json.dumps({"n": n_train}),
        "--samples",
        "samplepipe.testing:random_samples",
        "--samples-kwargs",
        json.dumps({"n": n, "seed": seed, "prefix": prefix}),
    ]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server with its own PREFECT_HOME; yields its environment."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    with running_prefect_server(home) as (env, _):
        yield env


@contextlib.contextmanager
def running_prefect_server(home):
    """``prefect server start`` on 127.0.0.1 with PREFECT_HOME ``home``.

    Yields its environment (``PREFECT_API_URL`` included) and the process.
    """
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
        yield env, proc
    finally:
        stop_process(proc, timeout=30)
        log.close()

"""Flows on a Dask task runner report to the flow's own Prefect API.

On Prefect's embedded default (no ``PREFECT_API_URL``) each Dask worker
process used to start a Prefect server of its own. These tests run the flows
on real worker processes (a `LocalCluster`, and ``dask scheduler`` plus two
``dask worker`` commands) and check, through the Prefect client, that every
task run is recorded in the flow's server, and that no worker process has a
server among its children.
"""

import os
import subprocess

import numpy as np
import psutil
import pytest
from sklearn.pipeline import Pipeline

from samplepipe.testing import CountingTransformer, dask_command

from ._prefect_helpers import run, task_runs
from .conftest import free_port, make_samples, stop_process

pytestmark = [
    pytest.mark.slow,  # worker processes and Prefect flow runs
    # The session's test server is Prefect's default server here (the harness
    # registers it as such): alone or in the suite, the flows' API is one
    # server that outlives every cluster of these tests. Without it, Prefect
    # starts its own on a random port of 8000-8999 and trusts any answer
    # there: a server of another process on that port passes its check.
    pytest.mark.usefixtures("prefect_harness"),
]

N_SAMPLES = 40
BATCH = 10
STEPS = ("shift", "last")


@pytest.fixture
def embedded_api():
    """Prefect's embedded default: no PREFECT_API_URL, whatever ran before.

    The flow then talks to Prefect's default server, a subprocess of this
    process: here the session's test server (``prefect_harness``).
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings(
        # two cores shared with other jobs: give a server time to start
        {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180},
        restore_defaults={PREFECT_API_URL},
    ):
        assert PREFECT_API_URL.value() is None
        yield


def pipeline(log_path):
    return Pipeline(
        [
            (
                "shift",
                CountingTransformer(offset=1.0, stateless=True, log_path=str(log_path)),
            ),
            ("last", CountingTransformer(offset=-3.0, stateless=True)),
        ]
    )


def folders(tmp_path, name):
    return {
        "features_dir": str(tmp_path / name / "features"),
        "model_dir": str(tmp_path / name / "models"),
        "batch_size": BATCH,
    }


def calling_pids(log_path):
    """The process ids that logged a ``transform`` call in ``log_path``."""
    with open(log_path) as f:
        return {int(line.split()[2]) for line in f if line.startswith("transform")}


def prefect_servers_under(pids):
    """Command lines of Prefect servers among the descendants of ``pids``."""
    found = []
    for pid in pids:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                command = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "prefect.server" in command or "uvicorn" in command:
                found.append((child.pid, command))
    return found


def run_on_dask(tmp_path, address):
    """Transform with the thread runner, then on the cluster at ``address``.

    Returns the cluster's worker pids; checks the outputs, where the work ran,
    and what the flow's API recorded.
    """
    from prefect_dask import DaskTaskRunner

    from samplepipe.flows import transform_pipeline

    samples = make_samples(N_SAMPLES)
    expected = transform_pipeline(
        pipeline(tmp_path / "threads.log"), samples, **folders(tmp_path, "threads")
    )
    on_dask = transform_pipeline.with_options(
        task_runner=DaskTaskRunner(address=address)
    )
    state, flow_run_id = run(
        on_dask, pipeline(tmp_path / "dask.log"), samples, **folders(tmp_path, "dask")
    )
    assert state.is_completed(), state
    out = state.result()
    assert [s.key for s in out] == [s.key for s in samples]
    np.testing.assert_array_equal(
        np.stack([s.data for s in out]), np.stack([s.data for s in expected])
    )
    np.testing.assert_allclose(
        np.stack([s.data for s in out]), np.stack([s.data for s in samples]) - 2.0
    )

    from distributed import Client

    with Client(address) as client:
        worker_pids = set(client.run(os.getpid).values())
    assert len(worker_pids) == 2
    # the work ran in the worker processes, not in this one
    ran_on = calling_pids(tmp_path / "dask.log")
    assert ran_on and ran_on <= worker_pids

    runs = task_runs(flow_run_id)
    n_batches = N_SAMPLES // BATCH
    assert len(runs) == len(STEPS) * n_batches
    assert sorted(r.name for r in runs) == sorted(
        f"{step}.transform[{start}:{start + BATCH}]"
        for step in STEPS
        for start in range(0, N_SAMPLES, BATCH)
    )
    assert {r.state.name for r in runs} == {"Completed"}
    return worker_pids


@pytest.fixture
def local_cluster():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    ) as cluster:
        yield cluster


def test_local_cluster_workers_report_to_the_flows_server(
    tmp_path, embedded_api, local_cluster
):
    worker_pids = run_on_dask(tmp_path, local_cluster.scheduler_address)
    assert prefect_servers_under(worker_pids) == []


@pytest.fixture
def dask_cluster_commands(tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1.

    Yields the scheduler address and the worker commands' processes. The
    workers get this process's environment: no PREFECT_API_URL.
    """
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    log = open(tmp_path / "dask-commands.log", "w")
    scheduler = subprocess.Popen(
        dask_command("scheduler", "--port", str(port)),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    workers = []
    try:
        for _ in range(2):
            workers.append(
                subprocess.Popen(
                    dask_command(
                        "worker", address, "--nworkers", "1", "--nthreads", "1"
                    ),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        from distributed import Client

        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, workers
    finally:
        for proc in [*workers, scheduler]:
            stop_process(proc)
        log.close()


def test_dask_worker_commands_report_to_the_flows_server(
    tmp_path, embedded_api, dask_cluster_commands
):
    address, workers = dask_cluster_commands
    worker_pids = run_on_dask(tmp_path, address)
    # the worker processes are children of the commands' nannies
    assert worker_pids <= {
        p.pid for w in workers for p in psutil.Process(w.pid).children(recursive=True)
    }
    assert prefect_servers_under([w.pid for w in workers]) == []


def test_the_check_sees_a_server_that_a_worker_starts(embedded_api, local_cluster):
    """A flow that sends no API URL with its tasks: its workers start servers.

    What samplepipe's flows did before they set the URL for their tasks; it
    shows that `prefect_servers_under` finds such servers.
    """
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task
    def pid():
        return os.getpid()

    @flow(task_runner=DaskTaskRunner(address=local_cluster.scheduler_address))
    def plain_flow():
        return [pid.submit().result()]  # one worker starts one server

    ran_on = set(plain_flow())
    from distributed import Client

    with Client(local_cluster.scheduler_address) as client:
        worker_pids = set(client.run(os.getpid).values())
    assert ran_on and ran_on <= worker_pids
    servers = prefect_servers_under(ran_on)
    try:
        assert len(servers) == len(ran_on)
        assert all("prefect.server.api.server" in command for _, command in servers)
    finally:
        # they would outlive the workers, which the cluster kills at close
        for server_pid, _ in servers:
            stop_pid(server_pid)


def stop_pid(pid):
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout=30)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.NoSuchProcess:
        pass

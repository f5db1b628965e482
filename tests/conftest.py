"""Shared fixtures (Prefect's environment is set in the root conftest.py)."""

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

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    ) as cluster, Client(cluster) as client:
        yield client


def make_samples(n, n_features=4, start=0, prefix="s", seed=0):
    """``n`` samples with keys ``<prefix>/<i>`` and ``target``/``offset``."""
    return random_samples(n, n_features=n_features, seed=seed, prefix=prefix,
                          start=start)


@pytest.fixture
def samples():
    return make_samples(20)

"""Thread runner vs a two-worker Dask runner on a CPU-bound step.

``python bench/dask_runner.py [--samples 1000] [--ms 20] [--batch-size 100]
[--in-flight 2]``

One step burns about ``--ms`` milliseconds of pure-Python CPU per sample (it
holds the GIL, as much feature extraction does). The same `transform_pipeline`
runs on Prefect's default thread runner and on a `prefect_dask.DaskTaskRunner`
over a `LocalCluster` of two worker processes, both on Prefect's embedded
default (no ``PREFECT_API_URL``). The embedded server's start and the
cluster's start are one-off costs, timed apart. Each runner runs the flow
twice, into fresh folders: the first run pays the one-off imports (in the
workers, for Dask), the second is what a long-lived cluster gives. Prints the
figures and checks that no worker started a Prefect server of its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin


class BusyStep(TransformerMixin, BaseEstimator):
    """Adds 1; burns ``loops`` iterations of a Python loop per sample."""

    def __init__(self, loops=100_000):
        self.loops = loops

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        for _ in range(len(X)):
            total = 0
            for i in range(self.loops):
                total += i
        return X + 1.0

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


def loops_for(ms):
    """Loop iterations that take about ``ms`` milliseconds of CPU here."""
    step = BusyStep(loops=200_000)
    x = np.zeros((5, 1))
    t0 = time.process_time()  # CPU time: other jobs on the machine do not count
    step.transform(x)
    per_loop = (time.process_time() - t0) / (5 * 200_000)
    return max(1, int(ms / 1000 / per_loop))


def servers_under(pids):
    import psutil

    found = []
    for pid in pids:
        for child in psutil.Process(pid).children(recursive=True):
            command = " ".join(child.cmdline())
            if "prefect.server" in command or "uvicorn" in command:
                found.append(child.pid)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--ms", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--in-flight", type=int, default=2, help="max_batches_in_flight (both runs)"
    )
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]

    work = tempfile.mkdtemp(prefix="samplepipe-bench-dask-")
    os.environ["PREFECT_HOME"] = os.path.join(work, "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

    from distributed import Client, LocalCluster
    from prefect.client.orchestration import get_client
    from prefect_dask import DaskTaskRunner
    from sklearn.pipeline import Pipeline

    import samplepipe
    from samplepipe.flows import transform_pipeline
    from samplepipe.testing import random_samples

    loops = loops_for(args.ms)
    samples = random_samples(args.samples, n_features=8)

    def pipeline():
        return Pipeline([("busy", BusyStep(loops=loops))])

    def options(name):
        return {
            "features_dir": os.path.join(work, name, "features"),
            "model_dir": os.path.join(work, name, "models"),
            "batch_size": args.batch_size,
            "max_batches_in_flight": args.in_flight,
        }

    t0 = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.hello()
    server_start = time.perf_counter() - t0

    def timed(flow, name):
        t0 = time.perf_counter()
        out = flow(pipeline(), samples, **options(name))
        return out, time.perf_counter() - t0

    threads, thread_cold = timed(transform_pipeline, "threads-1")
    _, thread_warm = timed(transform_pipeline, "threads-2")

    t0 = time.perf_counter()
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    ) as cluster:
        cluster_start = time.perf_counter() - t0
        on_dask = transform_pipeline.with_options(
            task_runner=DaskTaskRunner(address=cluster.scheduler_address)
        )
        dask, dask_cold = timed(on_dask, "dask-1")
        _, dask_warm = timed(on_dask, "dask-2")
        with Client(cluster) as client:
            worker_servers = servers_under(client.run(os.getpid).values())

    same = np.array_equal(
        np.stack([s.data for s in threads]), np.stack([s.data for s in dask])
    )
    import dask as dask_module
    import prefect

    print(f"samplepipe {samplepipe.__file__}")
    print(
        f"Python {platform.python_version()}, Prefect {prefect.__version__}, "
        f"dask {dask_module.__version__}, {os.cpu_count()} cores, "
        f"load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print(
        f"{args.samples} samples x {args.ms:g} ms of CPU ({loops} loops), batches "
        f"of {args.batch_size}, max_batches_in_flight={args.in_flight}"
    )
    print(f"embedded Prefect server start (one-off): {server_start:.1f} s")
    print(f"LocalCluster start, 2 worker processes (one-off): {cluster_start:.1f} s")
    print(f"thread runner: first run {thread_cold:.1f} s, second {thread_warm:.1f} s")
    print(
        f"Dask runner, 2 workers: first run {dask_cold:.1f} s, second {dask_warm:.1f} s"
    )
    print(
        f"thread / Dask: first runs {thread_cold / dask_cold:.2f}x, "
        f"second runs {thread_warm / dask_warm:.2f}x"
    )
    print(
        f"outputs equal: {same}; Prefect servers started by workers: {worker_servers}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

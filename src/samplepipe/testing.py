"""Estimators that count their calls, for tests, benchmarks and demos.

They log each call to a file (one line per call: method and number of rows), so
calls are counted across threads, processes and Dask workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterable

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from ._factory import factory
from .storage.layouts import FilesLayout, LayoutContext


def _log(path, method, n):
    if path is None:
        return
    line = f"{method} {n} {os.getpid()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_calls(path, method=None):
    """``[(method, n_rows)]`` logged in ``path`` (only ``method`` if given)."""
    if not os.path.exists(path):
        return []
    calls = []
    with open(path) as f:
        for line in f:
            name, n, _ = line.split()
            if method is None or name == method:
                calls.append((name, int(n)))
    return calls


def count_rows(path, method):
    """Total rows that ``method`` was called on, according to the log."""
    return sum(n for _, n in read_calls(path, method))


class CountingTransformer(TransformerMixin, BaseEstimator):
    """Adds ``offset`` (and the mean seen in fit) to X; logs every call.

    Parameters
    ----------
    offset : float, default=0.0
    log_path : str, default=None
        File that receives one line per ``fit``/``transform`` call.
    fail_marker : str, default=None
        While this file exists, ``transform`` raises ``OSError`` when
        ``fail_on`` is None, else ``ValueError`` for inputs holding ``fail_on``.
    fail_on : float, default=None
        A value whose presence in the first column makes ``transform`` fail
        (while ``fail_marker`` exists, or always when ``fail_marker`` is None).
    stateless : bool, default=False
        If True, ``fit`` is not needed (scikit-learn ``requires_fit`` False).
    delay : float, default=0.0
        Seconds that ``transform`` sleeps per row before it logs its call and
        returns: makes a step slow enough to be interrupted mid-run (the
        production tests kill a worker while it runs).
    """

    def __init__(
        self,
        offset=0.0,
        log_path=None,
        fail_marker=None,
        fail_on=None,
        stateless=False,
        delay=0.0,
    ):
        self.offset = offset
        self.log_path = log_path
        self.fail_marker = fail_marker
        self.fail_on = fail_on
        self.stateless = stateless
        self.delay = delay

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=float)
        _log(self.log_path, "fit", len(X))
        self.mean_ = X.mean(axis=0) if len(X) else np.zeros(X.shape[1:])
        self.n_features_in_ = X.shape[1] if X.ndim > 1 else 1
        return self

    def _failing(self, X):
        marker = self.fail_marker is None or os.path.exists(self.fail_marker)
        if not marker:
            return None
        if self.fail_on is None:
            return OSError("transient failure (fail_marker exists)")
        if np.any(X.reshape(len(X), -1)[:, 0] == self.fail_on):
            return ValueError(f"bad input {self.fail_on}")
        return None

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        if self.fail_marker is not None or self.fail_on is not None:
            exc = self._failing(X)
            if exc is not None:
                raise exc
        if self.delay:
            time.sleep(self.delay * len(X))
        _log(self.log_path, "transform", len(X))
        shift = 0.0 if self.stateless else self.mean_
        return X + self.offset + shift

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = not self.stateless
        return tags


@factory
def counting_pipeline(log_dir, offset=1.0, fail_marker=None, fail_on=None, delay=0.0):
    """A three-step pipeline whose last two steps log to ``log_dir``.

    Importable by path (``"samplepipe.testing:counting_pipeline"``) for
    deployment tests. ``fail_marker``/``fail_on`` make step ``count`` fail and
    ``delay`` (seconds per row) makes it slow (see `CountingTransformer`).
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "count",
                CountingTransformer(
                    offset=offset,
                    log_path=os.path.join(log_dir, "count.log"),
                    fail_marker=fail_marker,
                    fail_on=fail_on,
                    delay=delay,
                ),
            ),
            ("last", CountingTransformer(log_path=os.path.join(log_dir, "last.log"))),
        ]
    )


@factory
def random_samples(n, n_features=4, seed=0, prefix="s", start=0):
    """``n`` samples of normal noise with keys ``<prefix>/<i>`` and a target."""
    from .wrappers import Sample

    rng = np.random.default_rng(seed)
    data = rng.normal(size=(start + n, n_features))
    return [
        Sample(data[i], key=f"{prefix}/{i:05d}", target=i % 2, offset=float(i))
        for i in range(start, start + n)
    ]


@contextlib.contextmanager
def local_cluster(n_workers=2, *, set_as_default=True):
    """A real Dask cluster on 127.0.0.1; yields its ``distributed.Client``.

    ``n_workers`` worker processes of one thread each, no dashboard: what the
    tests and ``bench/run.py`` run Dask on. With ``set_as_default=False`` the
    client is not the process's default: use ``client.as_current()`` where
    Dask should find it. A default client is found by every later
    ``distributed.get_client()`` of the process, and
    ``prefect_dask.DaskTaskRunner`` takes that client's cluster over its own
    ``address=``.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster, set_as_default=set_as_default) as client,
    ):
        yield client


def dask_command(role: str, *args: str) -> list[str]:
    """``dask scheduler``/``dask worker`` argv that listens on 127.0.0.1 only.

    No dashboard; its HTTP server (health, metrics), which runs even without
    one, on a free port of 127.0.0.1. ``args`` follow ``role``.
    """
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    return [
        dask,
        role,
        *args,
        "--host",
        "127.0.0.1",
        "--no-dashboard",
        "--dashboard-address",
        "127.0.0.1:0",
    ]


class NestedFilesLayout(FilesLayout):
    """A layout of one's own, for tests: ``<root>/<d>/<d>/<key><extension>``.

    One file per sample as `samplepipe.storage.FilesLayout` writes it, two
    folders deep by the first two hexadecimal digits of the SHA-1 of the key
    (after ``hash_fn``'s bucket, if any). Register it to use it by name:
    ``register_layout("nested", NestedFilesLayout)``.
    """

    @staticmethod
    def bucket(key: str) -> str:
        """The two folders of ``key``, e.g. ``"3/f"``."""
        digest = hashlib.sha1(key.encode()).hexdigest()
        return f"{digest[0]}/{digest[1]}"

    def names(self, context: LayoutContext, keys: Iterable[str]) -> list[str]:  # noqa: D102
        keys = list(keys)
        flat = super().names(context, keys)
        return [f"{self.bucket(k)}/{name}" for k, name in zip(keys, flat)]

    def key_of(self, context: LayoutContext, rel: str) -> str | None:  # noqa: D102
        parts = rel.split("/", 2)
        if len(parts) < 3:
            return None
        key = super().key_of(context, parts[2])
        if key is None or self.bucket(key) != "/".join(parts[:2]):
            return None
        return key

"""`RunOptions`: the options of the three flows and the command line, in one type."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from prefect.locking.protocol import LockManager

from .locks import lock_manager_from_url
from .storage import check_location
from .tasks import step_cache_policy
from .wrappers._method import PREDICTION_METHODS

__all__ = ["LAYOUTS", "ON_ERROR", "RunOptions"]

ON_ERROR = ("raise", "skip")
LAYOUTS = ("files", "shards")


@dataclass(frozen=True)
class RunOptions:
    """The options every flow passes down to its steps, checked once.

    Attributes
    ----------
    features_dir, model_dir : str
        Where checkpoints and models go: local folders or fsspec URLs.
    storage_options : dict or None
        Passed to fsspec for URLs (steps that have their own keep theirs).
    batch_size : int or None
        Samples per task run; None: about 32 MiB of input per batch (a
        stream's own batches).
    retries, retry_delay_seconds : int, float
        Retries of task runs that failed with a transient I/O error.
    max_batches_in_flight : int
        Batches of one step that run at once.
    method : str
        What the last step computes: ``"transform"``, ``"predict"``,
        ``"predict_proba"``, ``"predict_log_proba"``, ``"decision_function"``
        or ``"score_samples"``.
    on_error : str
        ``"raise"``: a flow run with failed samples fails (after every other
        sample is checkpointed); ``"skip"``: it completes, failed samples kept
        in line with ``data=None``.
    locks : str, LockManager or None
        Where the per-batch locks live: a lock manager object (any
        ``prefect.locking.protocol.LockManager``, such as
        `samplepipe.locks.CrashSafeFileLocks` or `samplepipe.locks.RedisLocks`),
        used as it is; or a URL (`samplepipe.locks.lock_manager_from_url`):
        None reads ``SAMPLEPIPE_LOCKS`` (unset: file locks on this host),
        ``"redis://host:port/db"`` for several hosts.
    layout : str
        ``"files"`` or ``"shards"``, for the steps the flow wraps itself.

    Notes
    -----
    Each field is a parameter of `fit_pipeline` (all but ``method``),
    `transform_pipeline` and `run_pipeline`, of the same name, type and
    default; each flow builds its options with ``RunOptions(name=name, ...)``
    and the command line passes `parameters` on (tests/test_options.py checks
    that they agree).

    Examples
    --------
    >>> options = RunOptions(features_dir="features", model_dir="models")
    >>> options.check().parameters(fit=True)["batch_size"] is None
    True
    >>> "method" in options.parameters(fit=True)
    False
    """

    features_dir: str
    model_dir: str
    batch_size: int | None = None
    retries: int = 2
    retry_delay_seconds: float = 1.0
    max_batches_in_flight: int = 2
    method: str = "transform"
    on_error: str = "raise"
    locks: str | LockManager | None = None
    storage_options: dict | None = None
    layout: str = "files"

    def check(self) -> RunOptions:
        """Raise `TypeError` or `ValueError` naming a bad option; return ``self``."""
        for name in ("batch_size", "max_batches_in_flight"):
            value = getattr(self, name)
            if value is None and name == "batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be an int >= 1, got {value!r}."
                raise ValueError(msg)
        if not isinstance(self.retries, int) or self.retries < 0:
            msg = f"retries must be an int >= 0, got {self.retries!r}."
            raise ValueError(msg)
        if self.method not in PREDICTION_METHODS:
            msg = f"method={self.method!r} is not one of {list(PREDICTION_METHODS)}."
            raise ValueError(msg)
        if isinstance(self.locks, str):
            lock_manager_from_url(self.locks)  # a clear error for a bad URL, now
        elif self.locks is not None and not isinstance(self.locks, LockManager):
            msg = (
                f"locks must be a lock URL (e.g. 'redis://host:6379/0'), a lock "
                "manager implementing prefect.locking.protocol.LockManager (e.g. "
                "samplepipe.locks.CrashSafeFileLocks('/a/folder')) or None, got "
                f"{type(self.locks).__name__} {self.locks!r}."
            )
            raise TypeError(msg)
        if self.on_error not in ON_ERROR:
            msg = f"on_error={self.on_error!r} is not one of {list(ON_ERROR)}."
            raise ValueError(msg)
        for name in ("features_dir", "model_dir"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike):
                msg = f"{name} must be a folder path or URL, got {value!r}."
                raise TypeError(msg)
            check_location(value, name, owner="the flow")
        if self.layout not in LAYOUTS:
            msg = f"layout={self.layout!r} is not one of {list(LAYOUTS)}."
            raise ValueError(msg)
        if self.storage_options is not None and not isinstance(
            self.storage_options, dict
        ):
            msg = (
                f"storage_options must be a dict of fsspec options, got "
                f"{self.storage_options!r}."
            )
            raise TypeError(msg)
        return self

    def parameters(self, *, fit: bool = False) -> dict[str, Any]:
        """These options as keyword arguments of a flow (or a deployment's parameters).

        ``fit=True``: for `fit_pipeline`, which has no ``method``. A deployment
        stores its parameters as JSON: there ``locks`` must be a URL or None.
        """
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not (fit and f.name == "method")
        }

    def task_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Task.with_options`` for the step tasks."""
        options: dict[str, Any] = {
            "retries": self.retries,
            "retry_delay_seconds": self.retry_delay_seconds,
        }
        if self.locks is not None:
            options["cache_policy"] = step_cache_policy(self.locks)
        return options

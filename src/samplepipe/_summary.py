"""What a flow run reports: its summary table and failed samples, as artifacts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from .server import api_for_tasks

__all__ = ["RunRecord", "summarized"]

T = TypeVar("T")


class RunRecord:
    """What one flow run accumulates: summary rows and failed samples.

    ``rows`` holds one dict per step and task (step, task, samples, computed,
    loaded, failed, cached batches, batches, seconds); ``failures`` one dict
    per failed sample (step, key, error).
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []


def summarized(title: str, work: Callable[..., T], *args: Any) -> T:
    """Run ``work(*args, run)``; publish the summary (and failures) even on failure.

    ``run`` is a new `RunRecord`; its rows become the table artifact
    ``samplepipe-summary`` and log lines, its failures the table artifact
    ``samplepipe-failures``.
    """
    run = RunRecord(title)
    with api_for_tasks():  # Dask workers report to this flow's API
        try:
            return work(*args, run)
        finally:
            if run.rows:
                _summary(run.rows, title)
            if run.failures:
                _failures_table(run.failures, title)


def _summary(rows: list[dict[str, Any]], title: str) -> None:
    create_table_artifact(
        table=rows,
        key="samplepipe-summary",
        description=f"# {title}\nPer step: samples, computed, loaded from "
        "checkpoints, failed (None outputs, kept in line), cached batches, seconds.",
    )
    logger = get_run_logger()
    for row in rows:
        logger.info(
            "%(step)s.%(task)s: %(samples)d samples, %(computed)d computed, "
            "%(loaded)d loaded, %(failed)d failed, "
            "%(cached batches)d/%(batches)d batches cached, "
            "%(seconds).2f s",
            row,
        )


def _failures_table(failures: list[dict[str, str]], title: str) -> None:
    create_table_artifact(
        table=failures,
        key="samplepipe-failures",
        description=f"# {title}: failed samples\nPer failed sample: step, key, error.",
    )

"""The run logs of a command: sent to its Prefect API before the API goes away.

Prefect sends run logs in the background (`prefect.logging.handlers.APILogWorker`,
a batch every ``PREFECT_LOGGING_TO_API_BATCH_INTERVAL`` seconds) and sends what
is left at interpreter exit. `samplepipe run` stops its temporary server before
that, so the last batch (the summary of the last step) met a closed port and
Prefect printed ``--- Error logging to API ---`` after the command's output.

`sending_run_logs` routes the logs of the block through `_CountingLogWorker`,
which keeps the count of logs the API did not take instead of printing, and at
the end of the block sends every queued log while the API still answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

from prefect.logging import handlers
from prefect.logging.handlers import APILogWorker

# How long the end of a block waits for the queued logs to be sent.
DRAIN_TIMEOUT = 30.0


@dataclasses.dataclass
class LostLogs:
    """Logs of the block that the API did not store: how many, the last error."""

    count: int = 0
    error: str = ""


_lost = LostLogs()
_lost_lock = threading.Lock()


class _CountingLogWorker(APILogWorker):
    """`APILogWorker` that counts the logs the API refused instead of printing.

    Prefect's worker writes ``--- Error logging to API ---`` and the error to
    stderr for every batch that fails; the command reports the count once.
    """

    async def _handle_batch(self, items: list[bytes]) -> None:
        # The request of Prefect's `APILogWorker._handle_batch` (3.x).
        try:
            await self._client.request(
                "POST",
                "/logs/",
                content=b"[" + b",".join(items) + b"]",
                headers={"Content-Type": "application/json"},
            )
        except Exception as exc:  # noqa: BLE001 - any failure loses the batch
            with _lost_lock:
                _lost.count += len(items)
                _lost.error = f"{type(exc).__name__}: {exc}"


def _send(log: dict[str, Any]) -> None:
    _CountingLogWorker.instance().send(log)


def drain(timeout: float = DRAIN_TIMEOUT) -> None:
    """Send every queued run log (and event) now; wait up to ``timeout`` s."""
    # The services share one registry: this drains Prefect's own log and
    # event workers too, so nothing is left for the exit-time drain.
    _CountingLogWorker.drain_all(timeout=timeout, at_exit=False)


@contextlib.contextmanager
def sending_run_logs(timeout: float = DRAIN_TIMEOUT) -> Iterator[LostLogs]:
    """Within the block, count lost run logs; at its end, send the queued ones.

    Yields a `LostLogs`, complete once the block has ended. Use it around
    the flow runs and inside the lifetime of the API they report to.
    """
    report = LostLogs()
    with _lost_lock:
        _lost.count, _lost.error = 0, ""
    handlers.set_api_log_sink(_send)
    try:
        yield report
    finally:
        try:
            drain(timeout)
        finally:
            handlers.set_api_log_sink(None)
            with _lost_lock:
                report.count, report.error = _lost.count, _lost.error

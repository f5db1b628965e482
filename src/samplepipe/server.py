"""A local Prefect API server for one command, that never outlives it.

`samplepipe run` uses `prefect_api` instead of Prefect's ephemeral server:

* with ``PREFECT_API_URL`` set, it checks that the API answers, and fails with a
  one-line message naming the URL when it does not;
* otherwise it starts Prefect's server (the same uvicorn app as Prefect's
  ephemeral mode) on 127.0.0.1, waits for it up to ``SAMPLEPIPE_SERVER_TIMEOUT``
  seconds (default 120) with a clear message when it is slower, sends its log
  (SQLite's ``database is locked`` retries included) to
  ``$PREFECT_HOME/samplepipe-server.log`` rather than the console, and stops it
  when the command ends. On Linux the kernel also stops it when the command is
  killed (``PR_SET_PDEATHSIG``), so a ``kill -9`` leaves no orphaned server.

Anonymous usage statistics stay off unless the user turns them on
(``PREFECT_SERVER_ANALYTICS_ENABLED``).

To keep one server running across commands (no start-up cost per run)::

    prefect server start &
    export PREFECT_API_URL=http://127.0.0.1:4200/api

`api_for_tasks` makes the task runs of a flow on Prefect's embedded default
report to the flow's own server, wherever they run (Dask workers).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import LostLogsWarning as LostLogsWarning
from .errors import ServerError as ServerError

DEFAULT_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: get SIGTERM when the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    os.setsid()  # Ctrl-C in the terminal goes to the command, which stops us


def free_port() -> int:
    """A TCP port of 127.0.0.1 that no socket holds now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Terminate ``process``; kill it if it has not exited after ``timeout`` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _healthy(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def startup_timeout() -> float:
    """``SAMPLEPIPE_SERVER_TIMEOUT`` in seconds (default 120)."""
    value = os.environ.get("SAMPLEPIPE_SERVER_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        msg = f"SAMPLEPIPE_SERVER_TIMEOUT={value!r} is not a number of seconds."
        raise ServerError(msg) from None


@contextlib.contextmanager
def prefect_api(
    timeout: float | None = None,
    *,
    on_lost_logs: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """The URL of a Prefect API for the duration of the block (see module notes).

    The run logs of the block are all sent before it ends, while the API
    still answers (a temporary server stops right after). Logs the API did
    not store (it went away during the block) make one message, given to
    ``on_lost_logs``, or warned as `LostLogsWarning` when it is None.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not _healthy(url.rstrip("/")):
            msg = (
                f"the Prefect API at PREFECT_API_URL={url} does not answer; start "
                "it (prefect server start) or unset PREFECT_API_URL to use a "
                "temporary local server."
            )
            raise ServerError(msg)
        with _run_logs_sent(f"PREFECT_API_URL={url}", on_lost_logs):
            yield url
        return
    timeout = startup_timeout() if timeout is None else timeout
    with (
        _local_server(timeout) as url,
        _run_logs_sent(f"the temporary server {url}", on_lost_logs),
    ):
        yield url


@contextlib.contextmanager
def _run_logs_sent(
    where: str, on_lost_logs: Callable[[str], None] | None
) -> Iterator[None]:
    """Send the block's run logs at its end; report those the API did not store."""
    from ._api_logs import sending_run_logs

    report = None
    try:
        with sending_run_logs() as report:
            yield
    finally:
        # also when the block raised: the logs were sent (or lost) by now
        if report is not None and report.count:
            _report_lost(report.count, report.error, where, on_lost_logs)


def _report_lost(
    count: int, error: str, where: str, on_lost_logs: Callable[[str], None] | None
) -> None:
    msg = (
        f"{count} run log line(s) were not stored by the Prefect API at "
        f"{where}, which stopped answering during the run ({error}); the "
        "run's logs on that server are incomplete. Keep the server running until "
        "the command ends (PREFECT_LOGGING_TO_API_ENABLED=false stops sending "
        "run logs)."
    )
    if on_lost_logs is None:
        warnings.warn(msg, LostLogsWarning, stacklevel=4)
    else:
        on_lost_logs(msg)


@contextlib.contextmanager
def _local_server(timeout: float) -> Iterator[str]:
    import prefect
    from prefect.settings import PREFECT_API_URL as API_URL
    from prefect.settings import PREFECT_HOME, temporary_settings

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "samplepipe-server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        # SQLite waits this long for a lock (Prefect's default, 10 s, gives
        # "database is locked" errors on a busy 2-core machine)
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url, timeout=1.0):
            if process.poll() is not None:
                msg = (
                    f"the local Prefect server exited with code {process.returncode} "
                    f"before answering; see {log_path}."
                )
                raise ServerError(msg)
            if time.monotonic() > deadline:
                msg = (
                    f"the local Prefect server did not answer within {timeout:g} s "
                    "(a busy machine?); set SAMPLEPIPE_SERVER_TIMEOUT to wait longer, "
                    "or keep one server running (prefect server start) and set "
                    f"PREFECT_API_URL. Its log: {log_path}."
                )
                raise ServerError(msg)
            time.sleep(0.2)
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings({API_URL: url}):
                yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        stop_process(process)


@contextlib.contextmanager
def api_for_tasks() -> Iterator[str | None]:
    """Within a flow run, send the URL of the flow's API with every task.

    Prefect sends its settings with each task submitted to another process
    (`prefect.context.serialize_context`; `prefect_dask.DaskTaskRunner` does).
    On Prefect's embedded default (no ``PREFECT_API_URL``) these settings name
    no API, so each Dask worker process started a Prefect server of its own
    (tens of seconds each) and sent its task runs there. Within this block the
    settings name the server of the flow run (a subprocess of this process on
    127.0.0.1), so the task runs of workers on this host report to it, and
    no worker starts a server.

    Workers on other hosts cannot reach 127.0.0.1: run a server they can
    reach (``prefect server start --host 0.0.0.0``) and set
    ``PREFECT_API_URL`` where the flow runs; the workers get it with each task.

    Yields
    ------
    str or None
        The URL set for the block; None when nothing was changed (outside a
        flow run, or with ``PREFECT_API_URL`` already set).
    """
    from prefect.client.base import ServerType
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    context = FlowRunContext.get()
    client: Any = context.client if context is not None else None
    if (
        PREFECT_API_URL.value()
        or client is None
        or client.server_type != ServerType.EPHEMERAL
    ):
        yield None
        return
    url = str(client.api_url).rstrip("/")
    with temporary_settings({PREFECT_API_URL: url}):
        yield url

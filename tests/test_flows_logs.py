"""The flows' log messages reach the Prefect API: the run page's Logs tab.

Per batch (computed, loaded, failed, the failed keys) and the summary per
step, read back through the Prefect client; from a flow called in Python and
from ``samplepipe run``.
"""

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from samplepipe import Sample
from samplepipe.testing import CountingTransformer

from ._prefect_helpers import run
from .conftest import (
    command_env,
    random_samples_options,
    running_prefect_server,
    samplepipe,
)

pytestmark = pytest.mark.slow  # Prefect flow runs, a command line run

BIN = Path(sys.executable).parent


def run_logs(flow_run_id, expected, timeout=60):
    """Messages logged for the flow run, once ``expected`` of them arrived.

    Logs are sent in the background in batches: wait for them (up to
    ``timeout`` seconds, so a failure shows what did arrive).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])
                ),
                sort=LogSort.TIMESTAMP_ASC,
            )
            if len(logs) >= expected or time.monotonic() > deadline:
                return logs
            time.sleep(0.5)


@pytest.fixture
def prefect_info_logs():
    """Prefect's default level, INFO (the tests' root conftest sets WARNING)."""
    import prefect.main  # noqa: F401 - its import (re)configures Prefect's loggers

    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("prefect_harness", "prefect_info_logs")
def test_batch_and_summary_messages_are_run_logs(tmp_path):
    from prefect.logging.handlers import APILogWorker

    from samplepipe.flows import transform_pipeline

    data = np.arange(20 * 3, dtype=float).reshape(20, 3)
    data[3, 0] = 999.0  # CountingTransformer(fail_on=999.0) fails on it
    samples = [Sample(x, key=f"s/{i:02d}") for i, x in enumerate(data)]
    pipeline = Pipeline(
        [("shift", CountingTransformer(offset=1.0, fail_on=999.0, stateless=True))]
    )
    state, flow_run_id = run(
        transform_pipeline,
        pipeline,
        samples,
        features_dir=str(tmp_path / "features"),
        model_dir=str(tmp_path / "models"),
        batch_size=10,
        on_error="skip",
    )
    assert state.is_completed()
    APILogWorker.drain_all(timeout=30)
    logs = run_logs(flow_run_id, expected=4)
    by_message = {log.message: log for log in logs}

    batches = [
        "shift[0:10]: computed 9, loaded 0 from checkpoints, 1 failed",
        "shift[10:20]: computed 10, loaded 0 from checkpoints, 0 failed",
    ]
    failed = "shift[0:10]: sample 's/03' failed: ValueError: bad input 999.0"
    for message in [*batches, failed]:
        assert message in by_message, [log.message for log in logs]
    # from the task runs, at their levels
    assert by_message[failed].level == logging.ERROR
    assert {by_message[m].level for m in batches} == {logging.INFO}
    assert None not in {by_message[m].task_run_id for m in [*batches, failed]}
    # the summary, from the flow run
    summary = [m for m in by_message if m.startswith("shift.transform: ")]
    assert len(summary) == 1, [log.message for log in logs]
    assert summary[0].startswith(
        "shift.transform: 20 samples, 19 computed, 0 loaded, 1 failed, "
        "0/2 batches cached, "
    )
    assert by_message[summary[0]].task_run_id is None


def test_the_command_sends_its_run_logs_and_keeps_the_console_quiet(
    tmp_path, prefect_server
):
    """``samplepipe run`` at Prefect's default log level, with an API to read."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {k: v for k, v in prefect_server.items() if k != "PREFECT_LOGGING_LEVEL"}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    features_dir = str(tmp_path / "features")
    result = subprocess.run(
        [
            str(BIN / "samplepipe"),
            "run",
            "--pipeline",
            "samplepipe.examples:demo_pipeline",
            "--features-dir",
            features_dir,
            "--model-dir",
            str(tmp_path / "models"),
            "--train-samples-kwargs",
            '{"subset": "train", "n": 200}',
            "--samples-kwargs",
            '{"subset": "test", "n": 100}',
            "--batch-size",
            "100",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # INFO logs would scroll over the progress bar: the console stays quiet
    assert "| INFO" not in result.stderr, result.stderr

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            flow_runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["run-pipeline"]))
            )
        [flow_run] = [
            r for r in flow_runs if r.parameters.get("features_dir") == features_dir
        ]
        # fit 3 steps; transform 2 train batches x 2 steps, 1 test batch x 3
        # steps: 10 task messages; then 8 summary rows
        logs = run_logs(flow_run.id, expected=18)
    messages = [log.message for log in logs]
    for message in [
        "scale: fitted",
        "pca[100:200]: computed 100, loaded 0 from checkpoints, 0 failed",
        "scores[0:100]: computed 100, loaded 0 from checkpoints, 0 failed",
    ]:
        assert message in messages, messages
    summary = [m for m in messages if m.startswith("scores.transform: ")]
    assert len(summary) == 1, messages
    assert summary[0].startswith(
        "scores.transform: 100 samples, 100 computed, 0 loaded, 0 failed, "
    )


# ---------------------------------------------------------------------------
# every run log is sent before the command's API goes away
# ---------------------------------------------------------------------------
READ_LOGS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort, LogSort
from samplepipe.server import prefect_api

with prefect_api(), get_client(sync_client=True) as client:
    runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC)
    out = []
    for run in runs:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
            sort=LogSort.TIMESTAMP_ASC,
        )
        out.append([run.state_name, [log.message for log in logs]])
json.dump(out, sys.stdout)
"""


def stored_runs(env):
    """``[(state name, [log messages])]`` of each flow run, newest first.

    Read through the Prefect client from the database the command's
    temporary server left in PREFECT_HOME, on a new temporary server.
    """
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, "-c", READ_LOGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def last_line(text):
    return text.rstrip("\n").rsplit("\n", 1)[-1]


def test_the_readme_command_ends_with_its_table_and_stores_every_log(tmp_path):
    # the README's first command, twice, on Prefect's embedded default
    env = command_env(tmp_path)
    first = samplepipe("run", cwd=tmp_path, env=env)
    second = samplepipe("run", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert second.returncode == 0, second.stdout + second.stderr
    assert first.stdout.endswith(
        "\nComputed 7791 step outputs; checkpoints in samplepipe-demo/features.\n"
    ), first.stdout
    assert second.stdout.endswith(
        "\nNothing computed: every step was loaded from its checkpoints.\n"
    ), second.stdout
    for result in (first, second):
        # stderr: the progress bars and nothing after them
        assert "Error logging to API" not in result.stderr, result.stderr
        assert last_line(result.stderr).startswith("transform: batches "), result.stderr
        assert result.stderr.count("\n") == 2, result.stderr

    runs = stored_runs(env)
    assert [state for state, _ in runs] == ["Completed", "Completed"]
    for (_, messages), computed in zip(runs, (0, 597), strict=True):
        # the run's last logs: the summary of the last step, its final state
        assert messages[-1] == "Finished in state Completed()", messages[-3:]
        assert messages[-2].startswith(
            f"scores.transform: 597 samples, {computed} computed, "
            f"{597 - computed} loaded, 0 failed, "
        ), messages[-3:]


def test_a_failed_run_ends_with_its_message_and_stores_every_log(tmp_path):
    env = command_env(tmp_path)
    (tmp_path / "fail").write_text("x")  # step "count" raises OSError while it exists
    result = samplepipe(
        "run",
        "samplepipe.testing:counting_pipeline",
        "--pipeline-kwargs",
        '{"log_dir": ".", "fail_marker": "fail"}',
        *random_samples_options(20, 20, seed=1, prefix="t"),
        "--retries",
        "0",
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Error logging to API" not in result.stderr, result.stderr
    assert last_line(result.stderr).startswith("FAILED at step count: "), result.stderr
    [(state, messages)] = stored_runs(env)
    assert state == "Failed"
    # the summary of the fit, logged as the run failed, and the run's very
    # last log (its final state) are stored
    assert any(m.startswith("count.fit: 20 samples, ") for m in messages), messages
    assert messages[-1].startswith("Finished in state Failed("), messages[-3:]


SLOW = (
    "samplepipe.testing:counting_pipeline",
    "--pipeline-kwargs",
    '{"log_dir": ".", "delay": 0.05}',
    *random_samples_options(200, 200, seed=1, prefix="t"),
    "--batch-size",
    "20",
)


def started(proc, path):
    """Wait until ``path`` exists (the run is computing) while ``proc`` runs."""
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)


def test_sigterm_ends_the_run_with_one_line_after_its_logs_are_sent(tmp_path):
    env = command_env(tmp_path)
    proc = subprocess.Popen(
        [str(BIN / "samplepipe"), "run", *SLOW],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started(proc, tmp_path / "count.log")  # step "count" is computing
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "Error logging to API" not in stderr
    assert last_line(stderr) == (
        "error: samplepipe run stopped by signal 15 (SIGTERM); the checkpoints "
        "written so far are kept: run it again to finish."
    ), stderr
    [(state, messages)] = stored_runs(env)
    assert state == "Crashed"
    # the run's very last logs, sent after the signal
    assert messages[-2].startswith("Crash detected! "), messages[-3:]
    assert messages[-1].startswith("Finished in state Crashed("), messages[-3:]


def test_a_server_gone_during_the_run_makes_one_warning(tmp_path):
    home = tmp_path / "server-home"
    home.mkdir()
    with running_prefect_server(home) as (server_env, server):
        env = command_env(tmp_path, server_env["PREFECT_API_URL"])
        # the client's retries with backoff (5 by default) only make the wait
        # for the same end longer: ~4 minutes here
        env["PREFECT_CLIENT_MAX_RETRIES"] = "0"
        proc = subprocess.Popen(
            [str(BIN / "samplepipe"), "run", *SLOW],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started(proc, tmp_path / "count.log")
        server.terminate()
        server.wait(timeout=60)
        _, stderr = proc.communicate(timeout=300)
    assert "Traceback" not in stderr and "Error logging to API" not in stderr, stderr
    assert stderr.count("warning: ") == 1, stderr
    assert "run log line(s) were not stored by the Prefect API at " in stderr
    assert proc.returncode == 1, stderr

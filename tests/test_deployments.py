"""Deployments against a real `prefect server start` on 127.0.0.1."""

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from samplepipe.testing import count_rows, random_samples

from .conftest import random_samples_options, stop_process

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,  # a real Prefect server and served deployments; minutes
    pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning"),
]


def _client(env):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._settings = temporary_settings(
                {PREFECT_API_URL: env["PREFECT_API_URL"]}
            )
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Ctx()


def _flow_runs(env, deployment_name):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client(env) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[deployment_name])
            )
        )


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _serve(env, tmp_path, name, extra):
    args = [
        str(BIN / "samplepipe"),
        "serve",
        "--name",
        name,
        "--pipeline",
        "samplepipe.testing:counting_pipeline",
        "--pipeline-kwargs",
        json.dumps(extra.pop("pipeline_kwargs")),
        *random_samples_options(300, 400, seed=3, prefix="test"),
        "--features-dir",
        str(tmp_path / "features"),
        "--model-dir",
        str(tmp_path / "models"),
        "--batch-size",
        "100",
        *[str(a) for a in extra.pop("args", [])],
    ]
    # the runner asks the server for due runs every second (default 10 s)
    env = {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = open(tmp_path / f"serve-{name}.log", "w")
    return subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )


def test_scheduled_run_completes_with_tasks_and_artifacts(prefect_server, tmp_path):
    server = prefect_server
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    # one run a minute: runs never pile up on a busy 2-core machine (each
    # scheduled run is a process of its own); the schedule starts 20 s from now
    # (by default it would start when serve starts, so the first run would be
    # a minute away)
    anchor = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=20)
    args = ["--interval", 60, "--anchor-date", anchor.isoformat()]
    proc = _serve(
        server,
        tmp_path,
        "sched",
        {"pipeline_kwargs": {"log_dir": str(tmp_path)}, "args": args},
    )
    try:
        completed = _wait(
            lambda: [
                r for r in _flow_runs(server, "sched-run") if r.state.is_completed()
            ],
            240,
            "a completed scheduled run",
        )
    finally:
        stop_process(proc, timeout=30)
    flow_run = completed[0]
    assert flow_run.auto_scheduled
    # on the anchored schedule: the anchor plus a whole number of minutes
    offset = (flow_run.expected_start_time - anchor).total_seconds()
    assert offset >= 0 and offset % 60 == 0, flow_run.expected_start_time
    # (a busy SQLite server may drop a late task-run event: the files and the
    # call logs below show that every batch ran)
    expected = {"count.fit", "count.transform[0:100]"}
    with _client(server) as client:

        def task_run_names():  # task run states reach the API a little later
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            )
            return runs if expected <= {r.name for r in runs} else None

        runs = _wait(task_run_names, 60, "the run's task runs")
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])
            )
        )
    names = {r.name for r in runs}
    assert expected <= names
    assert {a.type for a in found} >= {"table", "progress"}
    assert count_rows(tmp_path / "last.log", "transform") >= 400


def test_a_failed_run_retried_through_the_api_computes_only_the_failed_batch(
    prefect_server, tmp_path
):
    server = prefect_server
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    train = random_samples(300)
    test = random_samples(400, seed=3, prefix="test")
    scaler = StandardScaler().fit(np.stack([s.data for s in train]))
    bad = float(scaler.transform(np.stack([s.data for s in test]))[250, 0])
    marker = tmp_path / "fail"
    kwargs = {"log_dir": str(tmp_path), "fail_marker": str(marker), "fail_on": bad}
    proc = _serve(server, tmp_path, "retry", {"pipeline_kwargs": kwargs})
    try:
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            _wait(
                lambda: (
                    {"retry-fit", "retry-transform"}
                    <= {d.name for d in _deployments(server)}
                ),
                300,  # starting serve imports Prefect: slow on a busy machine
                "served deployments",
            )
            fit = run_deployment("fit-pipeline/retry-fit", timeout=180, poll_interval=1)
            assert fit.state.is_completed(), fit.state
            marker.write_text("x")
            before = count_rows(tmp_path / "count.log", "transform")
            failed = run_deployment(
                "transform-pipeline/retry-transform", timeout=180, poll_interval=1
            )
            assert failed.state.is_failed(), failed.state
            # every sample but the bad one is computed (its batch is bisected)
            assert count_rows(tmp_path / "count.log", "transform") - before == 399
            marker.unlink()
            with _client(server) as client:  # what the UI's Retry button does
                client.set_flow_run_state(
                    failed.id, Scheduled(name="AwaitingRetry"), force=True
                )
            done = _wait(
                lambda: [
                    r
                    for r in _flow_runs(server, "retry-transform")
                    if r.id == failed.id and r.state.is_completed()
                ],
                180,
                "the retried run",
            )
    finally:
        stop_process(proc, timeout=30)
    assert done[0].run_count >= 2
    assert count_rows(tmp_path / "count.log", "transform") - before == 400


def _deployments(env):
    with _client(env) as client:
        return client.read_deployments()


def test_prefect_deploy_all_registers_the_deployments(prefect_server, tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    server = prefect_server
    with _client(server) as client:  # as `prefect work-pool create --type process`
        client.create_work_pool(
            WorkPoolCreate(
                name="samplepipe-process",
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
        )
    result = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
        env=server,
        cwd=REPO / "deployments",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    deployments = {d.name: d for d in _deployments(server)}
    assert {
        "samplepipe-pool-run",
        "samplepipe-pool-fit",
        "samplepipe-pool-transform",
    } <= set(deployments)
    # samplepipe serve's deployments (samplepipe-demo-*) are left alone
    assert not {n for n in deployments if n.startswith("samplepipe-demo-")}
    run = deployments["samplepipe-pool-run"]
    assert run.work_pool_name == "samplepipe-process"
    assert run.entrypoint == "flows.py:run_pipeline"
    assert run.parameters["samples_kwargs"] == {"subset": "test"}
    assert [s.schedule.cron for s in run.schedules] == ["0 2 * * *"]


def test_serve_and_prefect_yaml_never_share_a_deployment_name():
    import inspect

    import yaml

    from samplepipe import cli

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    from_yaml = {d["name"] for d in spec["deployments"]}
    production = yaml.safe_load((REPO / "deployments" / "production.yaml").read_text())
    from_production = {d["name"] for d in production["deployments"]}
    default = inspect.signature(cli.serve).parameters["name"].default
    from_serve = {f"{default}-{kind}" for kind in ("fit", "transform", "run")}
    assert len(from_yaml) == len(from_production) == len(from_serve) == 3
    assert not from_yaml & from_serve
    assert not from_production & (from_serve | from_yaml)

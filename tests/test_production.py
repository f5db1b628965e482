"""The production stack: Prefect server on PostgreSQL, a process pool, two workers.

One PostgreSQL cluster, one `prefect server start`, one work pool and two
`prefect worker start` processes serve the whole module (module-scoped, always
stopped, also on failure). The deployments come from
``deployments/production.yaml``; runs use ``samplepipe.testing``'s factories.
The worker-kill tests start a replacement for each worker they kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from samplepipe.testing import count_rows

from .conftest import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
POOL = "samplepipe-prod"
WORKERS = ("prod-worker-1", "prod-worker-2")
PROD = {"samplepipe-prod-run", "samplepipe-prod-fit", "samplepipe-prod-transform"}
PG_TOOLS = ("initdb", "pg_ctl", "createdb")
INSTALL_HINT = (
    "The production tests start their own PostgreSQL and need its server binaries "
    "(initdb, pg_ctl, createdb), which were not found in $SAMPLEPIPE_PG_BIN, "
    "/usr/lib/postgresql/*/bin or on PATH. Install them: `apt-get install "
    "postgresql-15` (Debian/Ubuntu), or set SAMPLEPIPE_PG_BIN to their folder."
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning"),
]


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
def _children():
    """``{ppid: [pid, ...]}`` of every process on this host (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        ppid = int(text.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    return children


def _tree(pid):
    """``pid`` and all its descendants, parents first."""
    children = _children()
    found, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _alive(pid):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rpartition(")")[2].split()[0] != "Z"  # a zombie is dead


def _signal(pids, sig):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_dead(pids, timeout):
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _stop_tree(proc, timeout=20):
    """Stop ``proc`` and every process it started (flow runs have their own
    sessions, so a signal to the process group would miss them)."""
    if proc.poll() is not None:
        return  # reaped: its PID may belong to another process by now
    pids = _tree(proc.pid)
    _signal(pids, signal.SIGTERM)
    _signal(_wait_dead(pids, timeout), signal.SIGKILL)
    proc.wait(timeout=10)
    _wait_dead(pids, 10)


def _start(args, env, log_path, **kwargs):
    log = open(log_path, "w")
    try:
        proc = subprocess.Popen(
            [str(a) for a in args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    finally:
        log.close()  # the child holds its own copy
    return proc


def _wait(predicate, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------
def _pg_bin():
    folders = [os.environ.get("SAMPLEPIPE_PG_BIN")]
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    folders += [os.path.dirname(shutil.which("initdb") or "")]
    for folder in filter(None, folders):
        if all(os.access(os.path.join(folder, t), os.X_OK) for t in PG_TOOLS):
            return Path(folder)
    pytest.fail(INSTALL_HINT, pytrace=False)


def _pg_user():
    """``(prefix, uid)``: PostgreSQL refuses to run as root, so root runs it as
    the OS user ``postgres`` (created here if missing)."""
    if os.geteuid() != 0:
        return [], os.geteuid()
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "postgres"],
            check=False,  # 9: created meanwhile by someone else
            capture_output=True,
        )
    return ["runuser", "-u", "postgres", "--"], pwd.getpwnam("postgres").pw_uid


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1; yields its asyncpg URL."""
    pg_bin = _pg_bin()
    as_pg, uid = _pg_user()
    # Not under pytest's tmp_path: its parents are private to root.
    root = Path(tempfile.mkdtemp(prefix="samplepipe-pg-"))
    os.chown(root, uid, -1)
    data, log, port = root / "data", root / "postgres.log", free_port()

    def pg(tool, *args):
        return subprocess.run(
            [*as_pg, str(pg_bin / tool), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=root,
        )

    steps = [
        ("initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"),
        (
            "pg_ctl",
            *("-D", data, "-l", log, "-w", "-t", "60", "start", "-o"),
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200",
        ),
        ("createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "prefect"),
    ]
    try:
        for step in steps:
            result = pg(*step)
            if result.returncode:
                extra = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"{result.args}: {result.stderr}{extra}")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        try:
            if (data / "postmaster.pid").exists():
                pg("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _sql(url, query):
    """Rows of ``query`` on the server's database, read directly."""
    import asyncpg

    async def fetch():
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


# ---------------------------------------------------------------------------
# the stack
# ---------------------------------------------------------------------------
class Stack:
    """The running stack: environment, folders, workers and their log files."""

    def __init__(self, env, root, db_url, cleanup):
        self.env = env
        self.root = root
        self.db_url = db_url
        self.data = root / "data"
        self.workers: dict[str, subprocess.Popen] = {}  # the live ones
        self.started: list[str] = []
        self._cleanup = cleanup

    def client(self):
        return _client(self.env["PREFECT_API_URL"])

    def start_worker(self, name):
        """``prefect worker start`` (stopped with the stack), logging to <name>.log."""
        proc = _start(
            [BIN / "prefect", "worker", "start", "--pool", POOL, "--name", name]
            + ["--limit", "2"],
            self.env,
            self.root / f"{name}.log",
            cwd=self.root,
        )
        self._cleanup.callback(_stop_tree, proc)
        self.workers[name] = proc
        self.started.append(name)

    def wait_online(self, names, timeout=90):
        def online():
            with self.client() as client:
                workers = client.read_workers_for_work_pool(POOL)
            return {w.name for w in workers if w.status == "ONLINE"} >= set(names)

        _wait(online, timeout, f"workers {sorted(names)} online")

    def logs(self):
        return {p.name: p.read_text() for p in sorted(self.root.glob("*.log"))}


@contextlib.contextmanager
def _client(url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: url}),
        get_client(sync_client=True) as client,
    ):
        yield client


def _prefect(stack, *args, **kwargs):
    result = subprocess.run(
        [str(BIN / "prefect"), *map(str, args)],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=180,
        **kwargs,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """Server on PostgreSQL, pool ``samplepipe-prod``, its deployments, two workers."""
    root = tmp_path_factory.mktemp("production")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_WORKER_QUERY_SECONDS="2",
        SAMPLEPIPE_DATA=str(root / "data"),
    )
    server_env = dict(env, PREFECT_API_DATABASE_CONNECTION_URL=postgres)
    server_env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    url = f"http://127.0.0.1:{port}/api"
    with contextlib.ExitStack() as cleanup:
        server = _start(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
            server_env,
            root / "server.log",
            cwd=root,
        )
        cleanup.callback(_stop_tree, server)

        def healthy():
            if server.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health", timeout=2).status_code == 200

        _wait(healthy, 150, "the Prefect server on PostgreSQL")
        env["PREFECT_API_URL"] = url
        result = Stack(env, root, postgres, cleanup)
        _prefect(result, "work-pool", "create", POOL, "--type", "process")
        for name in WORKERS:  # they start while the deployments are made
            result.start_worker(name)
        _prefect(
            result,
            *("--no-prompt", "deploy", "--prefect-file", "production.yaml", "--all"),
            cwd=REPO / "deployments",
        )
        result.wait_online(WORKERS)
        yield result


def _params(log_dir, **overrides):
    """Parameters of a counting run (JSON), on top of the deployment's."""
    params = {
        "pipeline": "samplepipe.testing:counting_pipeline",
        "pipeline_kwargs": {"log_dir": str(log_dir)},
        "train_samples": "samplepipe.testing:random_samples",
        "train_samples_kwargs": {"n": 100, "seed": 1, "prefix": "train"},
        "samples": "samplepipe.testing:random_samples",
        "batch_size": 50,
    }
    params.update(overrides)
    return params


def _start_runs(stack, params_list, deployment="samplepipe-prod-run"):
    with stack.client() as client:
        dep = client.read_deployment_by_name(f"run-pipeline/{deployment}")
        return [
            client.create_flow_run_from_deployment(dep.id, parameters=p).id
            for p in params_list
        ]


def _read_runs(stack, ids):
    with stack.client() as client:
        return [client.read_flow_run(i) for i in ids]


def _wait_final(stack, ids, timeout):
    def final():
        runs = _read_runs(stack, ids)
        return runs if all(r.state.is_final() for r in runs) else None

    return _wait(final, timeout, f"{len(ids)} flow runs to finish", interval=1)


def _workers_of(stack, run):
    """Names of the workers that started ``run``'s process (from their logs).

    Every worker may try to submit a run ("submitting flow run <id>"); the
    server lets one of them through, which logs "submitted to infrastructure".
    """
    needle = f"Flow run '{run.name}' submitted to infrastructure"
    return {
        name
        for name in stack.started
        if needle in (stack.root / f"{name}.log").read_text(errors="replace")
    }


def _worker_running(stack, run):
    """The name of the worker whose process tree holds ``run``'s process."""
    pid = int(str(run.infrastructure_pid).rpartition(":")[2])
    found = [n for n, w in stack.workers.items() if pid in _tree(w.pid)]
    assert len(found) == 1, (run.infrastructure_pid, found)
    return found[0]


def _assert_no_database_locked(stack):
    for name, text in stack.logs().items():
        assert "database is locked" not in text, name


def _checkpoints(features, step):
    """Finished checkpoints of ``step`` (temporary files start with a dot)."""
    return len(glob.glob(str(features / step / "**" / "*.h5"), recursive=True))


def _seconds(run):
    return round(run.total_run_time.total_seconds(), 1)


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
def test_the_stack_serves_the_production_deployments_from_postgresql(stack):
    with stack.client() as client:
        pool = client.read_work_pool(POOL)
        deployments = {d.name: d for d in client.read_deployments()}
    assert pool.type == "process"
    assert set(deployments) == PROD  # and no samplepipe-demo-*
    run = deployments["samplepipe-prod-run"]
    assert run.work_pool_name == POOL
    assert run.entrypoint == "flows.py:run_pipeline"
    assert run.parameters["features_dir"] == f"{stack.data}/features"
    assert run.parameters["model_dir"] == f"{stack.data}/models"
    # What the API answers is what PostgreSQL holds.
    assert set(_sql(stack.db_url, "SELECT name FROM deployment")) == {
        (name,) for name in PROD
    }


def test_four_concurrent_runs_over_overlapping_samples_compute_each_batch_once(
    stack, tmp_path
):
    # Runs i = 0..3 transform test samples [50 i, 50 i + 200): 350 distinct,
    # aligned on batches of 50, so that overlapping batches share a cache key.
    params = [
        _params(
            tmp_path,
            samples_kwargs={"n": 200, "start": 50 * i, "seed": 2, "prefix": "test"},
        )
        for i in range(4)
    ]
    t0 = time.monotonic()
    ids = _start_runs(stack, params)
    runs = _wait_final(stack, ids, 200)
    wall = time.monotonic() - t0
    print(
        f"\nfour concurrent runs: {wall:.1f} s wall, run times "
        f"{[_seconds(r) for r in runs]} s, workers "
        f"{[sorted(_workers_of(stack, r)) for r in runs]}"
    )
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 4, [
        r.state for r in runs
    ]
    n_train, n_test = 100, 350
    # Each fit once, each training batch once, each test batch once.
    assert count_rows(tmp_path / "count.log", "fit") == n_train
    assert count_rows(tmp_path / "last.log", "fit") == n_train
    assert count_rows(tmp_path / "count.log", "transform") == n_train + n_test
    assert count_rows(tmp_path / "last.log", "transform") == n_test
    assert _checkpoints(stack.data / "features", "last") == n_test
    # Both workers took runs (each may hold two at once: --limit 2).
    workers = [_workers_of(stack, r) for r in runs]
    assert all(len(w) == 1 for w in workers), workers
    assert set().union(*workers) == set(WORKERS)
    assert _sql(
        stack.db_url,
        "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED' "
        f"AND id IN ({', '.join(repr(str(i)) for i in ids)})",
    ) == [(4,)]
    _assert_no_database_locked(stack)


@pytest.mark.parametrize("kill", ["worker", "worker-and-run"])
def test_a_killed_worker_leaves_a_run_that_a_retry_finishes_computing_only_the_rest(
    stack, tmp_path, kill
):
    """SIGKILL the worker running a slow run: alone ("worker"), or with the run's
    process, as when its machine is lost ("worker-and-run"). A replacement worker
    starts; the run, set to Scheduled as the UI's Retry does, computes only what
    has no checkpoint yet."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.states import Scheduled

    features = tmp_path / "features"
    n_train, n_test, delay = 50, 400, 0.02  # step `count`: 1 s per batch of 50
    params = _params(
        tmp_path,
        pipeline_kwargs={"log_dir": str(tmp_path), "delay": delay},
        train_samples_kwargs={"n": n_train, "seed": 1, "prefix": "train"},
        samples_kwargs={"n": n_test, "seed": 4, "prefix": "test"},
        features_dir=str(features),
        model_dir=str(tmp_path / "models"),
    )
    count_log, last_log = tmp_path / "count.log", tmp_path / "last.log"
    [run_id] = _start_runs(stack, [params])
    # Kill once `count` has checkpointed two test batches (of eight).
    _wait(
        lambda: _checkpoints(features, "count") >= n_train + 100,
        120,
        "step count to checkpoint 100 test samples",
        interval=0.05,
    )
    [run] = _read_runs(stack, [run_id])
    name = _worker_running(stack, run)
    worker = stack.workers.pop(name)
    pids = _tree(worker.pid)  # the worker and the run's process
    _signal(pids if kill == "worker-and-run" else [worker.pid], signal.SIGKILL)
    worker.wait(timeout=10)
    t_kill = time.monotonic()
    stack.start_worker(f"{name}-after-{kill}")
    # A run whose worker died stops on its own (the finished batches checkpointed).
    assert not _wait_dead(pids, 60), "the run's process outlived its worker"
    orphan_seconds = time.monotonic() - t_kill
    logged = {
        "count": count_rows(count_log, "transform"),
        "last": count_rows(last_log, "transform"),
    }
    saved = {step: _checkpoints(features, step) for step in ("count", "last")}
    missing = {
        "count": n_train + n_test - saved["count"],
        "last": n_test - saved["last"],
    }
    [killed] = _read_runs(stack, [run_id])
    if kill == "worker-and-run":
        assert killed.state.is_running(), killed.state  # nobody told the server
    else:
        assert not killed.state.is_completed(), killed.state
    assert 0 < missing["count"] < n_test

    # What the UI's Retry does; another worker picks the run up.
    t0 = time.monotonic()
    with stack.client() as client:
        client.set_flow_run_state(run_id, Scheduled(name="AwaitingRetry"), force=True)
    [done] = _wait_final(stack, [run_id], 180)
    retry_wall = time.monotonic() - t0
    assert done.state.is_completed(), done.state
    assert done.run_count >= 2
    workers = _workers_of(stack, done)
    assert name in workers and len(workers) == 2, workers  # killed one, then another
    computed = {
        "count": count_rows(count_log, "transform") - logged["count"],
        "last": count_rows(last_log, "transform") - logged["last"],
    }
    print(
        f"\nkill {kill}: {name} killed; run {killed.state.name} after it, its "
        f"process gone after {orphan_seconds:.1f} s; checkpoints then {saved}, "
        f"missing {missing}; the retry ({sorted(workers - {name})}) computed "
        f"{computed} in {retry_wall:.1f} s"
    )
    assert computed == missing
    assert count_rows(count_log, "fit") == n_train  # the model was reused
    # The outputs are complete: every checkpoint, and the run's own summary.
    assert _checkpoints(features, "count") == n_train + n_test
    assert _checkpoints(features, "last") == n_test
    with stack.client() as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
        )
    # The retry's summary (with "worker", the killed attempt also wrote one).
    summary = max(
        (a for a in artifacts if a.key == "samplepipe-summary"), key=lambda a: a.created
    )
    rows = {(r["step"], r["task"]): r for r in _table(summary.data)}
    last = rows["last", "transform"]
    assert (last["samples"], last["failed"]) == (n_test, 0)
    assert last["computed"] + last["loaded"] == n_test
    _assert_no_database_locked(stack)


def _table(data):
    import json

    return json.loads(data) if isinstance(data, str) else data

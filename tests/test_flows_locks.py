"""The flows' ``locks=`` option: a lock manager object, or a URL, used for real runs."""

import re
import stat
import uuid

import numpy as np
import pytest
import redis
from prefect.client.orchestration import get_client
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from samplepipe.flows import RunOptions, summarize_parameter
from samplepipe.locks import CrashSafeFileLocks, RedisLocks
from samplepipe.testing import CountingTransformer

from ._prefect_helpers import run, task_runs
from .conftest import make_samples
from .test_locks import redis_url  # noqa: F401 - the session's Redis server

pytestmark = [
    pytest.mark.slow,  # Prefect flow runs
    pytest.mark.usefixtures("prefect_harness"),
]

N, BATCH = 40, 10  # 4 batches per step


class RecordingFileLocks(CrashSafeFileLocks):
    """Real file locks that also record who took and released which key."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken, self.released = [], []

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        got = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if got:
            self.taken.append((key, self.lock_path(key).exists()))
        return got

    def release_lock(self, key, holder):
        super().release_lock(key, holder)
        self.released.append(key)


class RecordingRedisLocks(RedisLocks):
    """Real Redis locks that also record the Redis keys they held."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken = []

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        got = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if got:
            self.taken.append((key, self._client.get(self._redis_key(key))))
        return got


def pipeline(tmp_path):
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("count", CountingTransformer(log_path=str(tmp_path / "count.log"))),
        ]
    )


def folders(tmp_path):
    return {
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": BATCH,
    }


def stored_parameters(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).parameters


def test_a_lock_manager_object_locks_every_task_run(tmp_path):
    from samplepipe.flows import run_pipeline

    folder = tmp_path / "my-locks"
    locks = RecordingFileLocks(folder)
    train, test = make_samples(N), make_samples(N, seed=1, prefix="t")
    state, flow_run_id = run(
        run_pipeline, pipeline(tmp_path), train, test, locks=locks, **folders(tmp_path)
    )
    assert state.is_completed()
    runs = task_runs(flow_run_id)
    # fit: scale's fit, its 4 batches, count's fit; transform: 2 x 4 batches
    assert len(runs) == 14
    # The object given was used, not a copy: each task run took its lock here,
    # as a lock file in the folder given, and released it.
    assert len(locks.taken) == 14
    assert all(file_existed for _, file_existed in locks.taken)
    assert sorted(locks.released) == sorted(key for key, _ in locks.taken)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert list(folder.iterdir()) == []  # all released
    # Prefect stores the manager's repr as the flow run's parameter.
    assert stored_parameters(flow_run_id)["locks"] == f"RecordingFileLocks('{folder}')"


def test_a_cached_run_takes_its_locks_from_the_given_manager_too(tmp_path):
    from samplepipe.flows import fit_pipeline, transform_pipeline

    train = make_samples(N)
    fit_pipeline(pipeline(tmp_path), train, **folders(tmp_path))
    first = RecordingFileLocks(tmp_path / "first")
    out = transform_pipeline(
        pipeline(tmp_path), train, locks=first, **folders(tmp_path)
    )
    second = RecordingFileLocks(tmp_path / "second")
    again = transform_pipeline(
        pipeline(tmp_path), train, locks=second, **folders(tmp_path)
    )
    np.testing.assert_array_equal(
        np.stack([s.data for s in out]), np.stack([s.data for s in again])
    )
    # The same 8 batches, so the same cache keys, locked in each run's own folder.
    assert len(first.taken) == 8
    assert sorted(k for k, _ in second.taken) == sorted(k for k, _ in first.taken)


def test_a_lock_url_string_still_works(tmp_path):
    from samplepipe.flows import fit_pipeline

    folder = tmp_path / "url locks"
    state, _ = run(
        fit_pipeline,
        pipeline(tmp_path),
        make_samples(N),
        locks=folder.as_uri(),
        **folders(tmp_path),
    )
    assert state.is_completed()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # created by the run


def test_a_redis_lock_manager_object_locks_in_redis(tmp_path, redis_url):  # noqa: F811
    from samplepipe.flows import fit_pipeline

    prefix = f"test:{uuid.uuid4().hex}:"
    locks = RecordingRedisLocks(redis_url, prefix=prefix, lease_seconds=5)
    state, flow_run_id = run(
        fit_pipeline,
        pipeline(tmp_path),
        make_samples(N),
        locks=locks,
        **folders(tmp_path),
    )
    assert state.is_completed()
    assert len(locks.taken) == 6  # scale's fit, its 4 batches, count's fit
    assert all(value is not None for _, value in locks.taken)  # a key in Redis
    client = redis.Redis.from_url(redis_url)
    assert client.keys(f"{prefix}*") == []  # all released
    assert stored_parameters(flow_run_id)["locks"] == (
        f"RecordingRedisLocks('{redis_url}', lease_seconds=5.0)"
    )


@pytest.mark.parametrize("bad", [42, b"redis://h", object()])
def test_locks_of_another_type_are_refused_before_any_work(tmp_path, bad):
    options = RunOptions(locks=bad, **folders(tmp_path))
    with pytest.raises(TypeError, match=re.escape(f"got {type(bad).__name__} ")):
        options.check()
    with pytest.raises(TypeError, match="a lock manager implementing prefect"):
        options.check()
    assert not (tmp_path / "features").exists()


def test_stored_parameter_hides_passwords_and_other_reprs():
    from prefect.locking.memory import MemoryLockManager

    redis_locks = RedisLocks("redis://user:secret@h:6379/0")
    assert summarize_parameter(redis_locks) == (
        "RedisLocks('redis://user:***@h:6379/0', lease_seconds=30.0)"
    )
    # Another library's manager: its class name only (a repr may hold secrets).
    assert summarize_parameter(MemoryLockManager()) == "<MemoryLockManager>"
    assert summarize_parameter("redis://h:6379/0") == "redis://h:6379/0"

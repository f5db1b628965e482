"""SIGKILL at random moments: nothing finished is lost, nothing invalid loads.

The number of kills per loop is ``SAMPLEPIPE_KILLS`` (default 20).
"""

import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from samplepipe import CheckpointWrapper
from samplepipe.storage import (
    checkpoint_status,
    is_temporary_file,
    load_hdf5,
    load_model,
)
from samplepipe.testing import count_rows, random_samples

from . import _stats
from ._child import transformer

pytestmark = pytest.mark.slow  # SIGKILL loops; minutes

CHILD = Path(__file__).with_name("_child.py")
KILLS = int(os.environ.get("SAMPLEPIPE_KILLS", "20"))
N = 3000


def start(*args, env=None):
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert line.strip() == "READY", line + proc.stderr.read()
    return proc


class Forks:
    """``_child.py forks``: imports samplepipe once, then forks each child to kill.

    A forked child starts its work at once: no interpreter start-up and no
    imports per kill (seconds each on a busy 2-core machine).
    """

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "forks", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout.readline().strip() == "READY"

    def _ask(self, *words):
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, *args):
        """Fork a child running ``_child.py ARGS``; its pid."""
        return int(self._ask("start", *args))

    def kill_at_random(self, pid, rng, longest, after=None):
        """SIGKILL child ``pid`` at a random moment; True if it was still running.

        The moment is up to ``longest`` seconds after the fork, or after
        ``after()`` first returns true (polled while the child runs).
        """
        while after is not None and not after() and not ended(pid):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, longest))
        os.kill(pid, signal.SIGKILL)  # a child that ended is a zombie until waited
        status = self._ask("wait", pid)
        assert status in ("killed", "exit 0"), status  # exit 1: the child failed
        return status == "killed"

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait() == 0


def computed_more(log, rows):
    """True once ``log`` holds more than ``rows`` transformed rows."""
    return count_rows(log, "transform") > rows


def ended(pid):
    """True once child ``pid`` has exited (a zombie until it is waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(scope="module")
def forks():
    with contextlib.closing(Forks()) as forks:
        yield forks


def check_folder(features, identities, expected, seen=None):
    """Every checkpoint present (and not in ``seen``) is valid with the right data.

    Returns (files checked, temporary files found); adds checked paths to ``seen``.
    """
    files = temps = 0
    for folder, _, names in os.walk(features):
        for name in names:
            path = os.path.join(folder, name)
            if is_temporary_file(name):
                temps += 1
                continue
            if seen is not None and path in seen:
                continue
            key = os.path.relpath(path, features)[: -len(".h5")]
            status, _, _ = checkpoint_status(path, identities[key])
            assert status == "valid", (path, status)
            np.testing.assert_array_equal(load_hdf5(path), expected[key])
            files += 1
            if seen is not None:
                seen.add(path)
    return files, temps


def test_killed_transforms_lose_nothing_and_resume(tmp_path, forks):
    rng = random.Random(1234)
    features, log = tmp_path / "features", tmp_path / "calls.log"
    n = 4 * N
    samples = random_samples(n, n_features=16, seed=7)
    expected = {s.key: s.data + 1.0 for s in samples}
    wrapper = CheckpointWrapper(transformer(str(log)), features_dir=str(features))
    identities = {i.key: i for i in wrapper.identities(samples)}
    kills = attempts = checked = 0
    seen = set()
    while kills < KILLS and attempts < 3 * KILLS:
        attempts += 1
        pid = forks.start("transform", features, log, n)
        kills += forks.kill_at_random(pid, rng, longest=1.5)
        files, temps = check_folder(features, identities, expected, seen)
        checked += files
        assert temps <= 1  # only the file being written when the kill came
    assert kills == KILLS
    done = len(seen)
    before = count_rows(log, "transform")
    out = wrapper.transform(samples)
    assert count_rows(log, "transform") - before == n - done
    for s, o in zip(samples, out):
        np.testing.assert_array_equal(o.data, expected[s.key])
    files, temps = check_folder(features, identities, expected)
    assert (files, temps) == (n, 0)
    _stats.add(
        transform_kills=kills,
        transform_files_checked=checked + files,
        transform_lost=0,
    )


def test_killed_model_saves_never_leave_a_broken_model(tmp_path, forks):
    rng = random.Random(99)
    path = tmp_path / "models" / "model.pkl"
    kills = intact = 0
    for _ in range(max(KILLS // 2, 5)):
        pid = forks.start("model", path)
        kills += forks.kill_at_random(pid, rng, longest=2.0)
        if path.exists():
            loaded = load_model(str(path))
            assert loaded is not None, "a truncated or corrupt model file is in place"
            intact += 1
    temps = [p for p in path.parent.iterdir() if is_temporary_file(p.name)]
    assert len(temps) <= 1
    pid = forks.start("model", path)  # the next save removes what crashed writers left
    forks.kill_at_random(pid, rng, longest=1.5)
    leftovers = [p for p in path.parent.iterdir() if is_temporary_file(p.name)]
    assert len(leftovers) <= 1  # at most the one written when this last kill came
    assert intact >= 1
    _stats.add(model_kills=kills, model_files_checked=intact, model_lost=0)


def test_killed_flow_runs_resume_computing_only_the_missing(tmp_path, prefect_server):
    # Every flow run here is a child process against a real server: a flow run
    # in this process would bind Prefect's process-wide events client to it.
    rng = random.Random(7)
    features, log = tmp_path / "features", tmp_path / "calls.log"
    step = features / "step"
    samples = random_samples(N, n_features=16, seed=7)
    expected = {s.key: s.data + 1.0 for s in samples}
    kills = checked = 0
    with contextlib.closing(Forks("flow", env=prefect_server)) as forks:
        for _ in range(max(KILLS // 4, 3)):
            rows = count_rows(log, "transform")
            pid = forks.start("flow", features, log, N)
            # from the first batch computed: starting a flow run takes seconds
            # on a busy machine, and a kill before any write proves nothing
            computing = functools.partial(computed_more, log, rows)
            kills += forks.kill_at_random(pid, rng, longest=6.0, after=computing)
            for folder, _, names in os.walk(step):
                for name in names:
                    if name.endswith(".h5"):
                        p = os.path.join(folder, name)
                        key = os.path.relpath(p, step)[:-3]
                        np.testing.assert_array_equal(load_hdf5(p), expected[key])
                        checked += 1
    assert checked > 0, "no kill came after a checkpoint was written"
    done = sum(1 for _, _, names in os.walk(step) for n in names if n.endswith(".h5"))
    before = count_rows(log, "transform")
    final = start("flow", features, log, N, env=prefect_server)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0 and "DONE" in out, err[-3000:]
    assert count_rows(log, "transform") - before == N - done
    for s in samples:
        np.testing.assert_array_equal(
            load_hdf5(str(step / f"{s.key}.h5")), expected[s.key]
        )
    assert not [
        n for _, _, names in os.walk(features) for n in names if is_temporary_file(n)
    ]
    _stats.add(flow_kills=kills, flow_files_checked=checked + N, flow_lost=0)


LOCKER = """
import os, sys
from pathlib import Path
from samplepipe.locks import CrashSafeFileLocks
locks = CrashSafeFileLocks(Path(sys.argv[1]))
assert locks.acquire_lock("batch-key", holder="the-dead-one")
print("LOCKED", flush=True)
os._exit(0)  # dies holding the lock, as a SIGKILLed flow run would
"""


def test_a_lock_held_by_a_dead_process_is_released(tmp_path):
    from samplepipe.locks import CrashSafeFileLocks

    out = subprocess.run(
        [sys.executable, "-c", LOCKER, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "LOCKED" in out.stdout
    assert (tmp_path / "batch-key.lock").exists()
    locks = CrashSafeFileLocks(tmp_path)
    assert not locks.is_locked("batch-key")
    assert locks.acquire_lock("batch-key", holder="me", acquire_timeout=5)
    assert locks.is_lock_holder("batch-key", "me")
    # a live holder keeps its lock
    other = CrashSafeFileLocks(tmp_path)
    assert other.is_locked("batch-key")
    assert not other.acquire_lock("batch-key", holder="someone", acquire_timeout=0.3)
    locks.release_lock("batch-key", "me")
    assert not other.is_locked("batch-key")


def test_an_empty_lock_file_left_by_a_crash_is_released(tmp_path):
    from samplepipe.locks import CrashSafeFileLocks

    lock = tmp_path / "batch-key.lock"
    lock.write_text("")  # killed between creating and writing the lock
    locks = CrashSafeFileLocks(tmp_path)
    # no process holds the kernel lock on it: free at once, whatever its age
    assert not locks.is_locked("batch-key")
    assert locks.acquire_lock("batch-key", holder="me", acquire_timeout=5)

"""The per-sample promises, written once, for every layout and format, local and S3.

Every test runs for ``layout`` in ("files", "shards", "npy": the files layout
in the npy format, its record in a sidecar; "nested": a user's own layout,
`samplepipe.testing.NestedFilesLayout`, registered by name) and a store in
("local", "s3"): the S3 API server (moto on 127.0.0.1) and the stores are those of
test_storage_fs and test_shards. Behaviour is observed through the public API
only: values, `CheckpointWarning`, the counting transformer's log, the paths
``transform_samples`` reports for each sample, `iter_checkpoints` and
`remove_checkpoints`. "A new process" is a cleared in-process state (no shard
index, no validated files, no journal read), or a real child process in the
kill loop.
"""

import contextlib
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest

from samplepipe import (
    CheckpointWarning,
    CheckpointWrapper,
    DelayedSample,
    Sample,
    SampleWrapper,
)
from samplepipe.storage import (
    CorruptCheckpointError,
    TransformReport,
    is_temporary_file,
    register_layout,
)
from samplepipe.storage.files import HOST_TAG
from samplepipe.storage.journal import JOURNAL
from samplepipe.testing import (
    CountingTransformer,
    NestedFilesLayout,
    count_rows,
    random_samples,
)

from . import test_shards
from .test_shards import new_process as forget_shards_and_validations
from .test_storage_fs import counting, expected, s3_server, values  # noqa: F401

store = test_shards.store  # the fixture: "local" and "s3" (the server above)

LAYOUTS = ["files", "shards", "npy", "nested"]  # "npy": files in format="npy"
register_layout("test-nested", NestedFilesLayout)  # "nested": a user's layout


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


def new_process():
    """What a new process knows: the files, nothing this process read or wrote."""
    forget_shards_and_validations()
    JOURNAL.clear()


@pytest.fixture(autouse=True)
def _as_a_new_process():
    new_process()
    yield
    new_process()


def step(layout, store, log, offset=1.0, stateless=True, **kwargs):
    """A checkpointed CountingTransformer in ``layout`` (shards of 4 samples)."""
    if layout == "shards":
        kwargs.setdefault("shard_size", 4)
        kwargs["layout"] = "shards"
    elif layout == "npy":
        kwargs["format"] = "npy"
    elif layout == "nested":
        kwargs["layout"] = "test-nested"
    return counting(store, log, offset=offset, stateless=stateless, **kwargs)


def transform_reporting(wrapper, samples):
    """``(outputs, [path of the file holding each sample])``, public API only."""
    report = TransformReport()
    out = wrapper.transform_samples(samples, report=report)
    return out, list(report.paths)


class NotOneWarning(AssertionError):
    """Not exactly the one `CheckpointWarning` a test expects."""


@contextlib.contextmanager
def recorded_warnings():
    """Every warning of the block, of any category, in a list."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def assert_one_warning(caught, match):
    """``caught`` is one `CheckpointWarning` whose message matches ``match``."""
    found = [(w.category.__name__, str(w.message)) for w in caught]
    if not (
        len(caught) == 1
        and issubclass(caught[0].category, CheckpointWarning)
        and re.search(match, str(caught[0].message))
    ):
        raise NotOneWarning(f"expected one CheckpointWarning ~ {match!r}: {found}")


@contextlib.contextmanager
def one_warning(match):
    """Exactly one warning in the block: a `CheckpointWarning` matching ``match``."""
    with recorded_warnings() as caught:
        yield
    assert_one_warning(caught, match)


def user_hdf5():
    """The bytes of an HDF5 file of the user's (no samplepipe record)."""
    with h5py.File("user", "w", driver="core", backing_store=False) as f:
        f["array"] = np.arange(3.0)
        f.flush()
        return f.id.get_file_image()


def user_npy():
    """The bytes of a ``.npy`` file of the user's (no samplepipe sidecar)."""
    buffer = io.BytesIO()
    np.save(buffer, np.arange(3.0))
    return buffer.getvalue()


def user_file(layout):
    """``(name, bytes)`` of a file of the user's that ``layout`` would list."""
    return ("mine.npy", user_npy()) if layout == "npy" else ("mine.h5", user_hdf5())


def stored(store, sidecars=False):
    """Every file under ``features_dir``, as the paths samplepipe reports.

    The ``.meta.json`` sidecars of the npy format are left out unless
    ``sidecars``: `iter_checkpoints` lists each checkpoint once.
    """
    return {
        store.url("f", name)
        for name in store.files("f")
        if sidecars or not name.endswith(".meta.json")
    }


def dead_temporary(path):
    """The name a writer of ``path`` that died (pid above pid_max) left behind."""
    folder, name = path.rsplit("/", 1) if "://" in path else os.path.split(path)
    return f"{folder}/.{name}.{HOST_TAG}-999999-0badc0de.tmp"


# ---------------------------------------------------------------------------
# reuse
# ---------------------------------------------------------------------------
def test_a_second_transform_computes_nothing_and_a_new_process_loads(
    layout, store, tmp_path
):
    log = tmp_path / "calls.log"
    samples = random_samples(6)
    w = step(layout, store, log)
    np.testing.assert_array_equal(values(w.transform(samples)), expected(samples))
    assert count_rows(log, "transform") == 6
    np.testing.assert_array_equal(values(w.transform(samples)), expected(samples))
    new_process()
    again = step(layout, store, log).transform(samples)
    np.testing.assert_array_equal(values(again), expected(samples))
    assert count_rows(log, "transform") == 6


def test_adding_samples_computes_only_those(layout, store, tmp_path):
    log = tmp_path / "calls.log"
    step(layout, store, log).transform(random_samples(3))
    step(layout, store, log).transform(random_samples(5))  # same process
    assert count_rows(log, "transform") == 5
    new_process()
    more = random_samples(7)
    out = step(layout, store, log).transform(more)
    assert count_rows(log, "transform") == 7
    np.testing.assert_array_equal(values(out), expected(more))


# ---------------------------------------------------------------------------
# stale checkpoints
# ---------------------------------------------------------------------------
def test_a_changed_input_recomputes_that_sample_alone(layout, store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(6)
    step(layout, store, log).transform(samples)
    changed = list(samples)
    changed[4] = Sample(samples[4].data + 100.0, parent=samples[4])
    new_process()
    with one_warning("recomputes 1 checkpoint.*1 stale"):
        out = step(layout, store, log).transform(changed)
    assert count_rows(log, "transform") == 7
    np.testing.assert_array_equal(values(out), expected(changed))
    step(layout, store, log).transform(changed)  # no warning: the new one wins
    new_process()
    out = step(layout, store, log).transform(changed)
    assert count_rows(log, "transform") == 7
    np.testing.assert_array_equal(values(out), expected(changed))


def test_changed_parameters_or_a_refit_recompute_all_with_one_warning(
    layout, store, tmp_path
):
    log = tmp_path / "calls.log"
    samples, train = random_samples(6), random_samples(5, seed=3)
    X = np.stack([s.data for s in samples])

    def fitted(offset, training):
        w = step(layout, store, log, offset=offset, stateless=False)
        return w.fit(training)

    fitted(1.0, samples).transform(samples)
    with one_warning("recomputes 6 checkpoint.*6 stale"):
        out = fitted(2.0, samples).transform(samples)  # other parameters
    np.testing.assert_array_equal(values(out), X + 2.0 + X.mean(axis=0))
    with one_warning("recomputes 6 checkpoint.*6 stale"):
        out = fitted(2.0, train).transform(samples)  # another fitted model
    mean = np.stack([s.data for s in train]).mean(axis=0)
    np.testing.assert_array_equal(values(out), X + 2.0 + mean)
    assert count_rows(log, "transform") == 18
    new_process()
    fitted(2.0, train).transform(samples)
    assert count_rows(log, "transform") == 18


# ---------------------------------------------------------------------------
# damaged checkpoints
# ---------------------------------------------------------------------------
def flip_payload(blob, value):
    """``blob`` with the stored bytes of ``value`` flipped (found by content)."""
    raw = np.ascontiguousarray(value, dtype="<f8").tobytes()
    assert blob.count(raw) == 1
    start = blob.index(raw)
    damaged = bytearray(blob)
    damaged[start : start + 8] = bytes(b ^ 0xFF for b in raw[:8])
    return bytes(damaged)


DAMAGE = {  # what a damage recomputes: the samples of the file, or one sample
    "truncated": (lambda blob, value: blob[: len(blob) // 3], "file"),
    "payload bytes flipped": (flip_payload, "sample"),
}


@pytest.mark.parametrize("process", ["same process", "new process"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_recomputed_with_a_warning_never_served(
    layout, store, tmp_path, damage, process
):
    log = tmp_path / "calls.log"
    samples = random_samples(8)
    truth = expected(samples)
    before, paths = transform_reporting(step(layout, store, log), samples)
    target = 5  # files: its own file; shards: the middle shard
    sharing = [i for i, p in enumerate(paths) if p == paths[target]]
    damage_fn, scope = DAMAGE[damage]
    store.write(paths[target], damage_fn(store.read(paths[target]), truth[target]))
    if process == "new process":
        new_process()
        with pytest.raises(CorruptCheckpointError):
            _ = before[target].data  # never the damaged bytes
        other = next(i for i in range(8) if i not in sharing)
        np.testing.assert_array_equal(before[other].data, truth[other])
    recomputed = len(sharing) if scope == "file" else 1
    with recorded_warnings() as caught:
        out = step(layout, store, log).transform(samples)
    assert count_rows(log, "transform") == 8 + recomputed
    np.testing.assert_array_equal(values(out), truth)
    new_process()
    step(layout, store, log).transform(samples)  # what was recomputed loads
    assert count_rows(log, "transform") == 8 + recomputed
    if (layout, damage) == ("shards", "truncated"):
        # its index is unreadable: its keys are unknown, so they look missing
        match = f"computes {recomputed} checkpoint.*1 shard.*unreadable \\(corrupt\\)"
    else:
        match = f"recomputes {recomputed} checkpoint.*corrupt"
    assert_one_warning(caught, match)


# ---------------------------------------------------------------------------
# files samplepipe did not write
# ---------------------------------------------------------------------------
def test_a_file_samplepipe_did_not_write_is_never_overwritten_or_removed(
    layout, store, tmp_path
):
    log = tmp_path / "calls.log"
    samples = random_samples(4)
    name, content = user_file(layout)
    mine = [store.url("f", name), store.url("f", "s", name)]
    for path in mine:
        store.write(path, content)
    step(layout, store, log).transform(samples)
    step(layout, store, log, force=True).transform(samples)  # rewrites its own
    with one_warning("recomputes 4 checkpoint.*4 stale"):
        step(layout, store, log, offset=2.0).transform(samples)
    assert count_rows(log, "transform") == 12
    new_process()
    w = step(layout, store, log)
    found = {p: s for p, s, _ in w.iter_checkpoints()}
    assert [found[p] for p in mine] == ["unknown", "unknown"]
    assert "stale" in found.values()  # the files of offset=2.0, at least
    with pytest.raises(ValueError, match="never removes"):
        w.remove_checkpoints(statuses=("unknown",))
    removed = w.remove_checkpoints()
    assert removed and not {p for p, _, _ in removed} & set(mine)
    assert [store.read(p) for p in mine] == [content] * 2
    after = {p: s for p, s, _ in w.iter_checkpoints()}
    assert set(after.values()) <= {"valid", "unknown"}
    assert {p for p, s in after.items() if s == "unknown"} == set(mine)


# ---------------------------------------------------------------------------
# lazy outputs
# ---------------------------------------------------------------------------
def test_outputs_load_lazily_and_survive_pickling(layout, store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(5)
    out = step(layout, store, log).transform(samples)
    assert all(isinstance(o, DelayedSample) and "data" not in vars(o) for o in out)
    blob = pickle.dumps(out)
    assert all(row.tobytes() not in blob for row in expected(samples))  # no data
    new_process()
    restored = pickle.loads(blob)
    np.testing.assert_array_equal(values(restored), expected(samples))
    np.testing.assert_array_equal(values(out), expected(samples))
    assert count_rows(log, "transform") == 5  # loading computes nothing


# ---------------------------------------------------------------------------
# listing and removing
# ---------------------------------------------------------------------------
def test_remove_checkpoints_removes_only_stale_corrupt_and_temporary_items(
    layout, store, tmp_path
):
    log = tmp_path / "calls.log"
    samples = random_samples(11)
    other = step(layout, store, tmp_path / "other.log", offset=9.0)
    _, stale = transform_reporting(other, samples[:2])  # another step's
    w = step(layout, store, log)
    _, paths = transform_reporting(w, samples[2:])
    corrupt = paths[4]  # the file holding samples[6]
    store.write(corrupt, store.read(corrupt)[:100])
    temporary = dead_temporary(paths[-1])
    store.write(temporary, b"half a file")
    new_process()
    found = {p: s for p, s, _ in w.iter_checkpoints()}
    assert found == {
        **dict.fromkeys(paths, "valid"),
        **dict.fromkeys(stale, "stale"),
        corrupt: "corrupt",
        temporary: "temporary",
    }
    before = stored(store)
    dry = w.remove_checkpoints(dry_run=True)
    assert w.remove_checkpoints(dry_run=True) == dry
    assert stored(store) == before == set(found)
    removed = w.remove_checkpoints()
    assert sorted(removed) == sorted(dry)
    assert sorted((p, s) for p, s, _ in removed) == sorted(
        [*((p, "stale") for p in set(stale)), (corrupt, "corrupt")]
        + [(temporary, "temporary")]
    )
    assert stored(store) == set(paths) - {corrupt}
    if layout == "npy":  # each file's sidecar went with it, the others stay
        assert stored(store, sidecars=True) - stored(store) == {
            f"{p}.meta.json" for p in set(paths) - {corrupt}
        }
    new_process()
    out = w.transform(samples)  # exactly the removed samples
    lost = sum(p == corrupt for p in paths)
    assert count_rows(log, "transform") == 9 + 2 + lost
    np.testing.assert_array_equal(values(out), expected(samples))
    assert {s for _, s, _ in w.iter_checkpoints()} == {"valid"}


# ---------------------------------------------------------------------------
# SIGKILL mid-run
# ---------------------------------------------------------------------------
KILL_CHILD = """
import json, sys
from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.storage import register_layout
from samplepipe.testing import CountingTransformer, NestedFilesLayout, random_samples
register_layout("test-nested", NestedFilesLayout)
spec = json.loads(sys.argv[1])
samples = random_samples(spec["n"], n_features=16, seed=7)
w = CheckpointWrapper(
    SampleWrapper(CountingTransformer(**spec["counting"])), **spec["wrapper"]
)
w.identities(samples)  # the one-off cost of a process's first identity
print("READY", flush=True)
sys.stdin.readline()  # started with the imports done
# 100 samples a call: files are written all through the run, not in one burst
# at its end (~60 us a file), so that a kill lands while they are written
for i in range(0, len(samples), 100):
    w.transform(samples[i : i + 100])
print("DONE", flush=True)
"""


def spawn(spec):
    """A child that transforms the samples of ``spec`` once told to."""
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "READY"
    return child


def stop(child):
    child.kill()
    child.wait()
    child.stdin.close()
    child.stdout.close()


def valid_outputs(wrapper, samples, marker):
    """``{key: output}`` of the samples with a valid checkpoint, computing none.

    While ``marker`` exists the step's transformer fails, so a transform
    returns only when every sample given loads: split until each is known.
    """

    def loads(part):
        try:
            out = wrapper.transform(part)
        except OSError as exc:
            assert "fail_marker exists" in str(exc)
            if len(part) == 1:
                return {}
            half = len(part) // 2
            return {**loads(part[:half]), **loads(part[half:])}
        return {s.key: o for s, o in zip(part, out)}

    marker.touch()
    try:  # a block of valid samples loads in one call
        blocks = [samples[i : i + 50] for i in range(0, len(samples), 50)]
        return {k: o for block in blocks for k, o in loads(block).items()}
    finally:
        marker.unlink()


@pytest.mark.slow  # child processes killed mid-run
@pytest.mark.parametrize("store", ["local"], indirect=True)
# "nested" writes through FilesLayout's own atomic write, killed in "files"
@pytest.mark.parametrize("layout", ["files", "shards", "npy"], indirect=True)
def test_killed_runs_lose_nothing_finished_and_a_final_run_computes_the_rest(
    layout, store, tmp_path
):
    rng = random.Random(13)
    # one file per sample is written fast (~60-100 us a file, after the whole
    # call's transform): more of them, so that a kill lands while writing
    n = 1000 if layout == "shards" else 3000
    shard_size, kills_wanted = 50, 5
    log, marker = tmp_path / "calls.log", tmp_path / "fail"
    spec = {
        "n": n,
        "counting": {
            "offset": 1.0,
            "stateless": True,
            "log_path": str(log),
            "fail_marker": str(marker),
            "delay": 0.0005 if layout == "shards" else 0.0002,
        },
        "wrapper": {
            "features_dir": store.url("f"),
            "storage_options": store.options,
            "layout": {"shards": "shards", "nested": "test-nested"}.get(
                layout, "files"
            ),
            "shard_size": shard_size,
            **({"format": "npy"} if layout == "npy" else {}),
        },
    }
    w = CheckpointWrapper(
        SampleWrapper(CountingTransformer(**spec["counting"])), **spec["wrapper"]
    )
    samples = random_samples(n, n_features=16, seed=7)
    truth = {s.key: s.data + 1.0 for s in samples}
    per_file = shard_size if layout == "shards" else 1
    valid = {}
    kills = attempts = 0
    spare = spawn(spec)  # the next child imports while this one runs
    try:
        while kills < kills_wanted and attempts < 3 * kills_wanted:
            attempts += 1
            child, spare = spare, spawn(spec)
            files = len(store.files("f"))
            files_to_write = -(-(n - len(valid)) // per_file)
            target = files + rng.randint(1, max(1, files_to_write // 3))
            child.stdin.write("go\n")
            child.stdin.flush()
            while child.poll() is None and len(store.files("f")) < target:
                time.sleep(0.005)
            kills += child.poll() is None
            stop(child)
            new_process()  # read the folder as the next process will
            states = [s for _, s, _ in w.iter_checkpoints()]
            assert set(states) <= {"valid", "temporary"}, states
            # the file being written (npy: and its sidecar, written meanwhile)
            assert states.count("temporary") <= (2 if layout == "npy" else 1)
            now = valid_outputs(w, samples, marker)
            assert set(valid) <= set(now)  # nothing finished is ever lost
            for key, out in now.items():
                np.testing.assert_array_equal(out.data, truth[key])
            valid = now
    finally:
        stop(spare)
    assert kills == kills_wanted
    assert 0 < len(valid) < n
    print(f"\n{layout}: {kills} kills, {len(valid)} of {n} samples valid")
    before = count_rows(log, "transform")
    new_process()
    out = w.transform(samples)
    assert count_rows(log, "transform") - before == n - len(valid)
    np.testing.assert_array_equal(
        values(out), np.stack([truth[s.key] for s in samples])
    )
    assert not [p for p in store.files("f") if is_temporary_file(p.split("/")[-1])]
    assert {s for _, s, _ in w.iter_checkpoints()} == {"valid"}

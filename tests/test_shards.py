"""layout="shards": one HDF5 file per batch, every per-sample promise kept.

Real HDF5 files on a local path and on a real S3 API server (moto, started by
the fixture of test_storage_fs on 127.0.0.1). "A new process" is a cleared
per-process state (`shards.clear` and `VALIDATED.clear`) or a real child process.
"""

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import uuid

import h5py
import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from samplepipe import (
    CheckpointWarning,
    CheckpointWrapper,
    DelayedSample,
    Sample,
    SampleWrapper,
    hash_string,
    wrap,
)
from samplepipe.storage import (
    VALIDATED,
    CorruptCheckpointError,
    TransformReport,
    filesystem,
)
from samplepipe.storage import shards as shard_store
from samplepipe.storage.files import HOST_TAG
from samplepipe.storage.shards import (
    ShardFolder,
    ShardLoader,
    is_shard_name,
    shard_name,
)
from samplepipe.testing import (
    CountingTransformer,
    count_rows,
    random_samples,
    read_calls,
)

from .test_storage_fs import (  # noqa: F401 - s3_server is a fixture
    BUCKET,
    LOAD_SCRIPT,
    Store,
    counting,
    requests_by_phase,
    s3_server,
    s3_store,
    values,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store("local", str(tmp_path / "store"))
    else:
        server = request.getfixturevalue("s3_server")
        root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
        server.requests()
        yield Store("s3", root, {"endpoint_url": server.endpoint}, server)


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test starts as a new process would: no indices, no payloads."""
    shard_store.clear()
    VALIDATED.clear()
    yield
    shard_store.clear()


def new_process():
    shard_store.clear()
    VALIDATED.clear()


def sharded(store, log, shard_size=10, **kwargs):
    """`counting` in the sharded layout (shards of ``shard_size`` samples)."""
    return counting(store, log, layout="shards", shard_size=shard_size, **kwargs)


def expected(samples, offset=1.0):
    return np.stack([s.data for s in samples]) + offset


def shard_files(store):
    return [f for f in store.files("f") if is_shard_name(f)]


def flip_entry(store, output):
    """Flip bytes of one sample's payload inside its shard (not through samplepipe)."""
    loader = output._load
    assert isinstance(loader, ShardLoader)
    blob = bytearray(store.read(loader.path))
    with h5py.File(h5py.h5f.open_file_image(bytes(blob)), "r") as f:
        dataset = f[f"data/{loader.group}"]
        row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))
        start = dataset.id.get_offset() + loader.row * row_bytes
    for i in range(start, start + 8):
        blob[i] ^= 0xFF
    store.write(loader.path, bytes(blob))


# ---------------------------------------------------------------------------
# reuse
# ---------------------------------------------------------------------------
def test_a_rerun_loads_and_a_new_process_too(store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(25)
    out = sharded(store, log).transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))
    assert read_calls(log, "transform") == [("transform", 10)] * 2 + [("transform", 5)]
    assert len(shard_files(store)) == 3 == len(store.files("f"))  # no index file
    again = sharded(store, log).transform(samples)
    np.testing.assert_array_equal(values(again), expected(samples))
    new_process()
    fresh = sharded(store, log).transform(samples)
    np.testing.assert_array_equal(values(fresh), expected(samples))
    assert count_rows(log, "transform") == 25


def test_each_entry_holds_the_record_of_the_file_layout(tmp_path):
    """Same identity, same record text and checksum: only the storage differs."""
    samples = random_samples(6)
    log = tmp_path / "calls.log"
    shards = sharded(Store("local", str(tmp_path / "a")), log)
    shards.transform(samples)
    files = counting(Store("local", str(tmp_path / "b")), log)
    files.transform(samples)
    assert shards.step_identity() == files.step_identity()
    (name,) = os.listdir(tmp_path / "a" / "f")
    with h5py.File(tmp_path / "a" / "f" / name) as f:
        records = f["records"][()].tobytes().decode().split("\n")
        entries = f["entries"][()]
        rows = f["data/0"][()]
    for s, record, (group, row, _) in zip(samples, records, entries):
        with h5py.File(files.checkpoint_path(s.key)) as f:
            assert f.attrs["samplepipe"] == record
            np.testing.assert_array_equal(rows[row], f["array"][()])
        assert group == 0


def test_adding_samples_computes_only_those(store, tmp_path):
    log = tmp_path / "calls.log"
    w = sharded(store, log)
    w.transform(random_samples(20))
    new_process()
    more = random_samples(27)
    out = sharded(store, log).transform(more)
    assert read_calls(log, "transform")[2:] == [("transform", 7)]
    np.testing.assert_array_equal(values(out), expected(more))
    assert len(shard_files(store)) == 3


def test_a_downstream_step_sees_the_same_identities_in_both_layouts(tmp_path):
    samples = random_samples(8)

    def pipeline(layout):
        return wrap(
            ["sample", "checkpoint"],
            Pipeline(
                [
                    ("a", CountingTransformer(offset=1.0, stateless=True)),
                    ("b", CountingTransformer(offset=2.0, stateless=True)),
                ]
            ),
            features_dir=str(tmp_path / layout),
            layout=layout,
            shard_size=3,
        )

    sharded_pipe, files_pipe = pipeline("shards"), pipeline("files")
    assert [s.layout for _, s in sharded_pipe.steps] == ["shards", "shards"]
    out = sharded_pipe.transform(samples)
    reference = files_pipe.transform(samples)
    np.testing.assert_array_equal(values(out), values(reference))
    middle = sharded_pipe.steps[0][1].transform(samples)
    middle_files = files_pipe.steps[0][1].transform(samples)
    b, b_files = sharded_pipe.steps[1][1], files_pipe.steps[1][1]
    assert b.identities(middle) == b_files.identities(middle_files)
    assert sorted(os.listdir(tmp_path / "shards")) == ["a", "b"]
    assert all(is_shard_name(n) for n in os.listdir(tmp_path / "shards" / "b"))


VALUES = [
    np.arange(5),
    np.array([1, 2], dtype=">i4"),
    np.zeros((2, 0)),
    np.array(5.0),
    np.array([True, False]),
    np.array(["ab", "c"]),
    np.array([b"x", b"yz"]),
    np.array(["2020-01-01"], dtype="datetime64[D]"),
    np.float32(2.5),
    np.datetime64("2020-01-02"),
    3,
    2.5,
    True,
    1 + 2j,
    "a\x00\u00e9",
    b"\x00x",
    bytearray(b"ab"),
]


def test_every_value_of_the_default_format_comes_back_exactly(tmp_path):
    from samplepipe.storage import Identity, hdf5

    encoded = [hdf5.encode(v) for v in VALUES]
    payloads = [p for p, _ in encoded]
    kinds = [k for _, k in encoded]
    identities = [Identity("step", f"in{i}", f"k/{i}") for i in range(len(VALUES))]
    root = str(tmp_path / "f")
    written = shard_store.shard_folder(root).write_new(identities, payloads, kinds)
    assert written.records == [  # the checksums of the file layout, as one file
        i.record(hdf5.checksum(p, k), k) for i, (p, k) in zip(identities, encoded)
    ]
    new_process()
    found = ShardFolder(root, filesystem(root)).find(identities)
    for value, ident, where in zip(VALUES, identities, found):
        index, position = where
        group, row, _ = index.entries[position].tolist()
        checksum, kind = index.records[position].split(":", 5)[3:5]
        entry = (group, row, checksum, kind)
        loader = ShardLoader.make(index.path, ident, index.stamp, None, entry)
        loaded = pickle.loads(pickle.dumps(loader))()
        assert type(loaded) is type(value)
        if isinstance(value, np.ndarray):
            assert loaded.dtype == value.dtype and loaded.shape == value.shape
            np.testing.assert_array_equal(loaded, value)
        else:
            assert loaded == value


@pytest.mark.parametrize("whole", [True, False])
def test_a_local_entry_that_missed_the_cache_reads_its_shard_once(
    tmp_path, monkeypatch, whole
):
    """One open per shard when its payloads were evicted, not one per entry."""
    store = Store("local", str(tmp_path / "store"))
    samples = random_samples(25)
    out = sharded(store, tmp_path / "calls.log").transform(samples)
    if not whole:
        monkeypatch.setattr(shard_store, "WHOLE_READ_BYTES", 0)
    shard_store.DATA.clear()  # evicted, as by a data set larger than DATA
    first = out[0]._load
    key = f"{filesystem(first.path).token}|{first.path}"
    np.testing.assert_array_equal(out[0].data, samples[0].data + 1.0)
    assert (shard_store.DATA.get(key) is not None) is whole
    np.testing.assert_array_equal(values(out), expected(samples))


# ---------------------------------------------------------------------------
# stale and corrupt entries
# ---------------------------------------------------------------------------
# (a changed input, changed parameters, a refit: tests/test_behaviour.py, for
# both layouts)


def test_a_corrupt_entry_is_recomputed_alone(store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(12)
    before = sharded(store, log).transform(samples)
    flip_entry(store, before[5])
    # this process still holds the payloads it wrote, verified by checksum
    np.testing.assert_array_equal(before[5].data, expected(samples)[5])
    new_process()  # another process reads the shard: never the damaged bytes
    with pytest.raises(CorruptCheckpointError, match="changed since it was"):
        _ = before[5].data
    np.testing.assert_array_equal(before[4].data, expected(samples)[4])
    new_process()
    with pytest.warns(CheckpointWarning, match="recomputes 1 checkpoint.*1 corrupt"):
        out = sharded(store, log).transform(samples)
    assert read_calls(log, "transform")[-1] == ("transform", 1)
    np.testing.assert_array_equal(values(out), expected(samples))
    new_process()
    sharded(store, log).transform(samples)
    assert count_rows(log, "transform") == 13


def test_an_unreadable_shard_is_judged_corrupt_and_its_keys_recomputed(store, tmp_path):
    """The broken variant of an atomic write: half a shard at its final name."""
    log = tmp_path / "calls.log"
    samples = random_samples(15)
    w = sharded(store, log)
    w.transform(samples)
    first, second = sorted(shard_files(store))
    whole = store.read(store.url("f", first))
    store.write(store.url("f", first), whole[: len(whole) // 2])
    new_process()
    assert sorted((os.path.basename(p), s) for p, s, _ in w.iter_checkpoints()) == [
        (first, "corrupt"),
        (second, "valid"),
    ]
    w.transform(samples[10:])  # the other shard still serves its samples
    assert count_rows(log, "transform") == 15
    with pytest.warns(CheckpointWarning, match="1 shard.*unreadable") as caught:
        out = w.transform(samples)  # those of the unreadable one look missing
    assert len(caught) == 1
    assert count_rows(log, "transform") == 25
    np.testing.assert_array_equal(values(out), expected(samples))
    assert [s for _, s, _ in w.remove_checkpoints()] == ["corrupt"]


# ---------------------------------------------------------------------------
# atomic writes, crashes
# ---------------------------------------------------------------------------
KILLED_WRITER = """
import os, sys, time
from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.testing import CountingTransformer, random_samples
real = os.replace
def replace(src, dst):
    print("written", flush=True)
    time.sleep(600)
os.replace = replace
CheckpointWrapper(
    SampleWrapper(CountingTransformer(offset=1.0, stateless=True)),
    features_dir=sys.argv[1], layout="shards",
).transform(random_samples(5))
"""


def test_a_writer_killed_before_its_rename_leaves_no_shard(tmp_path):
    features = tmp_path / "f"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(features)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "written"
    child.kill()
    child.wait()
    child.stdout.close()
    (temporary,) = os.listdir(features)
    assert temporary.startswith(".shard-") and temporary.endswith(".tmp")
    log = tmp_path / "calls.log"
    w = sharded(Store("local", str(tmp_path)), log)
    assert [s for _, s, _ in w.iter_checkpoints()] == ["temporary"]
    out = w.transform(random_samples(5))  # computes all; removes the leftover
    np.testing.assert_array_equal(values(out), expected(random_samples(5)))
    assert count_rows(log, "transform") == 5
    (name,) = os.listdir(features)
    assert is_shard_name(name)


CRASH_CHILD = """
import sys
from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.testing import CountingTransformer, random_samples
features, log, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
samples = random_samples(n, n_features=16, seed=7)
w = CheckpointWrapper(
    SampleWrapper(CountingTransformer(
        offset=1.0, stateless=True, log_path=log, delay=0.003)),
    features_dir=features, layout="shards", shard_size=100,
)
w.identities(samples)  # the one-off cost of a process's first identity
print("READY", flush=True)
w.transform(samples)
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_killed_runs_lose_at_most_the_shard_being_written_and_resume(tmp_path):
    # 3,000 rows at 3 ms each: more work than five kills at most 1.5 s apart,
    # so that every run is killed before it ends
    rng = random.Random(13)
    n, size, kills_wanted = 3000, 100, 5
    features, log = tmp_path / "f", tmp_path / "calls.log"
    samples = random_samples(n, n_features=16, seed=7)
    truth = {s.key: s.data + 1.0 for s in samples}
    reader = CheckpointWrapper(  # the child's step
        SampleWrapper(
            CountingTransformer(
                offset=1.0, stateless=True, log_path=str(log), delay=0.003
            )
        ),
        features_dir=str(features),
        layout="shards",
        shard_size=size,
    )
    identities = reader.identities(samples)
    kills = attempts = 0
    stored = 0
    while kills < kills_wanted and attempts < 4 * kills_wanted:
        attempts += 1
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(features), str(log), str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0.2, 1.5))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
        child.stdout.close()
        new_process()  # read the folder as a new process would
        states = [s for _, s, _ in reader.iter_checkpoints()]
        assert set(states) <= {"valid", "temporary"}, states
        assert states.count("temporary") <= 1  # the shard being written
        folder = ShardFolder(str(features), filesystem(str(features)))
        found = folder.find(identities)
        now = sum(not isinstance(f, str) for f in found)
        assert now >= stored  # nothing finished is ever lost
        stored = now
        for ident, f in zip(identities, found):
            if not isinstance(f, str):
                g, row = f.shard.entries[f.position, :2]
                data = folder._arrays(f.shard)[int(g)][int(row)]
                np.testing.assert_array_equal(data, truth[ident.key])
        # what was computed and not stored is at most one shard per kill
        assert count_rows(log, "transform") <= stored + kills * size
    assert kills == kills_wanted
    assert 0 < stored < n
    print(f"\n{kills} kills, {stored} of {n} samples stored before the last run")
    before = count_rows(log, "transform")
    new_process()
    out = reader.transform(samples)
    assert count_rows(log, "transform") - before == n - stored
    np.testing.assert_array_equal(
        values(out), np.stack([truth[s.key] for s in samples])
    )
    assert [s for _, s, _ in reader.iter_checkpoints()].count("temporary") == 0


# ---------------------------------------------------------------------------
# lazy outputs
# ---------------------------------------------------------------------------
def test_outputs_load_lazily_one_entry_each_in_another_process(store, tmp_path):
    samples = random_samples(25)
    out = sharded(store, tmp_path / "calls.log").transform(samples)
    assert all(isinstance(o, DelayedSample) and "data" not in vars(o) for o in out)
    assert all(isinstance(o._load, ShardLoader) for o in out)
    flip_entry(store, out[0])  # one damaged entry spoils no other
    blob = pickle.dumps(out[1:])
    (tmp_path / "outputs.pkl").write_bytes(blob)
    if store.server is not None:
        store.server.requests()
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "outputs.pkl")],
        capture_output=True,
        text=True,
        check=True,
    )
    sums = expected(samples)[1:].sum(axis=1)
    assert json.loads(result.stdout) == pytest.approx(list(sums))
    if store.server is not None:  # one GET per shard (a HEAD for the changed one)
        assert store.server.requests() == {"GET": 3, "HEAD": 1}


def test_threads_transform_and_load_one_folder_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    log = tmp_path / "calls.log"
    store = Store("local", str(tmp_path))
    samples = random_samples(200)
    batches = [samples[i : i + 50] for i in range(0, 200, 50)]
    w = sharded(store, log, shard_size=20)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(w.transform, batches))
        loaded = list(pool.map(values, outs))
    np.testing.assert_array_equal(np.concatenate(loaded), expected(samples))
    new_process()
    out = sharded(store, log, shard_size=20).transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))
    assert count_rows(log, "transform") == 200


# ---------------------------------------------------------------------------
# status, clean, compaction
# ---------------------------------------------------------------------------
def test_iter_and_remove_checkpoints_understand_shards(store, tmp_path):
    log = tmp_path / "calls.log"
    samples = random_samples(20)
    old = sharded(store, log, offset=1.0)
    old.transform(samples[:10])  # shard A: stale for the new step below
    new = sharded(store, log, offset=2.0)
    new.transform(samples[10:])  # shard B: valid
    changed = [Sample(s.data + 1.0, parent=s) for s in samples[10:12]]
    with pytest.warns(CheckpointWarning, match="2 stale"):
        new.transform(changed)  # shard C: supersedes 2 entries of B
    a, b, c = (store.url("f", n) for n in sorted(shard_files(store)))
    user = store.url("f", shard_name(1))  # named like a shard, written by a user
    with h5py.File("user", "w", driver="core", backing_store=False) as f:
        f["data"] = np.zeros(3)
        f.flush()
        store.write(user, f.id.get_file_image())
    store.write(store.url("f", "notes.txt"), b"kept")
    dead = f".{shard_name(2)}.{HOST_TAG}-999999-abcd.tmp"
    if store.name == "local":
        store.write(store.url("f", dead), b"half a shard")
    new_process()
    found = {p: s for p, s, _ in new.iter_checkpoints()}
    wanted = {a: "stale", b: "valid", c: "valid", user: "unknown"}
    wanted[store.url("f", "notes.txt")] = "unknown"  # listed, never removed
    if store.name == "local":
        wanted[store.url("f", dead)] = "temporary"
    assert found == wanted
    assert {p: s for p, s, _ in old.iter_checkpoints()}[a] == "valid"
    dry = new.remove_checkpoints(dry_run=True)
    assert sorted(p for p, _, _ in dry) == sorted(
        p for p, s in wanted.items() if s in ("stale", "temporary")
    )
    removed = new.remove_checkpoints()
    assert sorted(removed) == sorted(dry)
    assert sorted(store.files("f")) == sorted(
        [os.path.basename(b), os.path.basename(c), os.path.basename(user), "notes.txt"]
    )
    new_process()
    out = new.transform(samples[10:12] + samples[12:])
    assert count_rows(log, "transform") == 22  # nothing valid was removed
    np.testing.assert_array_equal(values(out), expected(samples[10:], 2.0))


def test_a_step_whose_model_cannot_be_read_calls_shards_unknown(store, tmp_path):
    log = tmp_path / "calls.log"
    w = sharded(store, log, stateless=False).fit(random_samples(4))
    w.transform(random_samples(4))
    unfitted = sharded(store, log, stateless=False)
    assert [s for _, s, _ in unfitted.iter_checkpoints()] == ["unknown"]
    assert unfitted.remove_checkpoints() == []
    assert len(shard_files(store)) == 1


def test_compaction_merges_small_shards_and_readers_never_miss_a_key(
    store, tmp_path, monkeypatch
):
    log = tmp_path / "calls.log"
    samples = random_samples(30)
    w = sharded(store, log, shard_size=4)
    outs = []
    for i in range(0, 30, 3):  # ten small shards
        outs += w.transform(samples[i : i + 3])
    with pytest.warns(CheckpointWarning, match="3 stale"):
        changed = [Sample(s.data * 2, parent=s) for s in samples[:3]]
        w.transform(changed)  # three entries superseded: dropped by compaction
    assert len(shard_files(store)) == 11
    identities = w.identities(changed + samples[3:])
    fs = filesystem(store.url("f"), store.options)
    missing = []

    def remove_and_check(self, path, st):
        # A reader that lists the folder right before each old shard goes
        # (a new process: its own, empty index) finds every key.
        reader = ShardFolder(store.url("f"), fs, store.options)
        missing.extend(f for f in reader.find(identities) if isinstance(f, str))
        return real_remove(self, path, st)

    real_remove = ShardFolder.remove
    monkeypatch.setattr(ShardFolder, "remove", remove_and_check)
    report = w.compact_checkpoints(shard_size=12)
    monkeypatch.undo()
    assert missing == []
    assert (report["shards"], len(report["removed"])) == (11, 11)
    assert (report["kept"], report["dropped"]) == (30, 3)
    assert len(report["written"]) == 3 == len(shard_files(store))
    # outputs made before the compaction find their entries where they went
    np.testing.assert_array_equal(values(outs[3:]), expected(samples[3:]))
    new_process()
    out = sharded(store, log).transform(changed + samples[3:])
    np.testing.assert_array_equal(values(out), expected(changed + samples[3:]))
    assert count_rows(log, "transform") == 33
    assert [s for _, s, _ in w.iter_checkpoints()] == ["valid"] * 3
    assert w.compact_checkpoints(shard_size=12)["written"] == []  # nothing to do


def test_the_broken_compaction_order_is_caught(tmp_path, monkeypatch):
    """The broken variant: old shards removed before the new one is written."""
    store = Store("local", str(tmp_path))
    samples = random_samples(6)
    w = sharded(store, tmp_path / "calls.log", shard_size=2)
    w.transform(samples[:2])
    w.transform(samples[2:])
    identities = w.identities(samples)
    folder = shard_store.shard_folder(store.url("f"))
    real_write = ShardFolder.write
    missing = []

    def remove_first_then_write(self, records, payloads, times=None):
        for index in list(self.shards.values()):
            self.remove(index.path, index.stamp)
        reader = ShardFolder(store.url("f"), filesystem(store.url("f")))
        missing.extend(f for f in reader.find(identities) if isinstance(f, str))
        return real_write(self, records, payloads, times)

    monkeypatch.setattr(ShardFolder, "write", remove_first_then_write)
    folder.compact(shard_size=10)
    assert missing  # a reader in between missed keys: what the order prevents


def test_storage_level_compaction_keeps_every_step(tmp_path):
    store = Store("local", str(tmp_path))
    log = tmp_path / "calls.log"
    samples = random_samples(6)
    one, two = sharded(store, log, offset=1.0), sharded(store, log, offset=2.0)
    one.transform(samples[:3])
    one.transform(samples[3:])
    with pytest.warns(CheckpointWarning, match="6 stale"):
        two.transform(samples)
    copy = sharded(store, log, offset=1.0, force=True)
    copy.transform(samples[:3])  # an exact copy of entries already stored
    assert len(shard_files(store)) == 4
    report = shard_store.compact(store.url("f"), shard_size=100)
    assert (report["kept"], report["dropped"], len(shard_files(store))) == (12, 3, 1)
    new_process()
    one.transform(samples)
    two.transform(samples)
    assert count_rows(log, "transform") == 15


# ---------------------------------------------------------------------------
# shards sized by bytes
# ---------------------------------------------------------------------------
def entry_counts(store):
    """Entries per shard file, oldest first (names sort by time)."""
    counts = []
    for name in sorted(shard_files(store)):
        blob = store.read(os.path.join(store.url("f"), name))
        with h5py.File(h5py.h5f.open_file_image(blob), "r") as f:
            counts.append(len(f["entries"]))
    return counts


@pytest.mark.parametrize(
    ("limits", "counts"),
    [
        ({"shard_bytes": 20_000}, [2, 2, 2, 1]),  # 8,000 B per sample
        ({"shard_bytes": "20K"}, [2, 2, 2, 1]),  # 20,480 B
        ({"shard_bytes": 24_000}, [3, 3, 1]),  # exactly full
        ({"shard_bytes": 1}, [1] * 7),  # a sample larger than the budget: alone
        ({"shard_bytes": 10**9, "shard_size": 3}, [3, 3, 1]),
        ({"shard_bytes": 20_000, "shard_size": 1}, [1] * 7),
        ({"shard_size": 3}, [3, 3, 1]),  # the old spelling, as before
        ({}, [7]),  # the default: 64 MiB
    ],
)
def test_a_shard_closes_at_its_byte_budget(tmp_path, limits, counts):
    store = Store("local", str(tmp_path / "store"))
    log = tmp_path / "calls.log"
    samples = random_samples(7, n_features=1000)
    w = counting(store, log, layout="shards", **limits)
    out = w.transform(samples)
    assert entry_counts(store) == counts
    np.testing.assert_array_equal(values(out), expected(samples))
    new_process()
    again = counting(store, log, layout="shards", **limits).transform(samples)
    np.testing.assert_array_equal(values(again), expected(samples))
    assert count_rows(log, "transform") == 7


def test_transform_is_called_on_slices_that_fill_a_shard(tmp_path):
    """The first slice measures the outputs; the next ones fill one shard each."""
    store = Store("local", str(tmp_path / "store"))
    log = tmp_path / "calls.log"
    samples = random_samples(300, n_features=100)  # 800 B per output
    w = counting(store, log, layout="shards", shard_bytes=40_000)  # 50 per shard
    out = w.transform(samples)
    calls = [rows for _, rows in read_calls(log, "transform")]
    assert calls == [100, 50, 50, 50, 50]
    assert entry_counts(store) == [50] * 6
    np.testing.assert_array_equal(values(out), expected(samples))
    # an estimate from few samples grows the slices 4x at most
    big = Store("local", str(tmp_path / "big"))
    more = random_samples(1000, n_features=100, prefix="m")
    counting(big, log, layout="shards").transform(more)  # 64 MiB: one shard
    calls = [rows for _, rows in read_calls(log, "transform")][5:]
    assert calls == [100, 400, 500]
    assert entry_counts(big) == [1000]


def test_compaction_merges_shards_up_to_the_byte_budget(tmp_path):
    store = Store("local", str(tmp_path / "store"))
    log = tmp_path / "calls.log"
    samples = random_samples(10, n_features=10_000)  # 80,000 B per sample
    w = counting(store, log, layout="shards", shard_bytes=80_000)
    w.transform(samples)
    assert entry_counts(store) == [1] * 10
    report = w.compact_checkpoints(shard_bytes="320K")  # 327,680 B: 4 samples
    assert (report["kept"], report["dropped"]) == (10, 0)
    assert entry_counts(store) == [4, 4, 2]
    # a shard file of at least half the budget is full: nothing more to merge
    assert w.compact_checkpoints(shard_bytes=600_000)["written"] == []
    with pytest.raises(ValueError, match=re.escape("got shard_bytes='x'")):
        w.compact_checkpoints(shard_bytes="x")
    new_process()
    out = counting(store, log, layout="shards").transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))
    assert count_rows(log, "transform") == 10


def test_batched_input_identities_equal_each_sample_s_own(tmp_path):
    """The batch path (`value_digests`) gives each sample the identity it had alone."""
    from samplepipe.storage.identity import value_digest, value_digests
    from samplepipe.wrappers._checkpoint import attribute_identity

    rng = np.random.default_rng(0)
    block = rng.normal(size=(6, 4))
    data = [
        *block,  # rows of one array
        block[:, 0],  # not contiguous
        np.arange(3, dtype=">i4"),  # another byte order
        np.zeros((2, 2), dtype="f4"),
        np.array(["a", "bc"]),  # not a number: hashed alone
        np.zeros(2, dtype="M8[s]"),
        np.array(5.0),  # 0-d
        "text",
        None,
    ]
    samples = [Sample(x, key=f"k{i}") for i, x in enumerate(data)]
    samples.append(DelayedSample(lambda: block[0], key="lazy"))
    w = sharded(Store("local", str(tmp_path)), tmp_path / "calls.log")
    alone = [attribute_identity(s, "data") for s in samples]
    assert w.input_identities(samples) == alone
    assert value_digests(list(block)) == [value_digest(row) for row in block]
    assert len(set(alone[:6])) == 6  # each row its own digest
    changed = list(samples)
    changed[2] = Sample(block[2] + 1, key="k2")
    again = w.input_identities(changed)
    assert [i for i, (a, b) in enumerate(zip(alone, again)) if a != b] == [2]


def test_the_garbage_collector_is_restored_after_a_transform(tmp_path):
    """Paused around samplepipe's own bookkeeping only, and restored as it was."""
    import gc

    store = Store("local", str(tmp_path / "store"))
    log = tmp_path / "calls.log"
    samples = random_samples(5)
    assert gc.isenabled()
    sharded(store, log).transform(samples)
    assert gc.isenabled()
    bad = [*samples, Sample(np.zeros(4), key="../evil")]
    with pytest.raises(ValueError, match="evil"):
        sharded(store, log).transform(bad)  # raised while paused
    assert gc.isenabled()
    gc.disable()  # the application's choice is kept
    try:
        sharded(store, log).transform(random_samples(3, prefix="t"))
        assert not gc.isenabled()
    finally:
        gc.enable()


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------
def save_npy(data, path):
    np.save(path, data)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        (
            {"save_func": save_npy, "load_func": np.load},
            ValueError,
            "CheckpointWrapper got save_func=<function save_npy",
        ),
        ({"load_func": np.load}, ValueError, "got load_func=<function load"),
        ({"hash_fn": hash_string}, ValueError, "got hash_fn=<function hash_string"),
        ({"shard_size": 0}, ValueError, "got shard_size=0; it must be an int >= 1"),
        ({"shard_size": 2.5}, ValueError, "got shard_size=2.5; it must be an int"),
        (
            {"shard_bytes": 0},
            ValueError,
            "got shard_bytes=0; it must be a number of bytes (an int >= 1) or a str "
            "such as '64M'",
        ),
        ({"shard_bytes": "lots"}, ValueError, "got shard_bytes='lots'; it must be"),
        ({"shard_bytes": -5}, ValueError, "got shard_bytes=-5; it must be"),
        ({"shard_bytes": True}, ValueError, "got shard_bytes=True; it must be"),
        ({"shard_bytes": 1.5e6}, ValueError, "got shard_bytes=1500000.0; it must"),
        ({"layout": "rows"}, ValueError, "got layout='rows'; it must be 'files'"),
    ],
)
def test_bad_shard_parameters_are_clear_errors(tmp_path, params, error, message):
    params = {"layout": "shards", **params}
    w = CheckpointWrapper(
        SampleWrapper(CountingTransformer(stateless=True)),
        features_dir=str(tmp_path / "f"),
        **params,
    )
    with pytest.raises(error, match=re.escape(message)):
        w.transform(random_samples(2))
    assert not (tmp_path / "f").exists()
    if "save_func" in params or "hash_fn" in params:
        with pytest.raises(error, match="with layout='shards'"):
            w.transform(random_samples(2))


def test_failed_inputs_pass_through_in_line_without_an_entry(tmp_path):
    log = tmp_path / "calls.log"
    store = Store("local", str(tmp_path))
    samples = random_samples(4)
    samples[1] = Sample(None, parent=samples[1])
    report = TransformReport()
    out = sharded(store, log).transform_samples(samples, report=report)
    assert out[1].data is None
    assert (report.computed, report.failed, report.loaded) == (3, 1, 0)
    assert report.stamps[1] is None
    assert report.paths[0] == report.paths[2]  # one shard
    assert count_rows(log, "transform") == 3


# ---------------------------------------------------------------------------
# requests on S3: one per shard, not one per sample
# ---------------------------------------------------------------------------
def test_s3_requests_per_shard(s3_server, tmp_path):  # noqa: F811 - the fixture
    store, log = s3_store(s3_server), tmp_path / "calls.log"
    seen = requests_by_phase(
        s3_server,
        lambda: sharded(store, log, shard_size=50),
        random_samples(100),
        new_process,
    )
    assert count_rows(log, "transform") == 100
    first = seen["first transform (compute + write)"]
    assert first["PUT"] == 2 and first["LIST"] <= 2 and len(first) == 2
    assert seen["second transform, same process"] == {"LIST": 1}
    assert seen["second transform, new process"] == {"LIST": 1, "GET": 2}
    assert seen["loading the outputs"] == {}
    # the shards, then every other file (listed as unknown); a new process
    # reads each shard's index again
    assert seen["iter_checkpoints (validated before)"] == {"LIST": 2}
    assert seen["iter_checkpoints, new process"] == {"LIST": 2, "GET": 2}

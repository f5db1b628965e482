"""The sharded layout's per-process index: bounded memory, every lookup promise kept.

Real shard files on a local path, written through the storage API
(`ShardFolder.write_new`, as `CheckpointWrapper(layout="shards")` writes) and
one through the wrapper. "A new process" is a cleared per-process state
(`shards.clear`) or, for the memory bound, a real child process.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from samplepipe import CheckpointWrapper, Sample, SampleWrapper
from samplepipe.storage import Identity, filesystem, hdf5
from samplepipe.storage import shard_index as index_module
from samplepipe.storage import shards as shard_store
from samplepipe.storage.shard_index import (
    COLUMNS,
    ChangedWhileReading,
    Found,
    KeyFilter,
)
from samplepipe.storage.shards import ShardFolder
from samplepipe.testing import CountingTransformer, count_rows

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "samplepipe" / "storage"


@pytest.fixture(autouse=True)
def _fresh_process_state():
    shard_store.clear()
    yield
    shard_store.clear()


def write(root, identities, values=None):
    """One shard of these identities; sample i holds ``values[i]`` (default i)."""
    values = range(len(identities)) if values is None else values
    encoded = [hdf5.encode(np.array([float(v)])) for v in values]
    folder = shard_store.shard_folder(root)
    return folder.write_new(
        identities, [p for p, _ in encoded], [k for _, k in encoded]
    )


def fresh(root):
    """The folder as a new process sees it."""
    shard_store.clear()
    folder = ShardFolder(root, filesystem(root))
    folder.refresh()
    return folder


def value_of(folder, found):
    assert isinstance(found, Found), found
    group, row, _ = found.shard.entries[found.position].tolist()
    return float(folder._arrays(found.shard)[group][row][0])


# ---------------------------------------------------------------------------
# memory held by the index
# ---------------------------------------------------------------------------
MEASURE = textwrap.dedent(
    """
    import gc, json, sys, tracemalloc
    from samplepipe.storage import Identity, shards
    from samplepipe.storage.shard_index import COLUMNS, TEXTS
    COLUMNS.maxbytes = int(sys.argv[2])
    gc.collect()
    tracemalloc.start()
    folder = shards.shard_folder(sys.argv[1])
    folder.refresh()
    shards.DATA.clear()  # payloads and record texts are bounded caches of
    TEXTS.clear()  # their own, not the index
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    count = sum(len(i) for i in folder.shards.values())
    wanted = [
        Identity("s" * 32, f"{i:032x}", f"sample/{i:07d}")
        for i in range(0, count, 7)
    ]
    found = folder.find(wanted)
    hits = sum(isinstance(f, shards.Found) for f in found)
    del wanted, found
    shards.DATA.clear()
    TEXTS.clear()
    gc.collect()
    print(json.dumps({
        "held": held,
        "entries": count,
        "columns": COLUMNS.nbytes,
        "found": hits,
        "asked": len(range(0, count, 7)),
        "held_after_find": tracemalloc.get_traced_memory()[0],
    }))
    """
)


def write_many(tmp_path, n, per_shard):
    """A folder of ``n`` checkpoints in shards of ``per_shard``, as MEASURE asks."""
    root = str(tmp_path / "f")
    for start in range(0, n, per_shard):
        identities = [
            Identity("s" * 32, f"{i:032x}", f"sample/{i:07d}")
            for i in range(start, start + per_shard)
        ]
        write(root, identities)
    return root


def _measure(root, maxbytes):
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, root, str(maxbytes)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("n", [60_000, 120_000])
def test_the_index_of_a_folder_holds_a_few_bytes_a_checkpoint_past_its_bound(
    tmp_path, n
):
    """Measured in a child process with tracemalloc, the per-entry arrays bounded.

    Past `COLUMNS.maxbytes` (1 MiB here: about 13,000 entries) a folder holds
    per checkpoint its key filter and verified flag (~2.3 B); every lookup
    still finds every checkpoint, reading dropped arrays back from the shards.
    """
    per_shard = 10_000
    root = write_many(tmp_path, n, per_shard)
    bound = 1 << 20
    figures = _measure(root, bound)
    assert figures["entries"] == n
    assert figures["found"] == figures["asked"] == len(range(0, n, 7))
    one_shard = 90 * per_shard  # the newest shard's arrays are always kept
    assert figures["columns"] <= bound + one_shard
    for held in (figures["held"], figures["held_after_find"]):
        beyond = held - figures["columns"]
        assert beyond / n <= 8, f"{beyond / n:.1f} B held per checkpoint"


def test_the_index_of_a_folder_holds_at_most_150_bytes_a_checkpoint(tmp_path):
    """Within its bound the index holds ~90 B an entry (~590 B before arrays)."""
    n = 60_000
    root = write_many(tmp_path, n, 10_000)
    figures = _measure(root, 1 << 30)
    assert figures["entries"] == n
    assert figures["found"] == figures["asked"]
    per_entry = figures["held"] / n
    assert per_entry <= 150, f"{per_entry:.0f} B held per checkpoint"


def test_the_wrapper_finds_its_sharded_checkpoints_from_a_new_process(tmp_path):
    log = tmp_path / "calls.log"
    samples = [Sample(np.full(4, i, float), key=f"k:{i}/é") for i in range(300)]

    def wrapper():
        inner = SampleWrapper(
            CountingTransformer(offset=1.0, stateless=True, log_path=str(log))
        )
        return CheckpointWrapper(
            inner, features_dir=str(tmp_path / "f"), layout="shards", shard_size=64
        )

    first = wrapper().fit(samples).transform(samples)
    assert count_rows(log, "transform") == 300
    shard_store.clear()
    again = wrapper().fit(samples).transform(samples)
    assert count_rows(log, "transform") == 300  # nothing computed again
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.data, b.data)


# ---------------------------------------------------------------------------
# lookups
# ---------------------------------------------------------------------------
KEYS = ["plain", "a:b", "a:b:c:d:e:f", ":", "é/ü/漢字", "emoji 🙂", "x" * 300, ""]


def test_many_keys_and_keys_with_colons_and_unicode_are_found(tmp_path):
    root = str(tmp_path / "f")
    identities = [Identity("step", f"in{i}", k) for i, k in enumerate(KEYS)]
    identities += [Identity("step", f"{i:032x}", f"k/{i}") for i in range(5_000)]
    for start in range(0, len(identities), 1_000):
        part = identities[start : start + 1_000]
        write(root, part, range(start, start + len(part)))
    folder = fresh(root)
    found = folder.find(identities)
    for i, result in enumerate(found):
        assert value_of(folder, result) == i
        assert result.record.endswith(f":{identities[i].key}")
        assert result.record == identities[i].record(
            *result.shard.entry(result.position)[2:]
        )
    # another step or other inputs: stale; an unknown key: missing
    others = [Identity("other", "in0", "plain"), Identity("step", "in9", "a:b")]
    others += [Identity("step", "in0", "plain:"), Identity("step", "in0", "unknown")]
    assert folder.find(others) == ["stale", "stale", "missing", "missing"]
    assert [r for _, _, r in folder.refs("a:b")] == [1]
    assert folder.by_key.get("nothing") is None


def test_a_forged_digest_collision_is_told_apart(tmp_path, monkeypatch):
    """Every key gets one lookup digest: the key check and the records decide."""
    real = index_module.key_digests

    def colliding(keys):
        digests = real(keys).copy()
        digests[:, 0] = 42  # one 8-byte lookup digest for every key
        return digests

    monkeypatch.setattr(index_module, "key_digests", colliding)
    root = str(tmp_path / "f")
    a, b = Identity("step", "in", "A"), Identity("step", "in", "B")
    write(root, [a], [1.0])
    write(root, [b], [2.0])
    folder = fresh(root)
    wanted = [a, b, Identity("step", "in", "C"), Identity("other", "in", "A")]
    found = folder.find(wanted)
    assert value_of(folder, found[0]) == 1.0
    assert value_of(folder, found[1]) == 2.0
    assert found[2:] == ["missing", "stale"]
    assert [r[1] for r in folder.refs("A")] == [found[0].shard.path]
    # the broken variant: a lookup digest trusted alone serves B's entry for A
    # (the key filters hash both columns: without them, B's shard is asked too)
    for index in folder.shards.values():
        index.filter = None
    refs = folder._candidates(colliding(["A"]))
    assert len(refs[0]) == 2


def test_a_forged_key_check_collision_still_reads_the_records(tmp_path, monkeypatch):
    """Both digest columns forged: the record text read from the shard decides."""
    real = index_module.key_digests

    def colliding(keys):
        digests = real(keys).copy()
        digests[:] = 7
        return digests

    monkeypatch.setattr(index_module, "key_digests", colliding)
    root = str(tmp_path / "f")
    write(root, [Identity("step", "in", "A")])
    folder = fresh(root)
    assert folder.find([Identity("other", "in", "B")]) == ["missing"]
    assert folder.find([Identity("other", "in", "A")]) == ["stale"]
    assert folder.refs("B") == []


def test_the_newest_duplicate_across_shards_wins(tmp_path):
    root = str(tmp_path / "f")
    ident = Identity("step", "in", "k:1")
    write(root, [ident, Identity("step", "in", "k:2")], [1.0, 5.0])
    write(root, [ident], [2.0])
    write(root, [Identity("other", "in", "k:1")], [3.0])  # newer, another step
    for folder in (shard_store.shard_folder(root), fresh(root)):
        found = folder.find([ident])[0]
        assert value_of(folder, found) == 2.0
        times = [t for t, _, _ in folder.refs("k:1")]
        assert len(times) == 3 and times == sorted(times, reverse=True)
    write(root, [ident], [2.0])  # an exact copy of the newest entry
    report = shard_store.compact(root, shard_size=10)
    assert report["dropped"] == 1  # the copy: distinct records all stay
    folder = fresh(root)
    assert len(folder.refs("k:1")) == 3
    found = folder.find([Identity("other", "in", "k:1")])[0]
    assert found.record.startswith("3:other:in:")
    report = folder.compact(10, "step")  # this step's valid entries only
    assert report["dropped"] == 2
    folder = fresh(root)
    found = folder.find([ident, Identity("step", "in", "k:2")])
    assert [value_of(folder, f) for f in found] == [2.0, 5.0]
    assert len(folder.refs("k:1")) == 1


def test_a_corrupted_payload_is_judged_corrupt_and_an_older_copy_serves(tmp_path):
    root = str(tmp_path / "f")
    ident, other = Identity("step", "in", "k"), Identity("step", "in", "j")
    old = write(root, [ident], [1.0])
    new = write(root, [ident, other], [2.0, 3.0])
    with h5py.File(new.path, "r+") as f:  # damage both payloads, not the index
        f["data/0"][...] = -1.0
    folder = fresh(root)
    found, damaged = folder.find([ident, other])
    assert found.shard.path == old.path and value_of(folder, found) == 1.0
    assert damaged == "corrupt"
    statuses = {p: s for p, s, _, _ in folder.judge("step")}
    assert statuses == {old.path: "valid", new.path: "corrupt"}
    assert new.path in {p for p, i in folder.shards.items() if i.status == "ok"}
    assert folder.shards[new.path].verified.dtype == np.int8


def test_an_unreadable_shard_is_corrupt_and_its_keys_missing(tmp_path):
    root = str(tmp_path / "f")
    written = write(root, [Identity("step", "in", "k")])
    blob = pathlib.Path(written.path).read_bytes()
    pathlib.Path(written.path).write_bytes(blob[: len(blob) // 2])
    folder = fresh(root)
    assert folder.find([Identity("step", "in", "k")]) == ["missing"]
    assert folder.shards[written.path].status == "corrupt"


def test_removing_and_compacting_shards_update_the_index(tmp_path):
    root = str(tmp_path / "f")
    identities = [Identity("step", "in", f"k{i}") for i in range(30)]
    written = [
        write(root, identities[i : i + 3], range(i, i + 3)) for i in range(0, 30, 3)
    ]
    folder = shard_store.shard_folder(root)
    assert folder.remove(written[0].path, written[0].stamp)
    found = folder.find(identities)
    assert found[:3] == ["missing"] * 3
    assert [value_of(folder, f) for f in found[3:]] == list(range(3, 30))
    report = folder.compact(shard_size=100)
    assert len(report["removed"]) == 9 and len(report["written"]) == 1
    for view in (folder, fresh(root)):
        found = view.find(identities)
        assert found[:3] == ["missing"] * 3
        assert {f.shard.path for f in found[3:]} == set(report["written"])
        assert [value_of(view, f) for f in found[3:]] == list(range(3, 30))


def test_a_key_filter_never_misses_and_rarely_errs():
    keys = [f"sample/{i:07d}" for i in range(20_000)]
    digests = index_module.key_digests(keys)
    held = KeyFilter(digests[:10_000])
    assert held.might_hold(digests[:10_000]).all()  # no false negatives
    false_hits = held.might_hold(digests[10_000:]).mean()
    assert false_hits < 0.03, false_hits  # ~1 % at 10 bits a key
    assert held.nbytes <= 10_000 * 10 // 8 + 8
    assert held.might_hold(digests[:0]).shape == (0,)


def test_dropped_arrays_are_read_back_and_a_vanished_shard_is_missing(
    tmp_path, monkeypatch
):
    root = str(tmp_path / "f")
    a = [Identity("step", "in", f"a{i}") for i in range(50)]
    b = [Identity("step", "in", f"b{i}") for i in range(50)]
    first = write(root, a, range(50))
    monkeypatch.setattr(COLUMNS, "maxbytes", 1)  # only the newest shard's arrays
    second = write(root, b, range(100, 150))
    folder = shard_store.shard_folder(root)
    held = folder.shards[first.path]
    assert held._cols is None and folder.shards[second.path]._cols is not None
    assert held._verified is None  # all verified when written: nothing held
    assert (held.verified == index_module.GOOD).all()
    found = folder.find(a[::7])  # read back from the shard
    assert [value_of(folder, f) for f in found] == list(range(0, 50, 7))
    assert folder.shards[second.path]._cols is None  # dropped in turn
    pathlib.Path(second.path).unlink()
    with pytest.raises(ChangedWhileReading, match="changed or vanished"):
        folder.shards[second.path].columns()
    assert folder.find(b[:2] + a[:1])[:2] == ["missing", "missing"]
    assert value_of(folder, folder.find(a[:1])[0]) == 0.0


def test_records_are_split_in_one_place():
    """identity.Record splits record texts; the shard modules never do."""
    for name in ("shard_file.py", "shard_folders.py", "shard_index.py", "shards.py"):
        assert 'split(":", 5)' not in (SRC / name).read_text(encoding="utf-8")


def test_keys_outside_every_shards_range_read_no_shard_back(tmp_path, monkeypatch):
    """A batch of new keys must not read dropped arrays back on filter false hits."""
    root = str(tmp_path / "f")
    write(root, [Identity("step", "in", f"a/{i:05d}") for i in range(5000)])
    monkeypatch.setattr(COLUMNS, "maxbytes", 1)  # only the newest shard's arrays
    write(root, [Identity("step", "in", f"b/{i:05d}") for i in range(5000)])
    folder = shard_store.shard_folder(root)
    reads = []

    def counting(read):
        def counted(index):
            reads.append(index.path)
            return read(index)

        return counted

    for index in folder.shards.values():  # the loaders each shard was given
        index.loader = counting(index.loader)
    new = [Identity("step", "in", f"c/{i:05d}") for i in range(5000)]
    assert folder.find(new) == ["missing"] * 5000
    assert reads == []  # ~1 % of 5,000 keys pass a filter: the key range decides
    found = folder.find([Identity("step", "in", "a/00007")])
    assert value_of(folder, found[0]) == 7.0 and len(reads) == 1


def test_a_batch_across_many_shards_ranges_reads_back_only_the_shards_of_its_keys(
    tmp_path, monkeypatch
):
    """Keys that outgrow their width (s/9999, then s/10000) sort inside old ranges.

    A batch of the last cached keys and new ones spans almost every shard's
    range: each shard is asked only for the keys within its own range, so the
    new keys read back the one shard whose range holds them, not every shard
    on its filter's ~1 % false hits (at 10M samples: 153 shards read back, 70 s).
    """
    root = str(tmp_path / "f")
    monkeypatch.setattr(COLUMNS, "maxbytes", 1)  # only the newest shard's arrays
    for start in range(0, 6000, 500):
        write(
            root,
            [Identity("step", "in", f"s/{i:04d}") for i in range(start, start + 500)],
            range(start, start + 500),
        )
    folder = shard_store.shard_folder(root)
    first_key = {index.path: min(index.keys) for index in folder.shards.values()}
    reads = []
    for index in folder.shards.values():
        read = index.loader

        def counted(index, read=read):
            reads.append(first_key[index.path])
            return read(index)

        index.loader = counted
    batch = [Identity("step", "in", f"s/{i:04d}") for i in range(5500, 6000)]
    batch += [Identity("step", "in", f"s/{i}") for i in range(10_000, 11_000)]
    found = folder.find(batch)
    assert [value_of(folder, f) for f in found[:500]] == list(range(5500, 6000))
    assert found[500:] == ["missing"] * 1000
    # "s/10000" sorts between "s/1000" and "s/1001"; the last shard holds the
    # cached keys (read back if the first read dropped its arrays): no other
    assert "s/1000" in reads and set(reads) <= {"s/1000", "s/5500"}, reads

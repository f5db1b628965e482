import functools
import os
import re
import tracemalloc
import warnings

import h5py
import numpy as np
import pytest
from sklearn.preprocessing import FunctionTransformer

from samplepipe import (
    CheckpointWarning,
    CheckpointWrapper,
    Sample,
    SampleSet,
    SampleWrapper,
    check_key,
    hash_string,
)
from samplepipe.storage import (
    FORMAT_VERSION,
    VALIDATED,
    Identity,
    is_temporary_file,
    read_model_header,
)
from samplepipe.storage.files import HOST_TAG
from samplepipe.testing import CountingTransformer, count_rows, read_calls

from .conftest import counting_checkpoint, make_samples

#: The checkpointed `CountingTransformer` of these tests adds 0 unless told.
checkpointed = functools.partial(counting_checkpoint, offset=0.0)


def all_files(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder)
        for d, _, files in os.walk(folder)
        for f in files
    )


def stack(samples):
    return np.stack([s.data for s in samples])


def test_transform_writes_one_file_per_key_and_loads_lazily(tmp_path, samples):
    wrapper, log = checkpointed(tmp_path, offset=1.0)
    out = wrapper.transform(samples)
    assert all_files(tmp_path / "features") == [
        f"s/{i:05d}.h5" for i in range(len(samples))
    ]
    assert type(out[0]).__name__ == "DelayedSample"
    np.testing.assert_allclose(stack(out), stack(samples) + 1.0)
    assert [o.key for o in out] == [s.key for s in samples]
    assert out[0].target == samples[0].target
    with h5py.File(tmp_path / "features" / "s" / "00000.h5") as f:
        np.testing.assert_allclose(f["array"][()], samples[0].data + 1.0)
        identity, checksum, kind = Identity.parse(f.attrs["samplepipe"])
    assert (identity.format, identity.key, kind) == (FORMAT_VERSION, "s/00000", "a")
    assert identity.step == wrapper.step_identity()
    assert identity == wrapper.identities(samples[:1])[0]


def test_second_transform_computes_nothing(tmp_path, samples):
    wrapper, log = checkpointed(tmp_path)
    first = wrapper.transform(samples)
    second = wrapper.transform(samples)
    assert read_calls(log, "transform") == [("transform", len(samples))]
    np.testing.assert_array_equal(stack(first), stack(second))


def test_fresh_wrapper_in_another_process_state_reuses_files(tmp_path, samples):
    wrapper, log = checkpointed(tmp_path)
    wrapper.transform(samples)
    VALIDATED.clear()  # as in a new process: validate from the files
    again, _ = checkpointed(tmp_path)
    again.transform(samples)
    assert count_rows(log, "transform") == len(samples)


def test_ten_new_samples_out_of_a_thousand_compute_exactly_ten(tmp_path):
    wrapper, log = checkpointed(tmp_path)
    wrapper.transform(make_samples(1000))
    out = wrapper.transform(make_samples(1010))
    assert read_calls(log, "transform") == [("transform", 1000), ("transform", 10)]
    assert len(out) == 1010


def test_changing_a_parameter_recomputes_all_with_one_warning(tmp_path, samples):
    wrapper, log = checkpointed(tmp_path, offset=2.0)
    wrapper.transform(samples)
    wrapper.set_params(estimator__estimator__offset=3.0)
    with pytest.warns(CheckpointWarning, match=f"{len(samples)} stale") as record:
        out = wrapper.transform(samples)
    assert len(record) == 1
    assert count_rows(log, "transform") == 2 * len(samples)
    np.testing.assert_allclose(stack(out), stack(samples) + 3.0)


def test_refitting_recomputes_all(tmp_path, samples):
    wrapper, log = checkpointed(tmp_path, stateless=False)
    wrapper.fit(samples)
    wrapper.transform(samples)
    other = make_samples(20, seed=1)
    wrapper.fit(other)  # a different fitted state, same parameters
    with pytest.warns(CheckpointWarning, match="stale"):
        out = wrapper.transform(samples)
    assert count_rows(log, "transform") == 2 * len(samples)
    np.testing.assert_allclose(stack(out), stack(samples) + stack(other).mean(axis=0))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero(path):
    open(path, "wb").close()


def _garbage(path):
    with open(path, "wb") as f:
        f.write(os.urandom(2048))


def _foreign_key(path):
    with h5py.File(path, "r+") as f:
        head = f.attrs["samplepipe"].rsplit(":", 1)[0]
        f.attrs["samplepipe"] = f"{head}:s/99999"


@pytest.mark.parametrize(
    ("damage", "status"),
    [
        (_truncate, "corrupt"),
        (_zero, "corrupt"),
        (_garbage, "corrupt"),
        (_foreign_key, "foreign"),
    ],
)
def test_damaged_files_are_recomputed(tmp_path, samples, damage, status):
    wrapper, log = checkpointed(tmp_path, offset=1.0)
    wrapper.transform(samples)
    path = wrapper.checkpoint_path(samples[3].key)
    damage(path)
    with pytest.warns(CheckpointWarning, match=f"1 {status}"):
        out = wrapper.transform(samples)
    assert read_calls(log, "transform") == [("transform", 20), ("transform", 1)]
    np.testing.assert_allclose(out[3].data, samples[3].data + 1.0)
    with h5py.File(path) as f:
        assert f.attrs["samplepipe"].endswith(":s/00003")


def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_intact(tmp_path):
    samples = make_samples(5)
    wrapper, log = checkpointed(tmp_path, offset=1.0)
    wrapper.transform(samples)
    path = wrapper.checkpoint_path(samples[0].key)
    before = open(path, "rb").read()

    def failing_save(data, tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk on fire")

    broken, _ = checkpointed(
        tmp_path, offset=1.0, save_func=failing_save, load_func=np.load, force=True
    )
    with pytest.raises(RuntimeError, match="disk on fire"):
        broken.transform(samples)
    assert open(path, "rb").read() == before
    assert not [f for f in all_files(tmp_path / "features") if "tmp" in f]
    # a programming error is not retried
    assert count_rows(log, "transform") == 10


def test_temporary_files_of_crashed_writers_are_removed(tmp_path, samples):
    wrapper, _ = checkpointed(tmp_path)
    folder = tmp_path / "features" / "s"
    folder.mkdir(parents=True)
    dead = folder / ".00000.h5.otherhost-999999-abcd1234.tmp"
    dead.write_bytes(b"partial")
    os.utime(dead, (0, 0))  # very old
    crashed_here = folder / f".00001.h5.{HOST_TAG}-999999-abcd1234.tmp"
    crashed_here.write_bytes(b"partial")  # pid 999999 does not exist
    wrapper.transform(samples)
    assert not dead.exists()
    assert not crashed_here.exists()


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        (None, "must be strings"),
        (3, "must be strings"),
        ("", "must not be empty"),
        ("/etc/passwd", "relative paths"),
        ("../evil", "without empty, '.' or '..' components"),
        ("a/../../b", "'..' components"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a\x85b", "control characters"),
        ("a/./b", "normalised"),
        ("a//b", "normalised"),
        ("a/", "normalised"),
        (".hidden", "reserved for temporary files"),
        ("x" * 300, "at most 200 bytes"),
        ("\ud800", "UTF-8"),
    ],
)
def test_bad_keys_raise_before_anything_is_written(tmp_path, key, rule):
    wrapper, log = checkpointed(tmp_path)
    samples = [*make_samples(3), Sample(np.zeros(4), key=key)]
    msg = f"CheckpointWrapper got key {key!r} for sample 3; "
    with pytest.raises(ValueError, match=re.escape(msg)) as info:
        wrapper.transform(samples)
    assert rule in str(info.value)
    assert not (tmp_path / "features").exists()
    assert read_calls(log) == []


def test_a_sample_without_key_names_the_fix(tmp_path):
    wrapper, _ = checkpointed(tmp_path)
    with pytest.raises(ValueError, match="without a 'key' attribute"):
        wrapper.transform([Sample(np.zeros(4))])


@pytest.mark.parametrize(
    "key", ["a..b", "a/b.c", "subject 1/sample-2", "ü/日本", "a:b", "C:x"]
)
def test_unusual_but_valid_keys(tmp_path, key):
    assert check_key(key) == key
    wrapper, _ = checkpointed(tmp_path)
    out = wrapper.transform([Sample(np.ones(4), key=key)])
    np.testing.assert_array_equal(out[0].data, np.ones(4))
    assert os.path.isfile(tmp_path / "features" / (key + ".h5"))


def test_none_outputs_are_not_saved_and_stay_in_line(tmp_path):
    wrapper, log = checkpointed(tmp_path)
    out = wrapper.transform(
        [Sample(None, key="a", subject=1), Sample(np.ones(4), key="b")]
    )
    assert out[0] == Sample(None, key="a", subject=1)
    assert [o.key for o in out] == ["a", "b"]
    assert all_files(tmp_path / "features") == ["b.h5"]
    assert read_calls(log, "transform") == [("transform", 1)]  # None not passed


def test_force_recomputes(tmp_path, samples):
    wrapper, log = checkpointed(tmp_path)
    wrapper.transform(samples)
    wrapper.set_params(force=True)
    wrapper.transform(samples)
    assert count_rows(log, "transform") == 2 * len(samples)


def test_sample_sets_checkpoint_their_samples(tmp_path, samples):
    wrapper, log = checkpointed(tmp_path, offset=1.0)
    sets = [SampleSet(samples[:4], key="set-a"), SampleSet(samples[4:6], key="set-b")]
    out = wrapper.transform(sets)
    assert [len(s) for s in out] == [4, 2]
    assert out[1].key == "set-b"
    np.testing.assert_allclose(out[1][0].data, samples[4].data + 1.0)
    assert len(all_files(tmp_path / "features")) == 6
    wrapper.transform(sets)
    assert count_rows(log, "transform") == 6


def test_hash_fn_spreads_keys_evenly(tmp_path):
    keys = [f"subject_{s:04d}/sample_{i:02d}" for s in range(1000) for i in range(10)]
    buckets = {}
    for k in keys:
        buckets[hash_string(k)] = buckets.get(hash_string(k), 0) + 1
    assert len(buckets) == 1000
    assert max(buckets.values()) < 30  # bob put up to 730 files in one folder
    wrapper, _ = checkpointed(tmp_path, hash_fn=hash_string)
    wrapper.transform([Sample(np.ones(4), key="a/b")])
    assert all_files(tmp_path / "features") == [f"{hash_string('a/b')}/a/b.h5"]


def test_other_sample_attribute_is_checkpointed(tmp_path, samples):
    log = str(tmp_path / "log")
    inner = SampleWrapper(
        CountingTransformer(offset=1.0, log_path=log, stateless=True),
        output_attribute="features",
    )
    wrapper = CheckpointWrapper(inner, features_dir=str(tmp_path / "f"))
    out = wrapper.transform(samples)
    assert not hasattr(samples[0], "features")
    np.testing.assert_array_equal(out[0].data, samples[0].data)
    np.testing.assert_allclose(out[0].features, samples[0].data + 1.0)
    out = wrapper.transform(samples)
    np.testing.assert_allclose(out[5].features, samples[5].data + 1.0)
    assert count_rows(log, "transform") == len(samples)


def test_custom_save_and_load_functions(tmp_path, samples):
    def save(data, path):
        with open(path, "wb") as f:
            np.save(f, data)

    wrapper, log = checkpointed(
        tmp_path, offset=1.0, extension=".npy", save_func=save, load_func=np.load
    )
    out = wrapper.transform(samples)
    np.testing.assert_allclose(out[2].data, samples[2].data + 1.0)
    assert os.path.isfile(tmp_path / "features" / "s" / "00002.npy.meta.json")
    wrapper.transform(samples)
    assert count_rows(log, "transform") == len(samples)
    wrapper.set_params(estimator__estimator__offset=5.0)
    with pytest.warns(CheckpointWarning, match="stale"):
        wrapper.transform(samples)


def test_transient_io_errors_are_retried(tmp_path, samples):
    attempts = []

    def flaky_save(data, path):
        attempts.append(path)
        if len(attempts) == 1:
            raise OSError("the NFS server blinked")
        np.save(open(path, "wb"), data)

    wrapper, _ = checkpointed(
        tmp_path, extension=".npy", save_func=flaky_save, load_func=np.load
    )
    out = wrapper.transform(samples[:2])
    assert len(attempts) == 3
    np.testing.assert_array_equal(out[0].data, samples[0].data)


def test_checkpoint_listing_and_cleaning(tmp_path, samples):
    wrapper, _ = checkpointed(tmp_path)
    wrapper.transform(samples)
    _zero(wrapper.checkpoint_path(samples[0].key))
    tmp = tmp_path / "features" / "s" / f".x.h5.{HOST_TAG}-999999-abcd.tmp"
    tmp.write_bytes(b"x")
    statuses = {}
    for _, status, _ in wrapper.iter_checkpoints():
        statuses[status] = statuses.get(status, 0) + 1
    assert statuses == {"valid": 19, "corrupt": 1, "temporary": 1}
    assert len(wrapper.remove_checkpoints(dry_run=True)) == 2
    assert tmp.exists()
    removed = wrapper.remove_checkpoints()
    assert {status for _, status, _ in removed} == {"corrupt", "temporary"}
    assert not tmp.exists()
    assert len(all_files(tmp_path / "features")) == 19


# -- models -------------------------------------------------------------------
def model_wrapper(tmp_path, **params):
    log = str(tmp_path / "calls.log")
    inner = SampleWrapper(CountingTransformer(log_path=log, **params))
    return CheckpointWrapper(inner, model_path=str(tmp_path / "model.pkl")), log


def test_same_params_load_the_model(tmp_path, samples):
    wrapper, log = model_wrapper(tmp_path)
    wrapper.fit(samples)
    fresh, _ = model_wrapper(tmp_path)
    estimator = fresh.estimator.estimator
    fresh.fit(samples)
    assert count_rows(log, "fit") == len(samples)  # one fit only
    assert fresh.estimator.estimator is estimator  # references stay valid
    np.testing.assert_allclose(estimator.mean_, stack(samples).mean(axis=0))


def test_changed_params_refit_and_keep_the_new_params(tmp_path, samples):
    wrapper, log = model_wrapper(tmp_path, offset=1.0)
    wrapper.fit(samples)
    changed, _ = model_wrapper(tmp_path, offset=100.0)
    changed.fit(samples)
    assert len(read_calls(log, "fit")) == 2
    assert changed.estimator.estimator.offset == 100.0  # bob overwrote it
    header = read_model_header(str(tmp_path / "model.pkl"))
    assert (
        "CountingTransformer" in header["class"] or "SampleWrapper" in header["class"]
    )


def test_truncated_model_is_refitted(tmp_path, samples):
    wrapper, log = model_wrapper(tmp_path)
    wrapper.fit(samples)
    _truncate(str(tmp_path / "model.pkl"))
    again, _ = model_wrapper(tmp_path)
    again.fit(samples)
    assert len(read_calls(log, "fit")) == 2
    assert again.load_model()  # rewritten whole


def test_force_refits_the_model(tmp_path, samples):
    wrapper, log = model_wrapper(tmp_path)
    wrapper.fit(samples)
    wrapper.set_params(force=True)
    wrapper.fit(samples)
    assert len(read_calls(log, "fit")) == 2


def _partial_reads(path, writer, blob, rounds=5):
    """How often a reader saw a half-written file while ``writer`` wrote ``blob``.

    ``writer(path, write)`` must call ``write(target)``; ``write`` puts half of
    ``blob`` into ``target``, lets a reader look at ``path`` (and waits until it
    did), then writes the rest.
    """
    partial = 0
    for _ in range(rounds):

        def write(target):
            nonlocal partial
            with open(target, "wb") as f:
                f.write(blob[: len(blob) // 2])
                f.flush()
                if os.path.exists(path):  # the reader's look, mid-write
                    with open(path, "rb") as r:
                        seen = r.read()
                    partial += seen not in (blob,)
            with open(target, "ab") as f:
                f.write(blob[len(blob) // 2 :])

        writer(path, write)
    return partial


def test_model_is_written_atomically(tmp_path, samples):
    from samplepipe.storage.files import atomic_write

    wrapper, _ = model_wrapper(tmp_path)
    wrapper.fit(samples)
    path = str(tmp_path / "model.pkl")
    blob = open(path, "rb").read()
    assert [p.name for p in tmp_path.iterdir() if is_temporary_file(p.name)] == []
    # samplepipe's writer: a reader only ever sees the whole previous file
    assert _partial_reads(path, atomic_write, blob) == 0

    def in_place(path, write):  # the broken variant: writes where readers look
        write(path)

    assert _partial_reads(path, in_place, blob) == 5  # the check catches it


def test_no_paths_means_plain_behaviour(tmp_path, samples):
    wrapper = CheckpointWrapper(SampleWrapper(CountingTransformer(stateless=True)))
    out = wrapper.fit(samples).transform(samples)
    np.testing.assert_array_equal(stack(out), stack(samples))
    assert list(tmp_path.iterdir()) == []


def test_parameters_are_checked_at_use(tmp_path, samples):
    wrapper = CheckpointWrapper(SampleWrapper(CountingTransformer()), features_dir=3)
    with pytest.raises(TypeError, match="features_dir=3"):
        wrapper.transform(samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CheckpointWrapper(None, attempts=0)  # constructing never validates


def test_many_threads_load_checkpoints_at_once(tmp_path):
    # h5py crashed (segmentation fault) when threads opened and closed files at
    # once (h5py issue #2920); samplepipe serialises its HDF5 calls.
    from concurrent.futures import ThreadPoolExecutor

    samples = make_samples(400)
    wrapper, _ = checkpointed(tmp_path, offset=1.0)
    out = wrapper.transform(samples)
    expected = stack(samples) + 1.0

    def load(offset):
        return [o.data for o in out[offset::4] for _ in range(3)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        loaded = list(pool.map(load, range(4)))
    for offset, values in enumerate(loaded):
        np.testing.assert_array_equal(np.stack(values[::3]), expected[offset::4])


def test_writing_holds_one_file_image_at_a_time(tmp_path):
    # 50 outputs of 400 KB: the file images of all of them would add 20 MB on
    # top of the outputs (measured: 51 outputs' worth); written one at a time
    # they add about one image (measured: 2.3).
    wrapper = CheckpointWrapper(
        SampleWrapper(FunctionTransformer()), features_dir=str(tmp_path / "f")
    )
    rng = np.random.default_rng(0)
    samples = [Sample(rng.random(50_000), key=f"k{i:02d}") for i in range(50)]
    one = samples[0].data.nbytes
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        out = wrapper.transform(samples)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(all_files(tmp_path / "f")) == 50
    # the transform's own outputs (50 of them) are in memory anyway
    extra = peak - 50 * one
    assert extra < 10 * one, f"{extra / one:.1f} outputs' worth above the outputs"
    np.testing.assert_array_equal(out[7].data, samples[7].data)


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_checkpoint_samples_writes_what_transform_would_and_builds_no_output(
    tmp_path, layout
):
    samples = make_samples(12)
    step, log = counting_checkpoint(tmp_path, layout=layout)
    report = step.checkpoint_samples(samples)
    assert (report.computed, report.loaded, report.failed) == (12, 0, 0)
    assert count_rows(log, "transform") == 12
    again = step.checkpoint_samples(samples[3:9])
    assert (again.computed, again.loaded) == (0, 6)
    # transform then loads every one of them, computing nothing
    out = step.transform(samples)
    assert count_rows(log, "transform") == 12
    np.testing.assert_allclose(
        np.stack([s.data for s in out]), np.stack([s.data for s in samples]) + 1.0
    )
    # what it fills is what the flows' manifests read: one stamp per sample
    assert len(report.stamps) == 12 and None not in report.stamps


def test_a_batch_of_keys_is_checked_as_each_key_is():
    from samplepipe.storage.keys import check_keys

    plain = [f"subject_{i}/sample-{i}.h" for i in range(50)]
    check_keys(plain)  # the fast path
    for bad, rule in [
        ("a\nb", "control characters"),  # would split into two plain lines
        ("x" * 201, "at most 200 bytes"),
        ("a/.b", "reserved for temporary files"),
        (None, "keys must be strings"),
    ]:
        keys = [*plain, bad]
        with pytest.raises(
            ValueError, match=re.escape(f"for sample {len(plain) + 7};")
        ) as e:
            check_keys(keys, start=7)
        assert rule in str(e.value)
    check_keys([*plain, "a..b", "ü/日本", "x" * 200])  # unusual, valid: no error


def test_keys_digest_is_the_digest_of_each_key_and_a_nul():
    import hashlib

    from samplepipe.storage.keys import keys_digest

    for keys in ([], ["a"], ["a", "b/c", "ü"], ["", ""]):
        h = hashlib.sha256()
        for key in keys:
            h.update(key.encode() + b"\0")
        assert keys_digest(keys) == keys_digest(iter(keys)) == h.hexdigest()

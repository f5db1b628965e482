"""Streaming sources, lazy outputs and chained batch identity in the flows."""

import functools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

import samplepipe
from samplepipe.outputs import PipelineOutputs
from samplepipe.sources import SampleSource, as_source
from samplepipe.testing import CountingTransformer, count_rows

from .conftest import make_samples

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning"),
]


def two_steps(tmp_path):
    return Pipeline(
        [
            (
                "first",
                CountingTransformer(
                    offset=1.0, stateless=True, log_path=str(tmp_path / "first.log")
                ),
            ),
            (
                "second",
                CountingTransformer(
                    offset=2.0, stateless=True, log_path=str(tmp_path / "second.log")
                ),
            ),
        ]
    )


def dirs(tmp_path, batch_size=10):
    return {
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": batch_size,
    }


def generated(i):
    return np.full(3, float(i))


class Indexed:
    """An indexed source of generated samples; counts the batches it gave."""

    def __init__(self, n, version=None, fail_at=None):
        self.n = n
        self.calls = []
        self.fail_at = fail_at
        if version is not None:
            self.version = version

    def __len__(self):
        return self.n

    def batch(self, start, stop):
        self.calls.append((start, stop))
        if self.fail_at is not None and start <= self.fail_at < stop:
            raise OSError(f"disk gone at {self.fail_at}")
        return [self.sample(i) for i in range(start, stop)]

    def sample(self, i):
        return samplepipe.DelayedSample(
            functools.partial(generated, i), key=f"g{i:05d}", subject=i % 3
        )


def values(samples):
    return np.stack([s.data for s in samples])


def test_a_list_an_indexed_source_and_a_stream_give_the_same_outputs(tmp_path):
    from samplepipe.flows import transform_pipeline

    expected = np.stack([generated(i) + 1.0 + 2.0 for i in range(35)])
    source = Indexed(35)
    out = transform_pipeline(two_steps(tmp_path), source, **dirs(tmp_path / "a"))
    assert isinstance(out, PipelineOutputs)
    assert len(out) == 35 and out.n_batches == 4
    np.testing.assert_array_equal(values(out), expected)
    # metadata of the inputs, read again from the indexed source
    assert [s.key for s in out[:3]] == ["g00000", "g00001", "g00002"]
    assert out[-1].subject == 34 % 3
    assert out[5:25:10][1].key == "g00015"

    as_list = Indexed(35).batch(0, 35)
    out_list = transform_pipeline(two_steps(tmp_path), as_list, **dirs(tmp_path / "b"))
    np.testing.assert_array_equal(values(out_list.to_list()), expected)

    bounds = [(0, 7), (7, 19), (19, 30), (30, 35)]  # regrouped into tens
    parts = [Indexed(35).batch(start, stop) for start, stop in bounds]
    assert sum(len(p) for p in parts) == 35
    out_stream = transform_pipeline(
        two_steps(tmp_path), iter(parts), **dirs(tmp_path / "c")
    )
    assert out_stream.n_batches == 4
    np.testing.assert_array_equal(values(out_stream), expected)
    assert [s.key for s in out_stream] == [f"g{i:05d}" for i in range(35)]


def test_the_flow_reads_each_batch_once_and_holds_only_batches_in_flight(tmp_path):
    from samplepipe.flows import transform_pipeline

    source = Indexed(60)
    out = transform_pipeline(
        two_steps(tmp_path), source, max_batches_in_flight=2, **dirs(tmp_path)
    )
    # one batch for the batch size is not asked (given), then each batch once
    assert source.calls == [(s, s + 10) for s in range(0, 60, 10)]
    assert count_rows(tmp_path / "first.log", "transform") == 60
    assert out[59].data[0] == 59 + 3.0  # the view reads its batch again
    assert source.calls[-1] == (50, 60)


def test_a_stream_with_a_length_must_yield_exactly_that_many(tmp_path):
    from samplepipe.flows import transform_pipeline

    class Short:
        def __init__(self, n, declared):
            self.n, self.declared = n, declared

        def __len__(self):
            return self.declared

        def __iter__(self):
            yield make_samples(self.n, prefix="short")

    with pytest.raises(ValueError, match="yielded 8 samples but its __len__ is 9"):
        transform_pipeline(two_steps(tmp_path), Short(8, 9), **dirs(tmp_path))
    with pytest.raises(ValueError, match=r"more than its __len__ \(7\)"):
        transform_pipeline(two_steps(tmp_path), Short(8, 7), **dirs(tmp_path / "b"))
    # the longer one fails before the extra batch is written
    assert count_rows(tmp_path / "first.log", "transform") == 8

    class Wrong(Indexed):
        def batch(self, start, stop):
            return super().batch(start, stop)[:-1]

    with pytest.raises(ValueError, match=r"batch\(0, 10\) returned 9 samples"):
        transform_pipeline(two_steps(tmp_path), Wrong(20), **dirs(tmp_path / "c"))


def test_duplicate_keys_across_batches_fail_before_the_duplicate_is_written(
    tmp_path,
):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(30, prefix="d")
    samples[23].key = samples[4].key

    def stream():
        for start in range(0, 30, 10):
            yield samples[start : start + 10]

    with pytest.raises(ValueError, match="key 'd/00004' for samples 4 and 23"):
        transform_pipeline(two_steps(tmp_path), stream(), **dirs(tmp_path))
    # the two batches before it went through both steps; nothing of the third
    assert count_rows(tmp_path / "first.log", "transform") == 20
    assert count_rows(tmp_path / "second.log", "transform") == 20
    folder = tmp_path / "features" / "first"
    written = sorted(str(p.relative_to(folder))[:-3] for p in folder.rglob("*.h5"))
    assert written == sorted(s.key for s in samples[:20])


def test_a_source_that_fails_half_way_keeps_the_finished_batches(tmp_path):
    from samplepipe.flows import PipelineRunError, transform_pipeline

    with pytest.raises(PipelineRunError, match=r"batch\(30, 40\) raised OSError") as e:
        transform_pipeline(
            two_steps(tmp_path), Indexed(50, fail_at=33), **dirs(tmp_path)
        )
    assert "disk gone at 33" in str(e.value)
    assert isinstance(e.value.__cause__, OSError)
    assert count_rows(tmp_path / "second.log", "transform") == 30

    def stream():
        yield make_samples(12, prefix="st")
        raise RuntimeError("the database went away")

    with pytest.raises(PipelineRunError, match="while yielding item 1") as e:
        transform_pipeline(two_steps(tmp_path), stream(), **dirs(tmp_path / "s"))
    assert "the database went away" in str(e.value)

    # the run again, with the source back, computes only the rest
    out = transform_pipeline(two_steps(tmp_path), Indexed(50), **dirs(tmp_path))
    assert len(out) == 50
    assert count_rows(tmp_path / "first.log", "transform") == 50 + 12 - 2
    assert count_rows(tmp_path / "second.log", "transform") == 50 + 12 - 2


def test_a_source_version_recomputes_its_lazy_samples(tmp_path):
    from samplepipe.flows import transform_pipeline

    transform_pipeline(two_steps(tmp_path), Indexed(20, version=1), **dirs(tmp_path))
    transform_pipeline(two_steps(tmp_path), Indexed(20, version=1), **dirs(tmp_path))
    assert count_rows(tmp_path / "first.log", "transform") == 20
    out = transform_pipeline(
        two_steps(tmp_path), Indexed(20, version="2"), **dirs(tmp_path)
    )
    assert count_rows(tmp_path / "first.log", "transform") == 40
    assert out[0].data_version == "2"
    with pytest.raises(TypeError, match=r"samples.version must be a str or an int"):
        transform_pipeline(
            two_steps(tmp_path), Indexed(20, version=[1]), **dirs(tmp_path)
        )


def test_a_cached_run_chains_batches_without_visiting_samples(tmp_path, monkeypatch):
    from samplepipe.flows import transform_pipeline
    from samplepipe.wrappers import CheckpointWrapper

    samples = make_samples(40, prefix="c")
    transform_pipeline(two_steps(tmp_path), samples, **dirs(tmp_path))
    calls = []
    real = CheckpointWrapper.input_identities

    def counting(self, batch):
        calls.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(CheckpointWrapper, "input_identities", counting)
    out = transform_pipeline(two_steps(tmp_path), samples, **dirs(tmp_path))
    # the first step hashes its inputs (4 batches); the second step's cache
    # key is chained from the first step's manifests: no sample visited
    assert calls == [10, 10, 10, 10]
    assert count_rows(tmp_path / "second.log", "transform") == 40
    np.testing.assert_allclose(values(out), values(samples) + 3.0)

    # one sample changed: its batch runs again, and computes that sample only
    samples[13] = samplepipe.Sample(samples[13].data + 100, key=samples[13].key)
    out = transform_pipeline(two_steps(tmp_path), samples, **dirs(tmp_path))
    assert count_rows(tmp_path / "first.log", "transform") == 41
    assert count_rows(tmp_path / "second.log", "transform") == 41
    np.testing.assert_allclose(out[13].data, samples[13].data + 3.0)


def test_a_chained_key_counts_the_metadata_a_later_step_reads(tmp_path):
    from samplepipe import wrap
    from samplepipe.flows import transform_pipeline

    class AddSubject(CountingTransformer):
        def transform(self, X, subject):
            return super().transform(X) + np.asarray(subject, dtype=float)[:, None]

    def pipeline():
        return Pipeline(
            [
                (
                    "first",
                    CountingTransformer(
                        offset=1.0, stateless=True, log_path=str(tmp_path / "first.log")
                    ),
                ),
                (
                    "second",
                    wrap(
                        ["sample"],
                        AddSubject(
                            stateless=True, log_path=str(tmp_path / "second.log")
                        ),
                        transform_extra_arguments=[("subject", "subject")],
                    ),
                ),
            ]
        )

    samples = make_samples(20, prefix="m")
    for i, s in enumerate(samples):
        s.subject = i
    transform_pipeline(pipeline(), samples, **dirs(tmp_path))
    samples[3].subject = 300  # metadata only the second step reads
    out = transform_pipeline(pipeline(), samples, **dirs(tmp_path))
    assert count_rows(tmp_path / "first.log", "transform") == 20
    assert count_rows(tmp_path / "second.log", "transform") == 21
    np.testing.assert_allclose(out[3].data, samples[3].data + 1.0 + 300)


def test_outputs_view_behaves_like_a_sequence(tmp_path):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(25, prefix="v")
    out = transform_pipeline(two_steps(tmp_path), samples, **dirs(tmp_path))
    as_list = out.to_list()
    assert [s.key for s in out] == [s.key for s in samples]
    keys = [s.key for s in samples]
    assert out[-1].key == keys[24] and out[24].key == keys[24]
    assert [s.key for s in out[8:12]] == keys[8:12]
    assert [s.key for s in out[::10]] == keys[::10]
    assert [len(b) for b in out.batches()] == [10, 10, 5]
    with pytest.raises(IndexError):
        out[25]
    assert len(as_list) == 25 and "25 samples in 3 batches" in repr(out)
    assert transform_pipeline(two_steps(tmp_path), [], **dirs(tmp_path)) == []


def test_sources_reject_what_is_not_one():
    with pytest.raises(TypeError, match="must be a list of samples, an object with"):
        as_source(42)
    with pytest.raises(TypeError, match="must be a list of samples"):
        as_source(np.zeros((3, 2)))
    source = as_source(iter([[samplepipe.Sample(1, key="a")], [1.5]]))
    with pytest.raises(TypeError, match=r"samples\[1\] is float"):
        list(source.batches(None))
    with pytest.raises(TypeError, match="a stream yields lists of samples"):
        list(as_source(iter([samplepipe.Sample(1, key="a")])).batches(None))
    with pytest.raises(ValueError, match="keys must"):
        list(as_source([samplepipe.Sample(1, key="../x")]).batches(5))
    assert isinstance(as_source([]), SampleSource)


@pytest.mark.parametrize(
    ("bounds", "per_sample"),
    [(None, 200), ((256 << 10, 5_000), 24)],
    ids=["default-bounds", "small-bounds"],
)
def test_outputs_of_a_large_run_hold_little_memory_per_sample(
    tmp_path, bounds, per_sample
):
    """A subprocess runs 60,000 generated samples and keeps the outputs.

    What the flow's process holds once the run is over, outputs kept, is
    measured with tracemalloc: at most 200 bytes per sample (the list of
    per-sample objects it held before was about 4.5 KB per sample). With
    small bounds on the outputs' manifests in memory and on the source's key
    table, the rest goes to their files: at most 24 bytes per sample (0.9 MB
    measured: the newest batch's manifest, the Bloom filters of the shard
    folder and of the key table, the batches' task states), where the default
    bounds hold all of it (118 B a sample measured).
    """
    script = textwrap.dedent(
        """
        import functools, gc, json, sys, tracemalloc
        import numpy as np
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import FunctionTransformer
        import samplepipe
        from samplepipe.flows import transform_pipeline
        from samplepipe.outputs import PipelineOutputs
        from samplepipe.sources import _KeyTable

        def gen(i):
            return np.full(2, float(i))

        class Source:
            def __len__(self):
                return N
            def batch(self, start, stop):
                return [samplepipe.DelayedSample(functools.partial(gen, i),
                        key=f"k{i}") for i in range(start, stop)]

        N = int(sys.argv[1])
        if len(sys.argv) > 3:
            PipelineOutputs.held, _KeyTable.held = map(int, sys.argv[3:])
        pipe = Pipeline([("twice", FunctionTransformer(np.negative))])
        kw = dict(features_dir=sys.argv[2] + "/f", model_dir=sys.argv[2] + "/m",
                  batch_size=5_000, layout="shards")
        transform_pipeline(pipe, Source(), **kw)  # warm: imports, caches
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        out = transform_pipeline(pipe, Source(), **kw)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        print(json.dumps({"held": held, "n": len(out),
                          "last": float(out[-1].data[0]),
                          "spilled": out._file is not None}))
        """
    )
    path = tmp_path / "big.py"
    path.write_text(script)
    n = 60_000
    proc = subprocess.run(
        [sys.executable, str(path), str(n), str(tmp_path)]
        + [str(b) for b in bounds or ()],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == n and result["last"] == -(n - 1)
    assert result["spilled"] is (bounds is not None)
    assert result["held"] / n <= per_sample, result


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_outputs_arrays_read_a_batch_at_once_with_the_same_checks(tmp_path, layout):
    from samplepipe.errors import CorruptCheckpointError
    from samplepipe.flows import transform_pipeline
    from samplepipe.storage import shards

    samples = make_samples(45, prefix="a")
    out = transform_pipeline(
        two_steps(tmp_path), samples, layout=layout, **dirs(tmp_path, batch_size=20)
    )
    arrays = list(out.arrays())
    assert [len(a) for a in arrays] == [20, 20, 5]
    np.testing.assert_array_equal(np.concatenate(arrays), values(out))
    np.testing.assert_allclose(np.concatenate(arrays), values(samples) + 3.0)
    # a checkpoint damaged on disk is noticed, as when a sample loads
    shards.clear()  # nothing kept in memory from the run
    folder = tmp_path / "features" / "second"
    victim = sorted(p for p in folder.rglob("*") if p.is_file())[0]
    victim.write_bytes(b"garbage" * 100)
    with pytest.raises((CorruptCheckpointError, OSError)):
        list(out.arrays())


def test_outputs_arrays_refuse_failed_samples(tmp_path):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(12, prefix="f")
    samples[5] = samplepipe.Sample(np.full(4, -7.0), key=samples[5].key)
    pipe = Pipeline([("only", CountingTransformer(stateless=True, fail_on=-7.0))])
    out = transform_pipeline(pipe, samples, on_error="skip", **dirs(tmp_path))
    assert out[5].data is None
    with pytest.raises(ValueError, match=r"1 sample\(s\) failed .*'f/00005'"):
        list(out.arrays())


def test_the_key_table_past_its_bound_keeps_its_filters_and_finds_duplicates(
    monkeypatch,
):
    from samplepipe.sources import _KeyTable

    monkeypatch.setattr(_KeyTable, "held", 3_000)
    table = _KeyTable()
    rng = np.random.default_rng(0)
    # names in no order: every key's digest is anywhere in every run
    names = [f"{rng.integers(1 << 62):x}/{i}" for i in range(60_000)]
    for start in range(0, 60_000, 1_000):
        table.add(names[start : start + 1_000], start, "source")
    assert len(table._spilled) >= 14 and table._file is not None
    # runs in memory <= 3,000 keys (16 B each) + filters of 1.25 B a key
    assert table.nbytes <= 2 * 3_000 * 16 + 60_000 * 2, table.nbytes
    # a key of the first batch (on disk) and one of the last runs in memory
    again = [f"new/{i}" for i in range(1_000)]
    again[417] = names[5]
    with pytest.raises(ValueError, match=r"for samples 5 and 60417; keys must be"):
        table.add(again, 60_000, "source")
    again[417] = names[59_999]
    with pytest.raises(ValueError, match=r"for samples 59999 and 60417"):
        table.add(again, 60_000, "source")
    again[417] = "new/417"
    table.add(again, 60_000, "source")  # nothing of the failed tries was kept


def test_outputs_and_keys_past_their_bounds_go_to_disk_and_read_back(
    tmp_path, monkeypatch
):
    import pickle

    from samplepipe.flows import transform_pipeline
    from samplepipe.sources import _KeyTable

    samples = make_samples(60, prefix="s")
    expected = transform_pipeline(two_steps(tmp_path), samples, **dirs(tmp_path / "a"))
    monkeypatch.setattr(PipelineOutputs, "held", 1)  # the newest batch only
    monkeypatch.setattr(_KeyTable, "held", 15)
    out = transform_pipeline(two_steps(tmp_path), Indexed(60), **dirs(tmp_path / "b"))
    assert out._file is not None and out.n_batches == 6
    on_disk = [
        n for n, parts in enumerate(out._parts) if not hasattr(parts[0][1], "keys")
    ]
    assert on_disk == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(values(out), values(Indexed(60).batch(0, 60)) + 3.0)
    assert [s.key for s in out[5:25]] == [f"g{i:05d}" for i in range(5, 25)]
    assert [a.shape for a in out.arrays()] == [(10, 3)] * 6
    copy = pickle.loads(pickle.dumps(out))
    assert copy._file is None and [s.key for s in copy] == [s.key for s in out]
    assert len(expected) == 60

    class Duplicate(Indexed):
        def sample(self, i):
            return super().sample(7 if i == 52 else i)

    with pytest.raises(ValueError, match="key 'g00007' for samples 7 and 52"):
        transform_pipeline(two_steps(tmp_path), Duplicate(60), **dirs(tmp_path / "c"))
    folder = tmp_path / "c" / "features" / "first"
    assert len(list(folder.rglob("*.h5"))) == 50  # five batches, not the sixth

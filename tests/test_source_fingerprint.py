"""Fingerprinted sources: a cached batch is recognised without being read."""

import functools

import numpy as np
import pytest

import samplepipe
from samplepipe.sources import SampleSource
from samplepipe.testing import count_rows

from .test_sources import Indexed, dirs, generated, two_steps

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning"),
]


class Fingerprinted(Indexed):
    """Generated samples; ``fingerprint`` from ``version`` and the positions.

    ``changed`` maps positions to a value added to their data (a changed
    sample); ``bumped`` holds positions whose batch gets a new fingerprint;
    ``keys`` maps positions to other keys.
    """

    def __init__(
        self, n, version="1", changed=None, bumped=(), keys=None, fail_at=None
    ):
        super().__init__(n, version=version, fail_at=fail_at)
        self.changed = changed or {}
        self.bumped = set(bumped)
        self.keys = keys or {}

    def fingerprint(self, start, stop):
        bump = any(start <= i < stop for i in self.bumped)
        return f"generated-{self.version}{'+' if bump else ''}[{start}:{stop}]"

    def sample(self, i):
        return samplepipe.DelayedSample(
            functools.partial(shifted, i, self.changed.get(i, 0.0)),
            key=self.keys.get(i, f"g{i:05d}"),
            subject=i % 3,
        )


def shifted(i, by):
    return generated(i) + by


def expected(n, changed=None):
    changed = changed or {}
    return np.stack([generated(i) + changed.get(i, 0.0) + 3.0 for i in range(n)])


def values(samples):
    return np.stack([s.data for s in samples])


def files_of(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_a_cached_run_never_reads_a_fingerprinted_source(tmp_path, layout):
    from samplepipe.flows import transform_pipeline

    kwargs = dict(dirs(tmp_path), layout=layout)
    first = Fingerprinted(35)
    out = transform_pipeline(two_steps(tmp_path), first, **kwargs)
    assert first.calls == [(0, 10), (10, 20), (20, 30), (30, 35)]
    np.testing.assert_array_equal(values(out), expected(35))

    again = Fingerprinted(35)
    out = transform_pipeline(two_steps(tmp_path), again, **kwargs)
    assert again.calls == []  # every batch of both steps cached, none read
    assert count_rows(tmp_path / "first.log", "transform") == 35
    assert count_rows(tmp_path / "second.log", "transform") == 35
    # the outputs read their metadata from the source when asked for
    assert out[12].subject == 0 and out[12].key == "g00012"
    np.testing.assert_array_equal(values(out), expected(35))

    # the data set grew: the grown last batch and the new one are read; the
    # grown batch's first five samples load from their checkpoints
    grown = Fingerprinted(47)
    out = transform_pipeline(two_steps(tmp_path), grown, **kwargs)
    assert grown.calls == [(30, 40), (40, 47)]
    assert count_rows(tmp_path / "first.log", "transform") == 47
    assert count_rows(tmp_path / "second.log", "transform") == 47
    np.testing.assert_array_equal(values(out), expected(47))


def test_a_new_fingerprint_rereads_its_batch_and_computes_what_changed(tmp_path):
    from samplepipe.flows import transform_pipeline

    transform_pipeline(two_steps(tmp_path), Fingerprinted(30), **dirs(tmp_path))
    # batch [10:20] has a new fingerprint, its samples are the same: read,
    # judged sample by sample, nothing computed
    same = Fingerprinted(30, bumped={15})
    transform_pipeline(two_steps(tmp_path), same, **dirs(tmp_path))
    assert same.calls == [(10, 20)]
    assert count_rows(tmp_path / "first.log", "transform") == 30

    # sample 22 changed and its batch says so: that sample alone is computed
    changed = Fingerprinted(30, changed={22: 100.0}, bumped={22})
    out = transform_pipeline(two_steps(tmp_path), changed, **dirs(tmp_path))
    assert changed.calls == [(20, 30)]
    assert count_rows(tmp_path / "first.log", "transform") == 31
    assert count_rows(tmp_path / "second.log", "transform") == 31
    np.testing.assert_array_equal(values(out), expected(30, {22: 100.0}))

    # the fingerprint is a promise: a change it does not tell is not seen
    unsaid = Fingerprinted(30, changed={22: 100.0, 3: 5.0}, bumped={22})
    out = transform_pipeline(two_steps(tmp_path), unsaid, **dirs(tmp_path))
    assert unsaid.calls == []
    assert out[3].data[0] == expected(30, {22: 100.0})[3][0]


def test_a_duplicate_key_in_a_reread_batch_fails_before_it_is_written(tmp_path):
    from samplepipe.flows import transform_pipeline

    transform_pipeline(two_steps(tmp_path), Fingerprinted(30), **dirs(tmp_path))
    folder = tmp_path / "features"
    before = files_of(folder)
    # batch [20:30] now holds sample 4's key; batch [0:10] is cached, unread
    dup = Fingerprinted(30, keys={24: "g00004"}, bumped={24})
    with pytest.raises(ValueError, match="key 'g00004' for samples 4 and 24"):
        transform_pipeline(two_steps(tmp_path), dup, **dirs(tmp_path))
    assert dup.calls == [(20, 30)]
    assert count_rows(tmp_path / "first.log", "transform") == 30
    assert files_of(folder) == before


def test_a_fingerprinted_source_that_fails_half_way_keeps_the_finished_batches(
    tmp_path,
):
    from samplepipe.flows import PipelineRunError, transform_pipeline

    failing = Fingerprinted(50, fail_at=33)
    with pytest.raises(PipelineRunError, match=r"batch\(30, 40\) raised OSError") as e:
        transform_pipeline(two_steps(tmp_path), failing, **dirs(tmp_path))
    assert "disk gone at 33" in str(e.value)
    assert count_rows(tmp_path / "second.log", "transform") == 30

    back = Fingerprinted(50)
    out = transform_pipeline(two_steps(tmp_path), back, **dirs(tmp_path))
    assert back.calls == [(30, 40), (40, 50)]
    assert count_rows(tmp_path / "first.log", "transform") == 50
    np.testing.assert_array_equal(values(out), expected(50))


def test_a_bad_fingerprint_is_an_error_that_names_it(tmp_path):
    from samplepipe.flows import PipelineRunError, transform_pipeline

    class Number(Fingerprinted):
        def fingerprint(self, start, stop):
            return 7

    with pytest.raises(TypeError, match=r"samples.fingerprint\(0, 10\) returned 7"):
        transform_pipeline(two_steps(tmp_path), Number(20), **dirs(tmp_path))

    class Broken(Fingerprinted):
        def fingerprint(self, start, stop):
            raise KeyError(start)

    with pytest.raises(
        PipelineRunError, match=r"samples.fingerprint\(0, 10\) raised KeyError"
    ) as e:
        transform_pipeline(two_steps(tmp_path), Broken(20), **dirs(tmp_path))
    assert isinstance(e.value.__cause__, KeyError)

    class NotAMethod(Fingerprinted):
        fingerprint = "v1"

    with pytest.raises(TypeError, match="samples.fingerprint must be a method"):
        SampleSource(NotAMethod(20))
    assert count_rows(tmp_path / "first.log", "transform") == 0


def test_on_dask_a_fingerprinted_source_is_read_by_the_flow(tmp_path, dask_client):
    from prefect_dask import DaskTaskRunner

    from samplepipe.flows import transform_pipeline

    from ._prefect_helpers import run

    runner = DaskTaskRunner(address=dask_client.scheduler.address)
    dasked = transform_pipeline.with_options(task_runner=runner)
    for number in (1, 2):
        source = Fingerprinted(25)
        state, _ = run(dasked, two_steps(tmp_path), source, **dirs(tmp_path))
        assert state.is_completed(), state
        # the workers cannot check keys in the flow's table: the flow reads
        # every batch (a cached run still reads; its tasks are cached)
        assert source.calls == [(0, 10), (10, 20), (20, 25)]
        np.testing.assert_array_equal(values(state.result()), expected(25))
        assert count_rows(tmp_path / "first.log", "transform") == 25, number

import os
import re
import threading

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from samplepipe.testing import CountingTransformer, count_rows, read_calls

from ._prefect_helpers import artifacts, run, task_runs
from .conftest import make_samples

pytestmark = [
    pytest.mark.slow,  # Prefect flow runs, 10-50 s each with their fitted fixture
    pytest.mark.usefixtures("prefect_harness"),
    # recomputing stale checkpoints is what several tests here provoke
    pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning"),
]

BATCH = 250


def counting_pipeline(tmp_path, offset=1.0, fail_marker=None, fail_on=None):
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "count",
                CountingTransformer(
                    offset=offset,
                    log_path=str(tmp_path / "count.log"),
                    fail_marker=fail_marker,
                    fail_on=fail_on,
                ),
            ),
            ("last", CountingTransformer(log_path=str(tmp_path / "last.log"))),
        ]
    )


def dirs(tmp_path, batch_size=BATCH):
    """The flows' folders under ``tmp_path``, and a batch size."""
    return {
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": batch_size,
    }


def data(samples):
    return np.stack([s.data for s in samples])


def reference(tmp_path, train, samples, offset=1.0):
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            ("count", CountingTransformer(offset=offset)),
            ("last", CountingTransformer()),
        ]
    )
    return pipe.fit(data(train)).transform(data(samples))


@pytest.fixture
def fitted(tmp_path):
    from samplepipe.flows import fit_pipeline

    train = make_samples(1000)
    fit_pipeline(counting_pipeline(tmp_path), train, **dirs(tmp_path))
    return train


def test_fit_then_transform_gives_scikit_learns_result(tmp_path, fitted):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(600, seed=3, prefix="test")
    out = transform_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    assert [o.key for o in out] == [s.key for s in samples]
    assert type(out[0]).__name__ == "DelayedSample"
    np.testing.assert_allclose(data(out), reference(tmp_path, fitted, samples))
    assert sorted(os.listdir(tmp_path / "models")) == [
        "count.pkl",
        "last.pkl",
        "scale.pkl",
    ]
    assert len(os.listdir(tmp_path / "features" / "last" / "test")) == 600


def test_second_run_is_all_cached_and_computes_nothing(tmp_path, fitted):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(1000, seed=3, prefix="test")
    first, _ = run(
        transform_pipeline, counting_pipeline(tmp_path), samples, **dirs(tmp_path)
    )
    rows = count_rows(tmp_path / "count.log", "transform")
    state, flow_run_id = run(
        transform_pipeline, counting_pipeline(tmp_path), samples, **dirs(tmp_path)
    )
    assert state.is_completed()
    assert count_rows(tmp_path / "count.log", "transform") == rows
    runs = task_runs(flow_run_id)
    transforms = [r for r in runs if ".transform[" in r.name]
    assert len(transforms) == 3 * 4
    assert {r.state.name for r in transforms} == {"Cached"}
    np.testing.assert_allclose(data(state.result()), data(first.result()))


def test_ten_new_samples_compute_exactly_ten_per_step(tmp_path, fitted):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(1000, seed=3, prefix="test")
    transform_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    before = {
        n: count_rows(tmp_path / f"{n}.log", "transform") for n in ("count", "last")
    }
    more = make_samples(1010, seed=3, prefix="test")
    out = transform_pipeline(counting_pipeline(tmp_path), more, **dirs(tmp_path))
    for name in ("count", "last"):
        assert count_rows(tmp_path / f"{name}.log", "transform") - before[name] == 10
    np.testing.assert_allclose(data(out), reference(tmp_path, fitted, more))


def test_changing_a_parameter_recomputes(tmp_path, fitted):
    from samplepipe.flows import fit_pipeline, transform_pipeline

    samples = make_samples(500, seed=3, prefix="test")
    transform_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    before = count_rows(tmp_path / "last.log", "transform")
    changed = counting_pipeline(tmp_path, offset=5.0)
    fit_pipeline(changed, fitted, **dirs(tmp_path))  # count refits: new params
    out = transform_pipeline(
        counting_pipeline(tmp_path, offset=5.0), samples, **dirs(tmp_path)
    )
    # the changed step and every step after it recompute everything
    assert count_rows(tmp_path / "last.log", "transform") - before >= 500
    np.testing.assert_allclose(data(out), reference(tmp_path, fitted, samples, 5.0))


def test_refitting_on_other_data_recomputes(tmp_path, fitted):
    from samplepipe.flows import fit_pipeline, transform_pipeline

    samples = make_samples(500, seed=3, prefix="test")
    transform_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    fits = len(read_calls(tmp_path / "count.log", "fit"))
    other = make_samples(800, seed=9, prefix="train2")
    fit_pipeline(counting_pipeline(tmp_path), other, **dirs(tmp_path))
    assert len(read_calls(tmp_path / "count.log", "fit")) == fits + 1
    before = count_rows(tmp_path / "count.log", "transform")
    out = transform_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    assert count_rows(tmp_path / "count.log", "transform") - before == 500
    np.testing.assert_allclose(data(out), reference(tmp_path, other, samples))


def test_deleting_one_checkpoint_recomputes_exactly_that_sample(tmp_path, fitted):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(1000, seed=3, prefix="test")
    transform_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    before = count_rows(tmp_path / "count.log", "transform")
    os.unlink(tmp_path / "features" / "count" / "test" / "00042.h5")
    state, flow_run_id = run(
        transform_pipeline, counting_pipeline(tmp_path), samples, **dirs(tmp_path)
    )
    assert count_rows(tmp_path / "count.log", "transform") - before == 1
    names = {r.name: r.state.name for r in task_runs(flow_run_id)}
    assert names["count.transform[0:250]"] == "Completed"
    assert names["count.transform[250:500]"] == "Cached"
    assert os.path.isfile(tmp_path / "features" / "count" / "test" / "00042.h5")


def test_a_failing_sample_fails_the_run_and_a_rerun_computes_only_it(tmp_path, fitted):
    from samplepipe.flows import PipelineRunError, fit_pipeline, transform_pipeline

    samples = make_samples(1000, seed=3, prefix="test")
    marker = tmp_path / "fail"
    bad_value = float(
        StandardScaler().fit(data(fitted)).transform(data(samples))[600, 0]
    )
    pipe = counting_pipeline(tmp_path, fail_marker=str(marker), fail_on=bad_value)
    fit_pipeline(pipe, fitted, **dirs(tmp_path))  # no marker yet: fits fine
    before = count_rows(tmp_path / "count.log", "transform")
    marker.write_text("x")
    msg = "step 'count': 1 sample(s) failed in batches [500:750]: 'test/00600'"
    with pytest.raises(PipelineRunError, match=re.escape(msg)) as info:
        transform_pipeline(pipe, samples, **dirs(tmp_path))
    assert [k for k, _ in info.value.failures] == ["test/00600"]
    # the other 249 samples of the failing batch are computed and checkpointed
    assert count_rows(tmp_path / "count.log", "transform") - before == 999
    marker.unlink()
    state, flow_run_id = run(transform_pipeline, pipe, samples, **dirs(tmp_path))
    assert state.is_completed()
    assert count_rows(tmp_path / "count.log", "transform") - before == 1000
    states = {r.name: r.state.name for r in task_runs(flow_run_id)}
    assert states["count.transform[500:750]"] == "Completed"
    assert states["count.transform[0:250]"] == "Cached"
    assert states["scale.transform[0:250]"] == "Cached"


def test_io_errors_are_retried_programming_errors_are_not(tmp_path, fitted):
    from samplepipe.flows import fit_pipeline, transform_pipeline

    samples = make_samples(250, seed=3, prefix="test")
    marker = tmp_path / "fail"
    pipe = counting_pipeline(tmp_path, fail_marker=str(marker))  # OSError

    class FailOnce(CountingTransformer):
        """Raises OSError while the marker exists, and removes it: one failure."""

        def _failing(self, X):
            exc = super()._failing(X)
            if exc is not None:
                os.unlink(self.fail_marker)
            return exc

    pipe.steps[1] = ("count", FailOnce(**pipe.steps[1][1].get_params()))
    fit_pipeline(pipe, fitted, **dirs(tmp_path))
    marker.write_text("x")

    def runs_of_count_step(pipe, retries, retry_delay_seconds):
        """The flow's final state and how often the ``count`` step ran."""
        state, flow_run_id = run(
            transform_pipeline,
            pipe,
            samples,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            **dirs(tmp_path),
        )
        (count_run,) = [
            r for r in task_runs(flow_run_id) if r.name.startswith("count.")
        ]
        return state, count_run.run_count

    state, runs = runs_of_count_step(pipe, retries=10, retry_delay_seconds=0.5)
    assert state.is_completed()
    assert runs > 1  # retried until the I/O error went away

    scaled = StandardScaler().fit(data(fitted)).transform(data(samples))
    bad = counting_pipeline(tmp_path, fail_on=float(scaled[0, 0]))  # ValueError
    bad.steps[1][1].set_params(fail_marker=None)
    fit_pipeline(bad, fitted, **dirs(tmp_path))
    state, runs = runs_of_count_step(bad, retries=5, retry_delay_seconds=0)
    assert state.is_failed()
    assert runs == 1


def test_persisted_results_hold_no_arrays(tmp_path):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from samplepipe.flows import fit_pipeline, transform_pipeline

    storage = PREFECT_LOCAL_STORAGE_PATH.value()
    before = set(storage.glob("*")) if storage.exists() else set()
    samples = make_samples(1000, n_features=256, seed=3, prefix="big")
    fit_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    transform_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    new = {p: p.stat().st_size for p in storage.glob("*") if p not in before}
    assert len(new) >= 3 + 3 * 4  # 3 fits, 4 batches x 3 steps
    data_bytes = 3 * 1000 * 256 * 8  # what the checkpoints hold
    # about 110 bytes per sample (name, stamp, input identity): no arrays
    assert sum(new.values()) < data_bytes / 10


def test_task_run_names_and_artifacts(tmp_path, fitted):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(500, seed=3, prefix="test")
    state, flow_run_id = run(
        transform_pipeline, counting_pipeline(tmp_path), samples, **dirs(tmp_path)
    )
    names = sorted(r.name for r in task_runs(flow_run_id))
    assert "count.transform[250:500]" in names
    assert "scale.transform[0:250]" in names
    found = {a.type: a for a in artifacts(flow_run_id)}
    assert found["progress"].data == 100.0
    table = found["table"]
    assert table.key == "samplepipe-summary"
    assert "computed" in str(table.data) and "count" in str(table.data)


def test_two_concurrent_flow_runs_do_not_compute_a_batch_twice(tmp_path, fitted):
    from samplepipe.flows import transform_pipeline

    samples = make_samples(1000, seed=3, prefix="test")
    results, errors = [], []

    def go():
        try:
            results.append(
                transform_pipeline(
                    counting_pipeline(tmp_path), samples, **dirs(tmp_path)
                )
            )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert count_rows(tmp_path / "last.log", "transform") == 1000
    np.testing.assert_allclose(data(results[0]), data(results[1]))


def test_bad_input_fails_before_any_work(tmp_path):
    from samplepipe.flows import fit_pipeline

    samples = make_samples(10)
    samples[7].key = samples[2].key
    with pytest.raises(ValueError, match="for samples 2 and 7"):
        fit_pipeline(counting_pipeline(tmp_path), samples, **dirs(tmp_path))
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        fit_pipeline("no_such_module:x", make_samples(5), **dirs(tmp_path))
    with pytest.raises(TypeError, match="must be a list of samples"):
        fit_pipeline(counting_pipeline(tmp_path), np.zeros((3, 2)), **dirs(tmp_path))
    assert not (tmp_path / "features").exists()
    assert not (tmp_path / "models").exists()


def test_plain_estimators_and_wrapped_steps_mix(tmp_path):
    from samplepipe import wrap
    from samplepipe.flows import fit_pipeline, transform_pipeline

    train = make_samples(300)
    pca = wrap(["sample", "checkpoint"], PCA(n_components=2))
    pipe = Pipeline([("scale", StandardScaler()), ("pca", pca)])
    fit_pipeline(pipe, train, **dirs(tmp_path))
    out = transform_pipeline(pipe, train, **dirs(tmp_path))
    ref = Pipeline([("s", StandardScaler()), ("p", PCA(n_components=2))])
    np.testing.assert_allclose(
        np.abs(data(out)), np.abs(ref.fit_transform(data(train))), atol=1e-10
    )


def test_dask_task_runner_gives_identical_outputs(tmp_path, dask_client):
    from prefect_dask import DaskTaskRunner

    from samplepipe.flows import fit_pipeline, transform_pipeline

    train = make_samples(300)
    fit_pipeline(counting_pipeline(tmp_path), train, **dirs(tmp_path / "dask"))
    fit_pipeline(counting_pipeline(tmp_path), train, **dirs(tmp_path / "threads"))
    samples = make_samples(500, seed=3, prefix="test")
    runner = DaskTaskRunner(address=dask_client.scheduler.address)
    dasked = transform_pipeline.with_options(task_runner=runner)
    state, flow_run_id = run(
        dasked, counting_pipeline(tmp_path), samples, **dirs(tmp_path / "dask")
    )
    assert state.is_completed()
    threads = transform_pipeline(
        counting_pipeline(tmp_path), samples, **dirs(tmp_path / "threads")
    )
    np.testing.assert_allclose(data(state.result()), data(threads))
    pids = set(dask_client.run(os.getpid).values())
    logged = {int(line.split()[2]) for line in open(tmp_path / "last.log")}
    assert pids & logged  # the dask run's transforms ran on the workers
    assert len(task_runs(flow_run_id)) == 3 * 2


def test_the_api_stores_summaries_not_samples(tmp_path):
    from prefect.client.orchestration import get_client

    from samplepipe import DelayedSample
    from samplepipe.flows import transform_pipeline

    # 6,000 delayed samples would JSON-encode to more than the API's 512 KB
    samples = [
        DelayedSample(lambda: np.zeros(4), key=f"lazy/{i:05d}", subject=f"x{i}")
        for i in range(6000)
    ]
    pipe = Pipeline([("count", CountingTransformer(stateless=True))])
    state, flow_run_id = run(
        transform_pipeline,
        pipe,
        samples,
        batch_size=3000,
        **{k: v for k, v in dirs(tmp_path).items() if k != "batch_size"},
    )
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(flow_run_id).parameters
    assert parameters["samples"] == "<6000 samples: lazy/00000 ... lazy/05999>"
    assert parameters["pipeline"].startswith("Pipeline(")
    assert parameters["batch_size"] == 3000

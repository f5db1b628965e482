import os
import re
import subprocess
import time

import numpy as np
import pytest
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from samplepipe import (
    DaskWrapper,
    Sample,
    SampleWrapper,
    ToDaskBag,
    dask_tags,
    wrap,
)
from samplepipe.server import free_port
from samplepipe.testing import (
    CountingTransformer,
    count_rows,
    dask_command,
    read_calls,
)

from .conftest import make_samples

pytestmark = pytest.mark.slow  # a LocalCluster with worker processes


def pipeline(tmp_path):
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "count",
                CountingTransformer(offset=1.0, log_path=str(tmp_path / "count.log")),
            ),
            ("pca", PCA(n_components=2)),
        ]
    )


def data(samples):
    return np.stack([s.data for s in samples])


def test_dask_pipeline_matches_plain_and_reuses_checkpoints(tmp_path, dask_client):
    samples = make_samples(200)
    kwargs = {
        "features_dir": str(tmp_path / "features"),
        "model_path": str(tmp_path / "models"),
        "npartitions": 4,
    }
    dasked = wrap(["sample", "checkpoint", "dask"], pipeline(tmp_path), **kwargs)
    dasked.fit(samples)
    out = dasked.transform(samples).compute(scheduler=dask_client)
    plain = pipeline(tmp_path)
    plain_out = wrap(["sample"], plain).fit(samples).transform(samples)
    np.testing.assert_allclose(data(out), data(plain_out), atol=1e-10)
    assert [o.key for o in out] == [s.key for s in samples]
    pids = set(dask_client.run(os.getpid).values())
    logged = open(tmp_path / "count.log").read().split()
    assert pids & {int(p) for p in logged[2::3]}  # work ran on the workers
    rows = count_rows(tmp_path / "count.log", "transform")
    fits = len(read_calls(tmp_path / "count.log", "fit"))
    again = wrap(["sample", "checkpoint", "dask"], pipeline(tmp_path), **kwargs)
    again.fit(samples)  # loads the model checkpoints
    out2 = again.transform(samples).compute(scheduler=dask_client)
    assert count_rows(tmp_path / "count.log", "transform") == rows
    assert len(read_calls(tmp_path / "count.log", "fit")) == fits
    np.testing.assert_allclose(data(out2), data(out))


def test_fit_on_a_bag_equals_plain_fit(dask_client):
    samples = make_samples(150)
    bag = ToDaskBag(npartitions=3).transform(samples)
    dasked = DaskWrapper(SampleWrapper(PCA(n_components=3)))
    dasked.fit(bag)
    plain = SampleWrapper(PCA(n_components=3)).fit(samples)
    np.testing.assert_allclose(
        np.abs(dasked.estimator.estimator.components_),
        np.abs(plain.estimator.components_),
    )
    out = dasked.transform(bag).compute()
    np.testing.assert_allclose(
        np.abs(data(out)), np.abs(data(plain.transform(samples))), atol=1e-10
    )


def test_fit_supports_dask_array(dask_client):
    class ArrayFit(StandardScaler):
        def fit(self, X, y=None):
            assert hasattr(X, "chunks")  # a dask array
            return super().fit(X.compute())

    samples = make_samples(60)
    bag = ToDaskBag(npartitions=3).transform(samples)
    dasked = DaskWrapper(SampleWrapper(ArrayFit()), fit_supports_dask_array=True)
    dasked.fit(bag)
    np.testing.assert_allclose(
        dasked.estimator.estimator.mean_, data(samples).mean(axis=0)
    )


class RecordsDaskArrays(BaseEstimator):
    """Fits on Dask arrays as dask-ml does; refuses unknown chunk sizes."""

    def fit(self, X, y=None):
        import dask

        for name, array in (("X", X), ("y", y)):
            if any(np.isnan(c) for dim in array.chunks for c in dim):
                msg = f"{name} has unknown chunk sizes {array.chunks}"
                raise ValueError(msg)
        self.chunks_, self.y_chunks_ = X.chunks, y.chunks
        self.dtype_, self.y_dtype_ = X.dtype, y.dtype
        X, y = dask.compute(X, y)
        self.computed_dtypes_ = (X.dtype, y.dtype)
        self.mean_ = X.mean(axis=0)
        self.y_sum_ = y.sum()
        return self


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_fit_supports_dask_array_gives_known_chunks_and_the_real_dtype(
    dask_client, dtype
):
    samples = [Sample((s.data * 10).astype(dtype), parent=s) for s in make_samples(40)]
    samples[7] = Sample(None, parent=samples[7])  # dropped, as SampleWrapper.fit does
    valid = samples[:7] + samples[8:]
    bag = ToDaskBag(npartitions=3).transform(samples)
    dasked = DaskWrapper(
        SampleWrapper(RecordsDaskArrays(), fit_extra_arguments=[("y", "target")]),
        fit_supports_dask_array=True,
    )
    dasked.fit(bag)
    fitted = dasked.estimator.estimator
    assert fitted.chunks_[1] == (4,) and sum(fitted.chunks_[0]) == 39
    assert len(fitted.chunks_[0]) == 3
    assert fitted.y_chunks_ == (fitted.chunks_[0],)
    assert (fitted.dtype_, fitted.y_dtype_) == (np.dtype(dtype), np.dtype(np.int64))
    assert fitted.computed_dtypes_ == (fitted.dtype_, fitted.y_dtype_)
    np.testing.assert_allclose(fitted.mean_, data(valid).mean(axis=0), rtol=1e-6)
    assert fitted.y_sum_ == sum(s.target for s in valid)


def test_explicit_false_overrides_the_estimators_declaration(dask_client):
    class Declares(StandardScaler):
        def __samplepipe_tags__(self):
            return {"fit_supports_dask_array": True}

    samples = make_samples(30)
    bag = ToDaskBag(npartitions=2).transform(samples)
    wrapper = DaskWrapper(SampleWrapper(Declares()), fit_supports_dask_array=False)
    wrapper.fit(bag)  # fits on samples; an array fit would need dask support
    np.testing.assert_allclose(
        wrapper.estimator.estimator.mean_, data(samples).mean(axis=0)
    )


def test_dask_tags_collects_through_pipelines():
    pipe = wrap(
        ["sample", "dask"],
        Pipeline([("a", StandardScaler()), ("b", PCA())]),
        transform_tag="GPU",
    )
    tags = dask_tags(pipe)
    assert tags == {"a.transform": {"GPU": 1}, "b.transform": {"GPU": 1}}


def test_dask_tags_are_keyed_by_step_so_one_class_can_be_tagged_twice():
    pipe = Pipeline(
        [
            ("bag", ToDaskBag()),
            ("gpu_pca", DaskWrapper(SampleWrapper(PCA()), "GPU", "GPU")),
            ("skip", "passthrough"),
            ("cpu_pca", DaskWrapper(SampleWrapper(PCA()), transform_tag="CPU")),
            (
                "inner",
                Pipeline([("pca", DaskWrapper(SampleWrapper(PCA()), fit_tag="CPU"))]),
            ),
        ]
    )
    assert dask_tags(pipe) == {
        "gpu_pca.fit": {"GPU": 1},
        "gpu_pca.transform": {"GPU": 1},
        "cpu_pca.transform": {"CPU": 1},
        "inner.pca.fit": {"CPU": 1},
    }


def test_dask_tags_of_a_bare_wrapper_use_its_layers_uncut():
    est = wrap(
        ["sample", "checkpoint", "dask"],
        LogisticRegression(),
        fit_tag="GPU",
        transform_tag="CPU",
    )
    assert dask_tags(est) == {
        "Dask|Checkpoint|Sample|LogisticRegression.fit": {"GPU": 1},
        "Dask|Checkpoint|Sample|LogisticRegression.transform": {"CPU": 1},
    }
    assert dask_tags(SampleWrapper(PCA())) == {}


def test_many_workers_write_one_features_dir(tmp_path, dask_client):
    samples = make_samples(400)
    log = str(tmp_path / "log")
    step = wrap(
        ["sample", "checkpoint", "dask"],
        CountingTransformer(stateless=True, log_path=log),
        features_dir=str(tmp_path / "f"),
    )
    # the same keys in two overlapping bags, computed at once
    bag1 = ToDaskBag(npartitions=8).transform(samples[:300])
    bag2 = ToDaskBag(npartitions=8).transform(samples[100:])
    out1, out2 = dask_client.compute(
        [step.transform(bag1), step.transform(bag2)], sync=True
    )
    assert len(out1) == 300 and len(out2) == 300
    np.testing.assert_array_equal(data(out1[100:]), data(samples[100:300]))
    np.testing.assert_array_equal(data(out2), data(samples[100:]))
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "f") for f in fs]
    assert len(files) == 400 and not [f for f in files if f.endswith(".tmp")]


@pytest.fixture
def gpu_cluster(tmp_path):
    """`dask scheduler` and two `dask worker` processes, one with GPU=1."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            dask_command("scheduler", "--port", str(port)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    ]
    try:
        for name, extra in (("gpu", ["--resources", "GPU=1"]), ("cpu", [])):
            procs.append(
                subprocess.Popen(
                    dask_command(
                        "worker", address, "--nthreads", "1", "--name", name, *extra
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                )
            )
        from distributed import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                client = Client(address, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        client.wait_for_workers(2, timeout=60)
        yield client
        client.close()
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_transform_tag_runs_only_on_the_worker_with_that_resource(
    tmp_path, gpu_cluster
):
    client = gpu_cluster
    log = str(tmp_path / "log")
    pids = {
        info["name"]: info["pid"] if "pid" in info else None
        for info in client.scheduler_info()["workers"].values()
    }
    by_name = client.run(os.getpid)
    names = {
        info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()
    }
    gpu_pid = by_name[names["gpu"]]
    cpu_pid = by_name[names["cpu"]]
    assert gpu_pid != cpu_pid and pids
    step = wrap(
        ["sample", "dask"],
        CountingTransformer(stateless=True, log_path=log),
        transform_tag="GPU",
    )
    bag = ToDaskBag(npartitions=10).transform(make_samples(100))
    # Bag's graph optimisation fuses tasks and drops their annotations
    out = step.transform(bag).compute(scheduler=client, optimize_graph=False)
    assert len(out) == 100
    logged = {int(line.split()[2]) for line in open(log)}
    assert logged == {gpu_pid}
    # without the tag, both workers are used
    plain = wrap(["sample", "dask"], CountingTransformer(stateless=True, log_path=log))
    os.unlink(log)
    bag = ToDaskBag(npartitions=40).transform(make_samples(400))
    plain.transform(bag).compute(scheduler=client)
    assert {int(line.split()[2]) for line in open(log)} == {gpu_pid, cpu_pid}


def test_fit_refits_on_other_training_samples_and_loads_on_the_same(
    tmp_path, dask_client
):
    log = str(tmp_path / "log")

    def step():
        return wrap(
            ["sample", "checkpoint", "dask"],
            CountingTransformer(log_path=log),
            model_path=str(tmp_path / "model.pkl"),
        )

    train_a = make_samples(30, prefix="a", seed=1)
    train_b = make_samples(30, prefix="b", seed=2)

    def fit(samples):
        est = step().fit(ToDaskBag(npartitions=3).transform(samples))
        return est.estimator.estimator.estimator

    fitted = fit(train_a)
    assert len(read_calls(log, "fit")) == 1
    np.testing.assert_allclose(fitted.mean_, data(train_a).mean(axis=0))
    fitted = fit(train_b)  # other keys: the model of A must not be reused
    assert len(read_calls(log, "fit")) == 2
    np.testing.assert_allclose(fitted.mean_, data(train_b).mean(axis=0))
    fitted = fit(train_b)  # the same training samples: the model is loaded
    assert len(read_calls(log, "fit")) == 2
    np.testing.assert_allclose(fitted.mean_, data(train_b).mean(axis=0))
    pids = set(dask_client.run(os.getpid).values())
    assert {int(line.split()[2]) for line in open(log)} <= pids  # fit on workers


def test_plain_arrays_pass_straight_through(samples):
    X = data(samples)
    y = np.array([s.target for s in samples])
    dasked = DaskWrapper(SampleWrapper(LogisticRegression())).fit(X, y)
    plain = LogisticRegression().fit(X, y)
    np.testing.assert_allclose(dasked.predict_proba(X), plain.predict_proba(X))
    np.testing.assert_array_equal(dasked.predict(X), plain.predict(X))
    np.testing.assert_allclose(dasked.decision_function(X), plain.decision_function(X))
    np.testing.assert_allclose(dasked.predict_log_proba(X), plain.predict_log_proba(X))
    assert dasked.score(X, y) == plain.score(X, y)
    scaler = DaskWrapper(SampleWrapper(StandardScaler()))
    np.testing.assert_allclose(
        scaler.fit_transform(X), StandardScaler().fit_transform(X)
    )


def test_a_list_of_samples_is_refused_with_the_fix(samples):
    dasked = DaskWrapper(SampleWrapper(StandardScaler())).fit(samples)
    with pytest.raises(TypeError, match=re.escape("put a ToDaskBag step first")):
        dasked.transform(samples)


def test_score_on_a_bag_is_one_score_per_partition(dask_client, samples):
    wrapper = SampleWrapper(LogisticRegression(), fit_extra_arguments=[("y", "target")])
    dasked = DaskWrapper(wrapper).fit(samples)
    bag = ToDaskBag(partition_size=10).transform(samples)
    scores = dasked.score(bag).compute()
    assert scores == [wrapper.score(samples[:10]), wrapper.score(samples[10:])]

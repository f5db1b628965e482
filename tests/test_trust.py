"""A checkpoint is reused only when a fresh run would give the same result.

Each test here reproduces one finding of issue 12 (see the CHANGELOG): it
failed before the identity rework and passes after.
"""

import functools
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from samplepipe import (
    CheckpointWarning,
    CheckpointWrapper,
    DelayedSample,
    Sample,
    SampleWrapper,
    hash_string,
    load_hdf5,
    save_hdf5,
    wrap,
)
from samplepipe.storage import (
    VALIDATED,
    FilesLayout,
    Identity,
    ModelWarning,
    UnknownFileError,
    estimator_identity,
    read_model_header,
)
from samplepipe.storage.files import HOST_TAG, temporary_name
from samplepipe.testing import CountingTransformer, count_rows, read_calls

from .conftest import make_samples

SOURCE = """
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

class Scale(TransformerMixin, BaseEstimator):
    def __init__(self, log_path=None):
        self.log_path = log_path

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"transform {len(X)} 0\\n")
        return np.asarray(X) * FACTOR

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags
"""


def user_class(factor, body=SOURCE, module="user_module", name="Scale"):
    """A class named ``Scale`` defined in a fresh module, like a user's script."""
    namespace = {"__name__": module}
    exec(compile(body.replace("FACTOR", str(factor)), module, "exec"), namespace)
    return namespace[name]


def stack(samples):
    return np.stack([s.data for s in samples])


def checkpointed(estimator, tmp_path, **kwargs):
    return CheckpointWrapper(
        SampleWrapper(estimator), features_dir=str(tmp_path / "f"), **kwargs
    )


# ---------------------------------------------------------------------------
# silent wrong results
# ---------------------------------------------------------------------------
def test_edited_transformer_code_recomputes(tmp_path):
    samples = make_samples(6)
    log = str(tmp_path / "calls.log")
    first = checkpointed(user_class(2)(log_path=log), tmp_path).transform(samples)
    np.testing.assert_allclose(stack(first), stack(samples) * 2)
    # same class name, same parameters, edited code
    with pytest.warns(CheckpointWarning, match="6 stale"):
        second = checkpointed(user_class(3)(log_path=log), tmp_path).transform(samples)
    np.testing.assert_allclose(stack(second), stack(samples) * 3)
    assert count_rows(log, "transform") == 12


def test_function_transformer_lambdas_are_told_apart(tmp_path):
    samples = make_samples(5)
    plus_one = checkpointed(FunctionTransformer(lambda X: X + 1), tmp_path)
    np.testing.assert_allclose(stack(plus_one.transform(samples)), stack(samples) + 1)
    plus_100 = checkpointed(FunctionTransformer(lambda X: X + 100), tmp_path)
    with pytest.warns(CheckpointWarning, match="5 stale"):
        out = plus_100.transform(samples)
    np.testing.assert_allclose(stack(out), stack(samples) + 100)


def test_partials_closures_and_defaults_are_part_of_the_identity():
    def add(X, k):
        return X + k

    def make(k):
        return lambda X: X + k

    def with_default(X, k=1):
        return X + k

    def with_other_default(X, k=2):
        return X + k

    ids = {
        estimator_identity(FunctionTransformer(f))
        for f in (
            functools.partial(add, k=1),
            functools.partial(add, k=2),
            make(1),
            make(2),
            with_default,
            with_other_default,
        )
    }
    assert len(ids) == 6
    assert estimator_identity(FunctionTransformer(make(1))) == estimator_identity(
        FunctionTransformer(make(1))
    )


def test_new_data_under_the_same_keys_recomputes_exactly_those(tmp_path):
    log = str(tmp_path / "calls.log")
    wrapper = checkpointed(CountingTransformer(log_path=log, stateless=True), tmp_path)
    samples = make_samples(10)
    wrapper.transform(samples)
    regenerated = make_samples(10)
    regenerated[4] = Sample(regenerated[4].data + 7, parent=regenerated[4])
    with pytest.warns(CheckpointWarning, match="1 stale"):
        out = wrapper.transform(regenerated)
    assert read_calls(log, "transform") == [("transform", 10), ("transform", 1)]
    np.testing.assert_allclose(stack(out), stack(regenerated))


def test_metadata_read_by_transform_is_part_of_the_identity(tmp_path):
    class AddOffset(CountingTransformer):
        def transform(self, X, offset):
            return np.asarray(X) + np.asarray(offset)[:, None]

    wrapper = CheckpointWrapper(
        SampleWrapper(
            AddOffset(stateless=True), transform_extra_arguments=[("offset", "offset")]
        ),
        features_dir=str(tmp_path / "f"),
    )
    samples = make_samples(4)
    wrapper.transform(samples)
    samples[2].offset = 100.0
    with pytest.warns(CheckpointWarning, match="1 stale"):
        out = wrapper.transform(samples)
    np.testing.assert_allclose(out[2].data, samples[2].data + 100.0)


def load_logged(i, log):
    with open(log, "a") as f:
        f.write(f"load {i}\n")
    return np.full(3, float(i))


def test_lazy_inputs_are_not_read_to_be_hashed_and_declare_a_version(tmp_path):
    reads_log = str(tmp_path / "reads.log")

    def lazy(version=None):
        return [
            DelayedSample(
                functools.partial(load_logged, i, reads_log),
                key=f"k{i}",
                data_version=version,
            )
            for i in range(3)
        ]

    def n_reads():
        return len(open(reads_log).readlines())

    log = str(tmp_path / "calls.log")
    wrapper = checkpointed(CountingTransformer(log_path=log, stateless=True), tmp_path)
    wrapper.transform(lazy())
    assert n_reads() == 3  # read once, to compute
    wrapper.transform(lazy())
    assert n_reads() == 3  # not read again to be hashed
    with pytest.warns(CheckpointWarning, match="3 stale"):
        wrapper.transform(lazy(version="v2"))  # the files behind changed
    assert count_rows(log, "transform") == 6


# ---------------------------------------------------------------------------
# false invalidation
# ---------------------------------------------------------------------------
MAIN_SCRIPT = """
import sys
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from samplepipe import wrap
from samplepipe.testing import CountingTransformer, random_samples

class Extract(TransformerMixin, BaseEstimator):
    '''A feature extractor with a fit that learns nothing, defined in __main__.'''
    def fit(self, X, y=None):
        self.fitted_ = True
        return self
    def transform(self, X):
        return np.asarray(X) * 2

n, root = int(sys.argv[1]), sys.argv[2]
pipeline = wrap(["sample", "checkpoint"], Pipeline([
    ("extract", Extract()),
    ("later", CountingTransformer(log_path=root + "/later.log", stateless=True)),
    ("last", CountingTransformer()),
]), features_dir=root + "/f", model_path=root + "/m")
pipeline.fit(random_samples(n, seed=1))
print(pipeline.steps[0][1].step_identity())
"""


@pytest.mark.slow
def test_refit_of_a_main_class_keeps_later_steps_checkpoints(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(MAIN_SCRIPT)

    def run(n):
        out = subprocess.run(
            [sys.executable, str(script), str(n), str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    first = run(1000)
    second = run(1050)  # 50 more training samples, the same fitted state
    assert first == second
    # "later" transforms only the 50 new samples: "extract" kept its identity
    calls = read_calls(tmp_path / "later.log", "transform")
    assert [n for _, n in calls] == [1000, 50]


MODULE = """
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

class Double(TransformerMixin, BaseEstimator):
    def __init__(self, k=2):
        self.k = k
    def fit(self, X, y=None):
        self.seen_ = np.asarray(X).shape[1]
        return self
    def transform(self, X):
        return np.asarray(X) * self.k

if __name__ == "__main__":
    import sys
    from samplepipe import CheckpointWrapper, SampleWrapper
    from samplepipe.testing import random_samples
    step = CheckpointWrapper(SampleWrapper(Double()), features_dir=sys.argv[1],
                             model_path=sys.argv[2])
    step.fit(random_samples(20))
    step.transform(random_samples(20))
    print(step.step_identity())
"""

IMPORTED = """
import sys
from samplepipe import CheckpointWrapper, SampleWrapper
import mymodule
step = CheckpointWrapper(SampleWrapper(mymodule.Double()), features_dir=sys.argv[1],
                         model_path=sys.argv[2])
removed = step.remove_checkpoints()
statuses = sorted({s for _, s, _ in step.iter_checkpoints()})
print(step.step_identity(), len(removed), statuses)
"""


@pytest.mark.slow  # two Python processes that import samplepipe
def test_a_main_class_and_the_same_class_imported_are_one_identity(tmp_path):
    (tmp_path / "mymodule.py").write_text(MODULE)
    args = [str(tmp_path / "f"), str(tmp_path / "model.pkl")]
    as_main = subprocess.run(
        [sys.executable, "mymodule.py", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    imported = subprocess.run(
        [sys.executable, "-c", IMPORTED, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert imported[0] == as_main
    assert imported[1] == "0"  # nothing removed: every file is valid
    assert "valid" in imported[2]
    assert len(os.listdir(tmp_path / "f" / "s")) == 20


def test_a_deterministic_refit_keeps_the_fitted_identity(tmp_path):
    samples = make_samples(30)
    first = CheckpointWrapper(
        SampleWrapper(StandardScaler()), model_path=str(tmp_path / "a.pkl")
    ).fit(samples)
    second = CheckpointWrapper(
        SampleWrapper(StandardScaler()), model_path=str(tmp_path / "b.pkl")
    ).fit(samples)
    assert first.fitted_digest_ == second.fitted_digest_
    assert first.step_identity() == second.step_identity()


# ---------------------------------------------------------------------------
# failed samples
# ---------------------------------------------------------------------------
def test_failed_samples_stay_in_line_through_a_checkpointed_pipeline(tmp_path):
    def fail_some(X):
        return [None if i % 3 == 0 else x + 1 for i, x in enumerate(X)]

    class FailSome(CountingTransformer):
        def transform(self, X):
            return fail_some(super().transform(X))

    log = str(tmp_path / "later.log")
    pipeline = wrap(
        ["sample", "checkpoint"],
        Pipeline(
            [
                ("fail", FailSome(stateless=True)),
                ("later", CountingTransformer(log_path=log, stateless=True)),
            ]
        ),
        features_dir=str(tmp_path / "f"),
    )
    samples = make_samples(9)
    out = pipeline.transform(samples)
    assert [o.key for o in out] == [s.key for s in samples]
    assert [o.data is None for o in out] == [i % 3 == 0 for i in range(9)]
    assert out[0].target == samples[0].target
    assert count_rows(log, "transform") == 6  # None never reaches the estimator
    assert len(os.listdir(tmp_path / "f" / "later" / "s")) == 6


# ---------------------------------------------------------------------------
# safe deletion
# ---------------------------------------------------------------------------
def test_remove_keeps_everything_when_the_model_cannot_be_read(tmp_path):
    samples = make_samples(10)
    model = str(tmp_path / "m.pkl")
    fitted = CheckpointWrapper(
        SampleWrapper(StandardScaler()),
        features_dir=str(tmp_path / "f"),
        model_path=model,
    )
    fitted.fit(samples).transform(samples)
    for wrong in (str(tmp_path / "typo.pkl"), None):
        cleaner = CheckpointWrapper(
            SampleWrapper(StandardScaler()),
            features_dir=str(tmp_path / "f"),
            model_path=wrong,
        )
        assert {s for _, s, _ in cleaner.iter_checkpoints()} == {"unknown"}
        assert cleaner.remove_checkpoints() == []
    assert len(os.listdir(tmp_path / "f" / "s")) == 10


def test_two_level_hash_fn_files_are_judged_by_their_key(tmp_path):
    def two_levels(key):
        h = hash_string(key, 256)
        return f"{h[:2]}/{h[2:]}"

    wrapper = checkpointed(StandardScaler(), tmp_path, hash_fn=two_levels)
    wrapper.estimator.estimator.fit(np.zeros((2, 4)))
    samples = make_samples(8)
    wrapper.transform(samples)
    assert {s for _, s, _ in wrapper.iter_checkpoints()} == {"valid"}
    assert wrapper.remove_checkpoints() == []
    assert sum(len(f) for _, _, f in os.walk(tmp_path / "f")) == 8


def test_remove_judges_each_file_again_right_before_removing_it(tmp_path):
    samples = make_samples(5)
    fresh = checkpointed(FunctionTransformer(lambda X: X + 1), tmp_path)
    old = checkpointed(FunctionTransformer(lambda X: X + 2), tmp_path)
    old.transform(samples)

    class ListedThenRecomputed(FilesLayout):
        """Lists the stale files, then a running job recomputes them."""

        def walk(self, context):
            listed = list(super().walk(context))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CheckpointWarning)
                fresh.transform(samples)  # the job, with the current step
            return iter(listed)

    params = fresh.get_params(deep=False)
    cleaner = CheckpointWrapper(**{**params, "layout": ListedThenRecomputed()})
    listed = [
        s
        for _, s, _ in checkpointed(
            FunctionTransformer(lambda X: X + 1), tmp_path
        ).iter_checkpoints()
    ]
    assert listed == ["stale"] * 5
    # files rewritten in between are kept: they changed since they were judged
    assert cleaner.remove_checkpoints() == []
    assert len(os.listdir(tmp_path / "f" / "s")) == 5

    class NoRecheck(ListedThenRecomputed):
        """The broken variant: deletes what it listed without judging again."""

        def still(self, *args):
            return True

    old.set_params(force=True).transform(samples)  # stale again
    broken = CheckpointWrapper(**{**params, "layout": NoRecheck()})
    assert len(broken.remove_checkpoints()) == 5  # the check above can fail


def test_a_file_samplepipe_did_not_write_is_never_overwritten_or_removed(tmp_path):
    wrapper = checkpointed(FunctionTransformer(lambda X: X + 1), tmp_path)
    samples = make_samples(3)
    path = wrapper.checkpoint_path(samples[1].key)
    os.makedirs(os.path.dirname(path))
    with h5py.File(path, "w") as f:  # the user's own raw data
        f["raw"] = np.arange(5)
    before = open(path, "rb").read()
    with pytest.raises(UnknownFileError, match=re.escape(repr(path))):
        wrapper.transform(samples)
    assert open(path, "rb").read() == before
    assert not os.path.exists(wrapper.checkpoint_path(samples[0].key))  # no work
    listing = {os.path.basename(p): s for p, s, _ in wrapper.iter_checkpoints()}
    assert listing == {os.path.basename(path): "unknown"}
    assert wrapper.remove_checkpoints() == []
    assert open(path, "rb").read() == before


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def test_corrected_labels_refit(tmp_path):
    samples = make_samples(20)
    step = CheckpointWrapper(
        SampleWrapper(LogisticRegression(), fit_extra_arguments=[("y", "target")]),
        model_path=str(tmp_path / "m.pkl"),
    )
    step.fit(samples)
    header = read_model_header(tmp_path / "m.pkl")
    samples[0].target = 1 - samples[0].target  # a corrected label
    step.fit(samples)
    assert read_model_header(tmp_path / "m.pkl")["data"] != header["data"]
    again = CheckpointWrapper(
        SampleWrapper(LogisticRegression(), fit_extra_arguments=[("y", "target")]),
        model_path=str(tmp_path / "m.pkl"),
    )
    assert again.load_model(data=again.training_digest(samples))


def test_an_upstream_change_is_seen_through_a_step_without_checkpoints(tmp_path):
    log = str(tmp_path / "last.log")

    def pipeline(offset):
        return Pipeline(
            [
                (
                    "first",
                    CheckpointWrapper(
                        SampleWrapper(
                            CountingTransformer(offset=offset, stateless=True)
                        ),
                        features_dir=str(tmp_path / "first"),
                    ),
                ),
                ("middle", SampleWrapper(FunctionTransformer(lambda X: X * 2))),
                (
                    "last",
                    CheckpointWrapper(
                        SampleWrapper(
                            CountingTransformer(log_path=log, stateless=True)
                        ),
                        features_dir=str(tmp_path / "last"),
                    ),
                ),
            ]
        )

    samples = make_samples(4)
    pipeline(1.0).transform(samples)
    with pytest.warns(CheckpointWarning, match="4 stale"):
        out = pipeline(5.0).transform(samples)
    np.testing.assert_allclose(stack(out), (stack(samples) + 5.0) * 2)
    assert count_rows(log, "transform") == 8


def test_fit_on_other_arrays_refits(tmp_path):
    log = str(tmp_path / "calls.log")
    step = CheckpointWrapper(
        CountingTransformer(log_path=log), model_path=str(tmp_path / "m.pkl")
    )
    step.fit(np.zeros((5, 2)))
    step.fit(np.zeros((5, 2)))  # the same arrays: loaded
    assert count_rows(log, "fit") == 5
    step.fit(np.ones((5, 2)))
    assert count_rows(log, "fit") == 10
    np.testing.assert_allclose(step.estimator.mean_, [1.0, 1.0])


def test_a_model_that_cannot_be_unpickled_is_refitted_with_a_warning(tmp_path):
    module = tmp_path / "gone_module.py"
    module.write_text(
        "from samplepipe.testing import CountingTransformer\n"
        "class Gone(CountingTransformer):\n    pass\n"
    )
    samples = make_samples(6)
    log = str(tmp_path / "calls.log")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from gone_module import Gone\n"
        "from samplepipe import CheckpointWrapper, SampleWrapper\n"
        "from samplepipe.testing import random_samples\n"
        "CheckpointWrapper(SampleWrapper(Gone(log_path=sys.argv[3])),"
        " model_path=sys.argv[2]).fit(random_samples(6))\n"
    )
    model = str(tmp_path / "m.pkl")
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), model, log], check=True
    )
    header = read_model_header(model)
    # the module is gone (renamed, uninstalled): the header still matches a class
    # of the same code and name, but the payload cannot be unpickled
    module.unlink()
    Gone = user_class(0, body=module_source(), module="elsewhere", name="Gone")
    step = CheckpointWrapper(SampleWrapper(Gone(log_path=log)), model_path=model)
    assert step._model_header_if_matching() is not None
    with pytest.warns(ModelWarning, match="cannot be unpickled"):
        step.fit(samples)
    assert count_rows(log, "fit") == 12
    assert read_model_header(model)["sha256"] != header["sha256"]


def module_source():
    return (
        "from samplepipe.testing import CountingTransformer\n"
        "class Gone(CountingTransformer):\n    pass\n"
    )


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------
def test_a_swapped_file_with_same_size_and_mtime_is_noticed(tmp_path):
    wrapper = checkpointed(CountingTransformer(stateless=True), tmp_path)
    samples = make_samples(2)
    out = wrapper.transform(samples)
    a, b = (wrapper.checkpoint_path(s.key) for s in samples)
    st = os.stat(a)
    shutil.copyfile(b, a + ".new")  # another checkpoint of the same size
    os.utime(a + ".new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(a + ".new", a)
    assert (os.stat(a).st_size, os.stat(a).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(RuntimeError, match="now foreign"):
        _ = out[0].data  # the lazy loader
    with pytest.warns(CheckpointWarning, match="1 foreign"):
        again = wrapper.transform(samples)  # the validation cache
    np.testing.assert_allclose(again[0].data, samples[0].data)


def test_a_flipped_byte_is_detected_by_the_checksum(tmp_path):
    wrapper = checkpointed(CountingTransformer(stateless=True), tmp_path)
    samples = make_samples(2)
    wrapper.transform(samples)
    path = wrapper.checkpoint_path(samples[0].key)
    value = samples[0].data
    with h5py.File(path, "r+") as f:  # flip a byte of the payload, keep the record
        raw = f["array"][()].view(np.uint8).copy()
        raw[3] ^= 0x10
        f["array"][...] = raw.view(value.dtype)
    VALIDATED.clear()
    with pytest.warns(CheckpointWarning, match="1 corrupt"):
        out = wrapper.transform(samples)
    np.testing.assert_array_equal(out[0].data, value)


def test_switching_to_a_custom_format_recomputes(tmp_path):
    samples = make_samples(3)
    log = str(tmp_path / "calls.log")
    wrapper = checkpointed(
        CountingTransformer(stateless=True, log_path=log), tmp_path, extension=".npy"
    )
    wrapper.transform(samples)
    custom = checkpointed(
        CountingTransformer(stateless=True, log_path=log),
        tmp_path,
        extension=".npy",
        save_func=lambda d, p: np.save(open(p, "wb"), d),
        load_func=np.load,
    )
    # the step's own HDF5 checkpoints are samplepipe's, and stale: recomputed
    with pytest.warns(CheckpointWarning, match="3 stale"):
        out = custom.transform(samples)
    assert count_rows(log, "transform") == 6
    np.testing.assert_allclose(stack(out), stack(samples))
    saved = np.load(tmp_path / "f" / f"{samples[0].key}.npy")  # the custom format
    np.testing.assert_allclose(saved, samples[0].data)
    assert custom.step_identity() != wrapper.step_identity()
    VALIDATED.clear()
    # and back: the HDF5 step does not read the custom files as its own
    with pytest.warns(CheckpointWarning, match="3 corrupt"):
        out = wrapper.transform(samples)
    np.testing.assert_allclose(stack(out), stack(samples))


ROUND_TRIP = {
    "float array": np.arange(6.0).reshape(2, 3),
    "big-endian ints": np.arange(4, dtype=">i4"),
    "bool array": np.array([True, False]),
    "0-d array": np.array(3.5),
    "empty array": np.zeros((0, 3)),
    "str": "plain text",
    "str with NUL": "a\x00b\x00",
    "unicode str": "ü日本\U0001f600",
    "ascii bytes": b"abc",
    "bytes with trailing NULs": b"ab\x00\x00",
    "bytearray": bytearray(b"\x00\xff"),
    "U array": np.array(["a", "bcd", ""]),
    "S array": np.array([b"a", b"bc\x00d"]),
    "datetime array": np.array(["2026-11-25"], dtype="datetime64[D]"),
    "numpy float32 scalar": np.float32(1.5),
    "numpy str scalar": np.str_("xyz"),
    "python int": 7,
    "python float": 2.5,
    "python bool": True,
    "python complex": 1 + 2j,
}


class Constant(TransformerMixin, BaseEstimator):
    """Returns ``value`` for every sample, as it is."""

    def __init__(self, value=None):
        self.value = value

    def transform(self, X):
        return [self.value] * len(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_every_supported_type_round_trips_exactly(tmp_path, name):
    value = ROUND_TRIP[name]
    path = str(tmp_path / "x.h5")
    save_hdf5(value, path)
    back = load_hdf5(path)
    assert type(back) is type(value)
    if isinstance(value, np.ndarray):
        assert back.dtype == value.dtype and back.shape == value.shape
        np.testing.assert_array_equal(back, value)
    else:
        assert back == value
    wrapper = checkpointed(Constant(value), tmp_path)
    out = wrapper.transform(make_samples(2))
    VALIDATED.clear()
    again = wrapper.transform(make_samples(2))  # validated from the file
    for o in (out[0], again[1]):
        assert type(o.data) is type(value)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(o.data, value)
        else:
            assert o.data == value


@pytest.mark.parametrize(
    "value", [{"a": 1}, [np.zeros(2), np.zeros(3)], 2**80, np.array([object()])]
)
def test_an_unsupported_output_writes_nothing(tmp_path, value):
    outputs = [np.zeros(2), value]
    wrapper = checkpointed(FunctionTransformer(lambda X: outputs[: len(X)]), tmp_path)
    with pytest.raises(TypeError, match="save_func and load_func"):
        wrapper.transform(make_samples(2))
    assert not os.path.exists(tmp_path / "f")


def test_temporary_names_fit_with_any_hostname(tmp_path):
    component = "k" * 200
    path = os.path.join(str(tmp_path), component + "." + "e" * 19)
    assert len(os.path.basename(temporary_name(path)).encode()) <= 255
    assert "." not in HOST_TAG


UTS_SCRIPT = """
import os, sys
from samplepipe import CheckpointWrapper, SampleWrapper, Sample
from samplepipe.testing import CountingTransformer
from samplepipe.storage.files import temporary_name, remove_stale_temporaries
import numpy as np
folder = sys.argv[1]
key = "k" * 200
w = CheckpointWrapper(SampleWrapper(CountingTransformer(stateless=True)),
                      features_dir=folder)
w.transform([Sample(np.zeros(2), key=key)])
if sys.argv[2] == "leave":
    # a writer that crashed: its temporary file, its pid gone
    name = temporary_name(os.path.join(folder, "x.h5")).replace(
        f"-{os.getpid()}-", "-999999-")
    open(name, "wb").close()
else:
    print(len(remove_stale_temporaries(folder)))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
@pytest.mark.slow  # two Python processes that import samplepipe
def test_a_long_dotted_hostname_writes_long_keys_and_cleans_up(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test needs root for unshare --uts; run the suite as root")
    hostname = "node-01.rack-7.cluster.example.org.with.a.long.domain"  # 54 bytes
    assert len(hostname) > 29

    def run(mode):
        return subprocess.run(
            [
                "unshare",
                "--uts",
                "sh",
                "-c",
                f'hostname {hostname} && exec "$0" -c "$1" "$2" "$3"',
                sys.executable,
                UTS_SCRIPT,
                str(tmp_path),
                mode,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    run("leave")
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    assert run("clean") == "1"  # removed at once, not after an hour
    assert os.path.isfile(tmp_path / ("k" * 200 + ".h5"))


def test_checkpoint_record_is_one_parsed_value():
    identity = Identity("s" * 32, "i" * 32, "a:b/c")
    parsed, checksum, kind = Identity.parse(identity.record("c" * 32, "a"))
    assert (parsed, checksum, kind) == (identity, "c" * 32, "a")
    with pytest.raises(ValueError, match="not a samplepipe checkpoint record"):
        Identity.parse("1:abc:key")


def test_pickled_checkpoint_loaders_keep_their_identity(tmp_path):
    wrapper = checkpointed(CountingTransformer(stateless=True), tmp_path)
    out = wrapper.transform(make_samples(2))
    loaded = pickle.loads(pickle.dumps(out[0]))
    np.testing.assert_array_equal(loaded.data, out[0].data)
    assert loaded._load.identity == out[0]._load.identity


def test_main_script_subprocess_sanity():
    # the subprocess tests above import samplepipe from this environment
    out = subprocess.run(
        [sys.executable, "-c", "import samplepipe; print(samplepipe.__name__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "samplepipe"
    assert textwrap.dedent("  x") == "x"


@pytest.mark.parametrize("name", ["../escaped", "a/b", "", ".hidden"])
def test_wrap_refuses_step_names_that_are_not_one_folder_name(tmp_path, name):
    pipeline = Pipeline([(name or "x", StandardScaler())])
    if not name:
        pipeline.steps[0] = ("", StandardScaler())
    with pytest.raises(ValueError, match=re.escape(f"step named {name!r}")):
        wrap(["sample", "checkpoint"], pipeline, features_dir=str(tmp_path / "f"))
    assert os.listdir(tmp_path) == []


def test_a_record_array_with_object_fields_is_hashed_by_content():
    from samplepipe.storage import value_digest

    def record(items):
        return np.array([(1, items)], dtype=[("a", "i4"), ("b", "O")])

    # it recursed without end: a record of a record array is a record array
    assert value_digest(record([2])) == value_digest(record([2]))
    assert value_digest(record([2])) != value_digest(record([3]))

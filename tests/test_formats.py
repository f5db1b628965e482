"""Checkpoint formats as backends: the registry, the npy format, a user's own."""

import json
import os
import pickle
import re

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.preprocessing import FunctionTransformer

from samplepipe import CheckpointWarning, CheckpointWrapper, Sample, SampleWrapper
from samplepipe.storage import (
    VALIDATED,
    CorruptCheckpointError,
    Format,
    Identity,
    NpyFormat,
    UnknownFileError,
    register_format,
    registered_formats,
)
from samplepipe.storage import formats as formats_module
from samplepipe.storage.journal import JOURNAL
from samplepipe.testing import CountingTransformer, count_rows, random_samples


class TextFormat(Format):
    """A user's format: float arrays as JSON text (exact through ``repr``)."""

    name = "test-text"
    extension = ".txt"

    def check_value(self, value):
        if not (isinstance(value, np.ndarray) and value.dtype == np.float64):
            raise TypeError(f"TextFormat stores float64 arrays, got {value!r}.")

    def save(self, value, path):
        with open(path, "w") as f:
            json.dump({"shape": value.shape, "values": value.ravel().tolist()}, f)

    def load(self, path):
        with open(path) as f:
            content = json.load(f)
        return np.array(content["values"], dtype=np.float64).reshape(content["shape"])


@pytest.fixture
def text_format():
    register_format("test-text", TextFormat)
    yield "test-text"
    formats_module._FORMATS.pop("test-text", None)


@pytest.fixture(autouse=True)
def _new_process():
    VALIDATED.clear()
    JOURNAL.clear()
    yield
    VALIDATED.clear()


def counting(tmp_path, offset=1.0, **kwargs):
    inner = CountingTransformer(
        offset=offset, stateless=True, log_path=str(tmp_path / "calls.log")
    )
    return CheckpointWrapper(
        SampleWrapper(inner), features_dir=str(tmp_path / "f"), **kwargs
    )


def calls(tmp_path):
    return count_rows(str(tmp_path / "calls.log"), "transform")


def values(outputs):
    return np.stack([o.data for o in outputs])


def expected(samples, offset=1.0):
    return np.stack([s.data for s in samples]) + offset


def sidecar_record(path):
    with open(f"{path}.meta.json") as f:
        return json.load(f)["record"]


# ---------------------------------------------------------------------------
# a user's own format
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["name", "instance"])
def test_a_registered_format_of_ones_own_is_used_by_name_or_instance(
    tmp_path, text_format, given
):
    assert text_format in registered_formats()
    fmt = text_format if given == "name" else TextFormat()
    samples = random_samples(4)
    out = counting(tmp_path, format=fmt).transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))
    path = tmp_path / "f" / f"{samples[0].key}.txt"
    assert TextFormat().load(str(path)).tolist() == expected(samples)[0].tolist()
    _, _, _, checksum, kind, key = sidecar_record(path).split(":", 5)
    assert (kind, key) == ("test-text", samples[0].key)
    VALIDATED.clear()  # a new process: reuses every file
    again = counting(tmp_path, format=fmt).transform(samples)
    np.testing.assert_array_equal(values(again), expected(samples))
    assert calls(tmp_path) == 4
    # the format's check runs before anything is written
    bad = passthrough(tmp_path, format=fmt)
    ints = [Sample(np.arange(3), key="ints")]
    with pytest.raises(TypeError, match="sample 'ints': TextFormat stores float64"):
        bad.transform(ints)
    assert not (tmp_path / "f" / "ints.txt").exists()


def test_a_format_of_ones_own_writes_and_reads_with_its_record(tmp_path):
    path = str(tmp_path / "one.txt")
    value = np.linspace(0, 1, 7).reshape(7, 1)
    record = TextFormat().write(path, value, Identity("step", "in", "one"))
    assert TextFormat().read_record(path) == ("ok", record)
    np.testing.assert_array_equal(TextFormat().read(path), value)
    with open(path, "a") as f:
        f.write(" ")  # one more byte: the checksum no longer matches
    assert TextFormat().read_record(path) == ("corrupt", None)
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        TextFormat().read(path)


# ---------------------------------------------------------------------------
# npy
# ---------------------------------------------------------------------------
NPY_VALUES = {
    "float64 2d": np.arange(12.0).reshape(3, 4) / 7,
    "float32 1d": np.linspace(-1, 1, 5, dtype=np.float32),
    "int8 3d": np.arange(24, dtype=np.int8).reshape(2, 3, 4),
    "big-endian int32": np.arange(6, dtype=">i4").reshape(2, 3),
    "uint64 0d": np.array(2**64 - 1, dtype=np.uint64),
    "bool": np.array([[True, False], [False, True]]),
    "complex128": np.array([1 + 2j, -3.5j]),
    "unicode": np.array(["ab", "", "ü\x00x"], dtype="<U5"),
    "bytes": np.array([b"a\x00b", b"c"], dtype="S3"),
    "datetime64": np.array(["2024-01-01T00:00:01.5"], dtype="datetime64[ns]"),
    "empty": np.zeros((0, 4)),
    "fortran order": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "float16 nan": np.array([np.nan, -0.0, np.inf], dtype=np.float16),
}


def passthrough(tmp_path, **kwargs):
    return CheckpointWrapper(
        SampleWrapper(FunctionTransformer()),
        features_dir=str(tmp_path / "f"),
        **kwargs,
    )


@pytest.mark.parametrize("name", sorted(NPY_VALUES))
def test_npy_round_trip_is_exact(tmp_path, name):
    value = NPY_VALUES[name]
    samples = [Sample(value, key="s")]
    passthrough(tmp_path, format="npy").transform(samples)
    VALIDATED.clear()
    out = passthrough(tmp_path, format="npy").transform(samples)[0].data
    assert (out.dtype, out.shape) == (value.dtype, value.shape)
    assert out.tobytes() == np.ascontiguousarray(value).tobytes()
    plain = np.load(tmp_path / "f" / "s.npy", allow_pickle=False)  # NumPy's own
    assert plain.dtype == value.dtype and plain.tobytes() == out.tobytes()


def test_npy_scalars_come_back_as_zero_dimensional_arrays(tmp_path):
    out = passthrough(tmp_path, format="npy").transform(
        [Sample(np.float32(2.5), key="s")]
    )
    assert repr(out[0].data) == "array(2.5, dtype=float32)"


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (np.array([1, None], dtype=object), "arrays of non-object dtype"),
        ([1.0, 2.0], "stores NumPy arrays, got list"),
        ("text", "stores NumPy arrays, got str"),
    ],
)
def test_npy_rejects_what_it_cannot_store_and_writes_nothing(tmp_path, value, detail):
    samples = [Sample(np.ones(2), key="fine"), Sample(np.ones(2), key="odd")]
    odd = CheckpointWrapper(  # returns ``value`` for the second sample
        SampleWrapper(FunctionTransformer(lambda X: [X[0], value][: len(X)])),
        features_dir=str(tmp_path / "f"),
        format="npy",
    )
    with pytest.raises(TypeError) as info:
        odd.transform(samples)
    message = str(info.value)
    assert "sample 'odd'" in message and detail in message
    assert "Nothing of this batch was written." in message
    assert not (tmp_path / "f").exists() or not os.listdir(tmp_path / "f")


def test_npy_rejects_structured_arrays_holding_objects():
    value = np.array([(1, [2])], dtype=[("a", "i4"), ("b", "O")])
    with pytest.raises(TypeError, match="arrays of non-object dtype"):
        NpyFormat().check_value(value)
    NpyFormat().check_value(np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]))


@pytest.mark.parametrize("process", ["same process", "new process"])
def test_a_flipped_npy_payload_byte_is_detected_and_recomputed(tmp_path, process):
    samples = random_samples(3)
    out = counting(tmp_path, format="npy").transform(samples)
    path = tmp_path / "f" / f"{samples[1].key}.npy"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # the last byte of the payload
    path.write_bytes(bytes(blob))
    if process == "new process":
        VALIDATED.clear()
    with pytest.raises(CorruptCheckpointError, match="now corrupt"):
        _ = out[1].data
    np.testing.assert_array_equal(out[0].data, expected(samples)[0])
    with pytest.warns(CheckpointWarning, match=r"recomputes 1 checkpoint.*1 corrupt"):
        again = counting(tmp_path, format="npy").transform(samples)
    np.testing.assert_array_equal(values(again), expected(samples))
    assert calls(tmp_path) == 4


def test_an_npy_file_samplepipe_did_not_write_is_never_overwritten(tmp_path):
    samples = random_samples(2)
    mine = tmp_path / "f" / f"{samples[0].key}.npy"
    mine.parent.mkdir(parents=True)
    np.save(mine, np.arange(3.0))
    before = mine.read_bytes()
    with pytest.raises(UnknownFileError, match="will not overwrite 1 file"):
        counting(tmp_path, format="npy").transform(samples)
    assert mine.read_bytes() == before
    assert calls(tmp_path) == 0


def test_npy_outputs_survive_pickling(tmp_path):
    samples = random_samples(3)
    out = counting(tmp_path, format="npy").transform(samples)
    VALIDATED.clear()
    np.testing.assert_array_equal(values(pickle.loads(pickle.dumps(out))), values(out))


# ---------------------------------------------------------------------------
# the format is part of the identity
# ---------------------------------------------------------------------------
def test_each_format_has_its_own_identity(tmp_path, text_format):
    def custom():
        return counting(
            tmp_path,
            save_func=lambda d, p: np.save(open(p, "wb"), d),
            load_func=np.load,
        )

    steps = {
        "default": counting(tmp_path),
        "hdf5": counting(tmp_path, format="hdf5"),
        "npy": counting(tmp_path, format="npy"),
        "npy instance": counting(tmp_path, format=NpyFormat()),
        "text": counting(tmp_path, format=text_format),
        "custom": custom(),
        "custom by name": custom().set_params(format="custom"),
    }
    ids = {name: s.step_identity() for name, s in steps.items()}
    assert ids["default"] == ids["hdf5"]
    assert ids["npy"] == ids["npy instance"]
    assert ids["custom"] == ids["custom by name"]
    assert len({ids["hdf5"], ids["npy"], ids["text"], ids["custom"]}) == 4
    described = {n: s.describe_step()["format"] for n, s in steps.items()}
    assert described["npy"] == "npy:1:.npy"
    assert described["hdf5"].startswith("hdf5:") and described["hdf5"].endswith(".h5")
    assert described["text"].startswith("test-text:")


def test_switching_between_hdf5_and_npy_recomputes(tmp_path):
    samples = random_samples(3)
    hdf5 = counting(tmp_path, extension=".bin")
    npy = counting(tmp_path, extension=".bin", format="npy")
    hdf5.transform(samples)
    # the step's own HDF5 checkpoints are samplepipe's, and stale: recomputed
    with pytest.warns(CheckpointWarning, match="recomputes 3 checkpoint.*3 stale"):
        out = npy.transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))
    saved = np.load(tmp_path / "f" / f"{samples[0].key}.bin", allow_pickle=False)
    np.testing.assert_array_equal(saved, expected(samples)[0])
    assert calls(tmp_path) == 6
    VALIDATED.clear()
    # and back: the HDF5 step does not read the npy files as its own
    with pytest.warns(CheckpointWarning, match="recomputes 3 checkpoint.*3 corrupt"):
        hdf5.transform(samples)
    assert calls(tmp_path) == 9


def test_formats_keep_their_default_extension_unless_one_is_given(tmp_path):
    samples = random_samples(1)
    counting(tmp_path, format="npy").transform(samples)
    counting(tmp_path, format="npy", extension=".arr").transform(samples)
    counting(tmp_path).transform(samples)
    names = sorted(
        os.path.relpath(os.path.join(folder, name), tmp_path / "f")
        for folder, _, files in os.walk(tmp_path / "f")
        for name in files
    )
    key = samples[0].key
    assert names == sorted(
        [f"{key}.npy", f"{key}.npy.meta.json", f"{key}.arr", f"{key}.arr.meta.json"]
        + [f"{key}.h5"]
    )


# ---------------------------------------------------------------------------
# what is rejected, and when
# ---------------------------------------------------------------------------
def test_format_is_stored_unchanged_and_checked_in_transform(tmp_path):
    wrapper = counting(tmp_path, format="parquet")  # no error yet
    assert wrapper.get_params()["format"] == "parquet"
    assert clone(wrapper).format == "parquet"
    with pytest.raises(ValueError) as info:
        wrapper.transform(random_samples(2))
    message = str(info.value)
    assert message.startswith(
        "CheckpointWrapper got format='parquet': unknown checkpoint format "
        "'parquet'; the registered formats are ['custom', 'hdf5', 'npy'"
    )
    assert "register_format" in message
    instance = NpyFormat()
    assert clone(counting(tmp_path, format=instance)).format == instance


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"format": 42},
            TypeError,
            "CheckpointWrapper got format=42; it must be the name of a registered "
            "format",
        ),
        (
            {"format": NpyFormat},
            TypeError,
            "got format=<class 'samplepipe.storage.npy.NpyFormat'>; it must be",
        ),
        (
            {"format": "custom"},
            ValueError,
            "CheckpointWrapper got format='custom' without save_func and "
            "load_func; give both.",
        ),
        (
            {"format": "npy", "save_func": np.save, "load_func": np.load},
            ValueError,
            "CheckpointWrapper got save_func and load_func with format='npy'; "
            "they are the 'custom' format",
        ),
        (
            {"format": "npy", "layout": "shards"},
            ValueError,
            "CheckpointWrapper got format='npy' with layout='shards'; shards store "
            "every sample in the HDF5 format",
        ),
    ],
)
def test_bad_formats_are_rejected_with_a_clear_message(
    tmp_path, kwargs, error, message
):
    with pytest.raises(error, match=re.escape(message)):
        counting(tmp_path, **kwargs).transform(random_samples(1))
    assert not (tmp_path / "f").exists()


def test_hdf5_by_name_is_allowed_with_shards(tmp_path):
    samples = random_samples(3)
    out = counting(tmp_path, format="hdf5", layout="shards").transform(samples)
    np.testing.assert_array_equal(values(out), expected(samples))


@pytest.mark.parametrize(
    ("name", "cls", "error", "message"),
    [
        ("a:b", TextFormat, ValueError, "register_format got name='a:b'; it must"),
        ("", TextFormat, ValueError, "register_format got name=''; it must"),
        ("mine", dict, TypeError, "it must be a subclass of samplepipe.storage.Format"),
        ("mine", TextFormat(), TypeError, "it must be a subclass of"),
        ("npy", TextFormat, ValueError, "cannot replace the built-in format 'npy'"),
    ],
)
def test_register_format_rejects_bad_names_and_classes(name, cls, error, message):
    before = registered_formats()
    with pytest.raises(error, match=re.escape(message)):
        register_format(name, cls)
    assert registered_formats() == before


def test_a_format_without_save_or_load_says_what_to_implement(tmp_path):
    class Half(Format):
        name = "half"
        extension = ".half"

    with pytest.raises(NotImplementedError, match=r"Half must implement save"):
        counting(tmp_path, format=Half()).transform(random_samples(1))


# ---------------------------------------------------------------------------
# flows
# ---------------------------------------------------------------------------
@pytest.mark.usefixtures("prefect_harness")
def test_a_flow_reuses_npy_checkpoints_through_its_manifests(tmp_path):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from samplepipe.flows import fit_pipeline, transform_pipeline

    log = str(tmp_path / "calls.log")
    step = CheckpointWrapper(
        SampleWrapper(CountingTransformer(stateless=True, log_path=log)),
        features_dir=str(tmp_path / "f"),
        format="npy",
    )
    folders = {
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": 4,
    }
    pipeline = Pipeline([("scale", StandardScaler()), ("count", step)])
    samples = random_samples(8)
    fitted = fit_pipeline(pipeline, samples, **folders)
    first = transform_pipeline(fitted, samples, **folders)
    computed = count_rows(log, "transform")
    second = transform_pipeline(fitted, samples, **folders)
    assert count_rows(log, "transform") == computed  # nothing recomputed
    np.testing.assert_array_equal(values(second), values(first))
    names = [n for _, _, files in os.walk(tmp_path / "f") for n in files]
    assert len(names) == 16 and {n.rsplit(".", 2)[-1] for n in names} == {
        "npy",
        "json",
    }

"""The default checkpoint format: file images patched from checked templates.

`samplepipe.storage.hdf5.image_at` copies a payload and a record into a
template that HDF5 built; these tests hold it to the file HDF5 builds itself,
byte for byte, and show that each check of a template is needed.
"""

import os

import h5py
import numpy as np
import pytest

from samplepipe.storage import hdf5 as hdf5_module
from samplepipe.storage.hdf5 import build_image, image_at, read_payload

from .conftest import counting_checkpoint, make_samples

DTYPES = ["<f8", "<f4", ">f8", "<i8", ">i4", "<i2", "u1", "<u8", "<c16", "<c8"]
SHAPES = [(), (1,), (128,), (3, 4), (2, 3, 5)]
RECORD_SIZES = [16, 77, 200, 1000]


@pytest.fixture(autouse=True)
def fresh_templates():
    """Each test makes its own templates (and leaves none behind)."""
    hdf5_module.clear_templates()
    yield
    hdf5_module.clear_templates()


def random_payload(rng, dtype, shape):
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return np.frombuffer(rng.bytes(nbytes), dtype).reshape(shape).copy()


def random_record(rng, size):
    """A record of ``size`` UTF-8 bytes, non-ASCII characters included."""
    text = "".join(chr(c) for c in rng.integers(0x20, 0x2FF, size=size))
    return text.encode("utf-8")[:size].decode("utf-8", "ignore").ljust(size, "x")


def check_images_are_the_files_hdf5_builds(tmp_path):
    rng = np.random.default_rng(7)
    for dtype in DTYPES:
        for shape in SHAPES:
            for size in RECORD_SIZES:
                image_at(random_payload(rng, dtype, shape), "r" * size)  # the first
                payload = random_payload(rng, dtype, shape)
                record = random_record(rng, size)
                made = image_at(payload, record)
                assert made.blob == build_image(payload, record), (
                    f"the image of a {dtype} {shape} payload with a {size}-byte "
                    "record differs from HDF5's"
                )
                assert made.payload_at is not None, (dtype, shape, size)
                path = str(tmp_path / "x.h5")
                with open(path, "wb") as f:
                    f.write(made.blob)
                direct = read_payload(path, made.payload_at)
                assert direct.dtype == payload.dtype and direct.shape == shape
                assert direct.tobytes() == payload.tobytes()
                assert direct.tobytes() == read_payload(path).tobytes()
                with h5py.File(path, "r") as f:
                    assert f.attrs[hdf5_module.ATTRIBUTE] == record


_real_template = hdf5_module._template


def template_of_any_record_size(dtype, shape, record_size):
    """Broken on purpose: one template per dtype and shape, whatever the record."""
    return _real_template(dtype, shape, RECORD_SIZES[0])


def test_images_are_the_files_hdf5_builds(tmp_path, monkeypatch):
    check_images_are_the_files_hdf5_builds(tmp_path)
    hdf5_module.clear_templates()
    monkeypatch.setattr(hdf5_module, "_template", template_of_any_record_size)
    with pytest.raises(AssertionError, match="differs from HDF5's"):
        check_images_are_the_files_hdf5_builds(tmp_path)


@pytest.mark.parametrize(
    ("payload", "record"),
    [
        (np.array([True, False]), "r" * 40),  # an HDF5 enum, not bytes
        (np.zeros((0, 3)), "r" * 40),  # no payload stored
        (np.arange(3.0), "short"),  # records of < 16 bytes
        (np.arange(3.0), None),  # no record
        (np.zeros(2**17 + 1), "r" * 40),  # over 1 MiB
    ],
)
def test_other_layouts_are_built_by_hdf5(payload, record):
    image_at(payload, record)
    made = image_at(payload, record)
    assert made.blob == build_image(payload, record)
    assert not hdf5_module._TEMPLATES
    if made.payload_at is not None:  # HDF5 stored the payload's bytes as they are
        at = made.payload_at.offset
        assert made.blob[at : at + payload.nbytes] == payload.tobytes()
    assert (made.payload_at is None) == (payload.size == 0)


_real_build = hdf5_module._build
_real_make_template = hdf5_module._make_template


def build_with_a_counter(data, record):
    """HDF5 as if it wrote something that changes from file to file."""
    blob, offset = _real_build(data, record)
    build_with_a_counter.calls += 1
    return blob + bytes([build_with_a_counter.calls % 256]), offset


def make_template_unchecked(dtype, shape, record_size):
    """Broken on purpose: keeps the first image without comparing it with a second."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = np.frombuffer(os.urandom(nbytes), dtype).reshape(shape)
    text = b"q" * record_size
    blob, at = hdf5_module._build(data, text.decode())
    return hdf5_module._Template(blob, at, blob.find(text))


def check_an_image_that_varies_gets_no_template():
    build_with_a_counter.calls = 0
    payload = np.arange(8.0)
    for record in ("a" * 40, "b" * 40, "c" * 40):
        made = image_at(payload, record)
        # the last byte tells which build made the file: the one just made
        last = build_with_a_counter.calls % 256
        assert made.blob[-1] == last, "a template was used for a varying file"
        assert made.blob[:-1] == build_image(payload, record)[:-1]


def test_an_image_that_varies_gets_no_template(monkeypatch):
    monkeypatch.setattr(hdf5_module, "_build", build_with_a_counter)
    check_an_image_that_varies_gets_no_template()
    hdf5_module.clear_templates()
    monkeypatch.setattr(hdf5_module, "_make_template", make_template_unchecked)
    with pytest.raises(AssertionError, match="a template was used for a varying"):
        check_an_image_that_varies_gets_no_template()


@pytest.fixture
def opened(monkeypatch):
    """Paths HDF5 opens (every h5py open goes through ``h5f.open``)."""
    paths = []
    real = h5py.h5f.open

    def spy(name, *args, **kwargs):
        paths.append(os.fsdecode(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(h5py.h5f, "open", spy)
    return paths


def test_outputs_of_a_first_run_load_without_opening_hdf5(tmp_path, opened):
    samples = make_samples(5)
    wrapper, _ = counting_checkpoint(tmp_path)
    out = wrapper.transform(samples)
    values = np.stack([s.data for s in out])
    np.testing.assert_array_equal(values, np.stack([s.data for s in samples]) + 1.0)
    assert opened == []
    # a file replaced since (another writer): judged and read through HDF5
    path = wrapper.checkpoint_path(samples[2].key)
    with open(path, "rb") as f:
        blob = f.read()
    with open(path + ".new", "wb") as f:
        f.write(blob)
    os.replace(path + ".new", path)
    np.testing.assert_array_equal(out[2].data, samples[2].data + 1.0)
    assert opened and set(opened) == {path}


def test_data_of_varying_shapes_pays_for_no_template(monkeypatch):
    calls = []

    def counted(data, record):
        calls.append(data.shape)
        return _real_build(data, record)

    monkeypatch.setattr(hdf5_module, "_build", counted)
    for n in range(1, 21):
        image_at(np.arange(float(n)), "r" * 40)
    assert len(calls) == 20, "templates were made for layouts seen once"
    image_at(np.arange(5.0) + 1, "s" * 40)  # a layout seen before
    assert len(calls) == 20 + 2
    assert isinstance(hdf5_module._TEMPLATES[("<f8", (5,), 40)], hdf5_module._Template)


def test_templates_are_bounded(monkeypatch):
    monkeypatch.setattr(hdf5_module, "_TEMPLATES_MAX_BYTES", 100_000)
    for n in range(1000, 1100, 10):  # ~14 KB a template
        for _ in range(2):
            image_at(np.zeros(n), "r" * 40)
    templates = [
        t
        for t in hdf5_module._TEMPLATES.values()
        if isinstance(t, hdf5_module._Template)
    ]
    assert 0 < len(templates) < 10
    assert hdf5_module._template_bytes == sum(len(t.blob) for t in templates)
    assert hdf5_module._template_bytes <= 100_000

"""joblib's hashing tests, against samplepipe's content digests.

The cases of ``joblib/test/test_hashing.py`` (joblib 1.6.0, as installed), in
their order, with ``joblib.hash`` replaced by samplepipe's `state_digest` (any
value: fitted state, parameters, metadata) and `value_digest` (one sample's
data; arrays by their bytes): every case runs with both, through the
``digest`` fixture. Each test names the peer test; inputs and expected outcomes
(equal or different digests) are the peer's. Where samplepipe differs on
purpose, the test asserts samplepipe's behaviour and tests/peers/README.md
gives the reason. The two samplepipe bugs this suite found are fixed
(tests/peers/README.md).

Not ported: ``test_hash_numpy_performance`` (a wall-clock bound; benchmarks
live in bench/, never in tests).
"""

import collections
import gc
import io
import itertools
import multiprocessing
import pickle
import random
import re
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal

import numpy as np
import pytest
from joblib import Memory

from samplepipe.storage import code_identity, state_digest, value_digest


@pytest.fixture(params=[state_digest, value_digest], ids=lambda f: f.__name__)
def digest(request):
    """The digest standing for ``joblib.hash`` in one run of a case."""
    return request.param


class Klass:
    def f(self, x):
        return x


class KlassWithCachedMethod:
    def __init__(self, cachedir):
        mem = Memory(location=cachedir, verbose=0)
        self.f = mem.cache(self.f)

    def f(self, x):
        return x


input_list = [
    1,
    2,
    1.0,
    2.0,
    1 + 1j,
    2.0 + 1j,
    "a",
    "b",
    (1,),
    (1, 1),
    [1],
    [1, 1],
    {1: 1},
    {1: 2},
    {2: 1},
    None,
    gc.collect,
    [1].append,
    # Next 2 sets have unorderable elements in python 3.
    {"a", 1},
    {"a", 1, ("a", 1)},
    # Next 2 dicts have unorderable type of keys in python 3.
    {"a": 1, 1: 2},
    {"a": 1, 1: 2, "d": {"a": 1}},
]


@pytest.mark.parametrize("obj1", input_list)
@pytest.mark.parametrize("obj2", input_list)
def test_trivial_hash(obj1, obj2, digest):
    """Smoke test hash on various types."""
    # Check that 2 objects have the same hash only if they are the same.
    are_hashes_equal = digest(obj1) == digest(obj2)
    are_objs_identical = obj1 is obj2
    assert are_hashes_equal == are_objs_identical


def test_hash_methods(digest):
    # joblib test_hash_methods, first half: the same method twice
    a = io.StringIO("a")
    assert digest(a.flush) == digest(a.flush)


def test_hash_methods_bound_to_different_objects(digest):
    # joblib test_hash_methods, second half
    a1 = collections.deque(range(10))
    a2 = collections.deque(range(9))
    assert digest(a1.extend) != digest(a2.extend)


@pytest.fixture
def three_np_arrays():
    rnd = np.random.RandomState(0)
    arr1 = rnd.random_sample((10, 10))
    arr2 = arr1.copy()
    arr3 = arr2.copy()
    arr3[0] += 1
    return arr1, arr2, arr3


def test_hash_numpy_arrays(three_np_arrays, digest):
    arr1, arr2, arr3 = three_np_arrays

    for obj1, obj2 in itertools.product(three_np_arrays, repeat=2):
        are_hashes_equal = digest(obj1) == digest(obj2)
        are_arrays_equal = np.all(obj1 == obj2)
        assert are_hashes_equal == are_arrays_equal

    assert digest(arr1) != digest(arr1.T)


def test_hash_numpy_dict_of_arrays(three_np_arrays, digest):
    arr1, arr2, arr3 = three_np_arrays

    d1 = {1: arr1, 2: arr2}
    d2 = {1: arr2, 2: arr1}
    d3 = {1: arr2, 2: arr3}

    assert digest(d1) == digest(d2)
    assert digest(d1) != digest(d3)


@pytest.mark.parametrize("dtype", ["datetime64[s]", "timedelta64[D]"])
def test_numpy_datetime_array(dtype, digest):
    a_hash = digest(np.arange(10))
    array = np.arange(0, 10, dtype=dtype)
    assert digest(array) != a_hash


def test_hash_numpy_noncontiguous(digest):
    # Deliberate difference: joblib hashes the memory layout, samplepipe the
    # content; a copy in another layout has the same digest
    # (tests/peers/README.md, "array layout").
    a = np.asarray(np.arange(6000).reshape((1000, 2, 3)), order="F")[:, :1, :]
    b = np.ascontiguousarray(a)
    assert digest(a) == digest(b)

    c = np.asfortranarray(a)
    assert digest(a) == digest(c)
    # the content still counts
    d = b.copy()
    d[0, 0, 0] += 1
    assert digest(a) != digest(d)


@pytest.mark.parametrize("coerce_mmap", [True, False])
def test_hash_memmap(tmp_path, coerce_mmap, digest):
    """Check that memmap and arrays hash identically if coerce_mmap is True.

    Deliberate difference for ``coerce_mmap=False``: samplepipe has no such
    option; a memmap is hashed as the array it holds (tests/peers/README.md).
    """
    filename = str(tmp_path / "memmap_temp")
    try:
        m = np.memmap(filename, shape=(10, 10), mode="w+")
        a = np.asarray(m)
        are_hashes_equal = digest(a) == digest(m)
        assert are_hashes_equal  # joblib: == coerce_mmap
    finally:
        if "m" in locals():
            del m
            gc.collect()


def test_bound_methods_hash(digest):
    """Calling the same method on two different instances of the same class
    resolves to the same hashes.

    joblib hashes the call's arguments (``filter_args``, which leaves ``self``
    out); samplepipe hashes the bound method, instance included.
    """
    a = Klass()
    b = Klass()
    assert digest(a.f) == digest(b.f)
    assert code_identity(a.f) == code_identity(b.f)


def test_bound_cached_methods_hash(tmp_path, digest):
    """Calling the same _cached_ method on two different instances of the
    same class resolves to the same hashes.
    """
    a = KlassWithCachedMethod(str(tmp_path))
    b = KlassWithCachedMethod(str(tmp_path))
    assert digest(a.f.func) == digest(b.f.func)


def test_hash_object_dtype(digest):
    """Make sure that ndarrays with dtype `object' hash correctly."""

    a = np.array([np.arange(i) for i in range(6)], dtype=object)
    b = np.array([np.arange(i) for i in range(6)], dtype=object)

    assert digest(a) == digest(b)


def test_numpy_scalar(digest):
    # Numpy scalars are built from compiled functions, and lead to
    # strange pickling paths explored, that can give hash collisions
    a = np.float64(2.0)
    b = np.float64(3.0)
    assert digest(a) != digest(b)


def test_dict_hash(tmp_path, digest):
    # Check that dictionaries hash consistently, even though the ordering
    # of the keys is not guaranteed
    k = KlassWithCachedMethod(str(tmp_path))

    d = {
        "#s12069__c_maps.nii.gz": [33],
        "#s12158__c_maps.nii.gz": [33],
        "#s12258__c_maps.nii.gz": [33],
        "#s12277__c_maps.nii.gz": [33],
        "#s12300__c_maps.nii.gz": [33],
        "#s12401__c_maps.nii.gz": [33],
        "#s12430__c_maps.nii.gz": [33],
        "#s13817__c_maps.nii.gz": [33],
        "#s13903__c_maps.nii.gz": [33],
        "#s13916__c_maps.nii.gz": [33],
        "#s13981__c_maps.nii.gz": [33],
        "#s13982__c_maps.nii.gz": [33],
        "#s13983__c_maps.nii.gz": [33],
    }

    a = k.f(d)
    b = k.f(a)

    assert digest(a) == digest(b)


def test_set_hash(tmp_path, digest):
    # Check that sets hash consistently, even though their ordering
    # is not guaranteed
    k = KlassWithCachedMethod(str(tmp_path))

    s = {
        "#s12069__c_maps.nii.gz",
        "#s12158__c_maps.nii.gz",
        "#s12258__c_maps.nii.gz",
        "#s12277__c_maps.nii.gz",
        "#s12300__c_maps.nii.gz",
        "#s12401__c_maps.nii.gz",
        "#s12430__c_maps.nii.gz",
        "#s13817__c_maps.nii.gz",
        "#s13903__c_maps.nii.gz",
        "#s13916__c_maps.nii.gz",
        "#s13981__c_maps.nii.gz",
        "#s13982__c_maps.nii.gz",
        "#s13983__c_maps.nii.gz",
    }

    a = k.f(s)
    b = k.f(a)

    assert digest(a) == digest(b)


def test_set_decimal_hash(digest):
    # Check that sets containing decimals hash consistently, even though
    # ordering is not guaranteed
    assert digest({Decimal(0), Decimal("NaN")}) == digest({Decimal("NaN"), Decimal(0)})


def test_string(digest):
    # Test that we obtain the same hash for object owning several strings,
    # whatever the past of these strings (which are immutable in Python)
    string = "foo"
    a = {string: "bar"}
    b = {string: "bar"}
    c = pickle.loads(pickle.dumps(b))
    assert digest([a, b]) == digest([a, c])


def test_numpy_dtype_pickling(digest):
    # The digest of numpy dtypes is robust to object identity and copies.
    dt1 = np.dtype("f4")
    dt2 = np.dtype("f4")

    # simple dtypes objects are interned
    assert dt1 is dt2
    assert digest(dt1) == digest(dt2)

    dt1_roundtripped = pickle.loads(pickle.dumps(dt1))
    assert dt1 is not dt1_roundtripped
    assert digest(dt1) == digest(dt1_roundtripped)

    assert digest([dt1, dt1]) == digest([dt1_roundtripped, dt1_roundtripped])
    assert digest([dt1, dt1]) == digest([dt1, dt1_roundtripped])

    complex_dt1 = np.dtype([("name", np.str_, 16), ("grades", np.float64, (2,))])
    complex_dt2 = np.dtype([("name", np.str_, 16), ("grades", np.float64, (2,))])

    # complex dtypes objects are not interned
    assert digest(complex_dt1) == digest(complex_dt2)

    complex_dt1_roundtripped = pickle.loads(pickle.dumps(complex_dt1))
    assert complex_dt1_roundtripped is not complex_dt1
    assert digest(complex_dt1) == digest(complex_dt1_roundtripped)

    assert digest([complex_dt1, complex_dt1]) == digest(
        [complex_dt1_roundtripped, complex_dt1_roundtripped]
    )
    assert digest([complex_dt1, complex_dt1]) == digest(
        [complex_dt1_roundtripped, complex_dt1]
    )


def _generate_seeded_random_values():
    rng = random.Random(42)
    return [rng.random() for _ in range(5)]


# Deliberate difference: joblib pins its own MD5 values (from joblib 0.9.2);
# samplepipe pins its own digests of the same inputs, so that a change of the
# digests (every checkpoint recomputed) cannot pass unnoticed.
@pytest.mark.parametrize(
    "to_hash,expected",
    [
        ("This is a string to hash", "15b1e047c858578479ebb5fccbcc3598"),
        ("C'est l\xe9t\xe9", "8b72b3dbc1bf3b63d74db7f543f5ae67"),
        ((123456, 54321, -98765), "56a63465eee8e67b303021bec6262c01"),
        (_generate_seeded_random_values(), "b5c494da2e0421e40878074c7cbdb01f"),
        ({"abcde": 123, "sadfas": [-9999, 2, 3]}, "5cb1d276240d0f29857fbb41573359e5"),
    ],
)
def test_hashes_stay_the_same(to_hash, expected, digest):
    # Hashes must not change with the samplepipe version: for users, that
    # would mean recomputing their checkpoints from scratch.
    assert digest(to_hash) == expected


def test_hashes_are_different_between_c_and_fortran_contiguous_arrays(digest):
    # Deliberate difference: joblib wants two digests for the C and Fortran
    # layouts of one array; samplepipe gives one, the content's
    # (tests/peers/README.md, "array layout").
    rng = np.random.RandomState(0)
    arr_c = rng.random_sample((10, 10))
    arr_f = np.asfortranarray(arr_c)
    assert digest(arr_c) == digest(arr_f)


def test_0d_array(digest):
    assert len(digest(np.array(0))) == 32


def test_0d_and_1d_array_hashing_is_different(digest):
    assert digest(np.array(0)) != digest(np.array([0]))


def create_objects_to_hash():
    rng = np.random.RandomState(42)
    return [
        rng.randint(-1000, high=1000, size=50).astype("<i8"),
        tuple(rng.randn(3).astype("<f4") for _ in range(5)),
        [rng.randn(3).astype("<f4") for _ in range(5)],
        {
            -3333: rng.randn(3, 5).astype("<f4"),
            0: [
                rng.randint(10, size=20).astype("<i8"),
                rng.randn(10).astype("<f4"),
            ],
        },
        # Non regression cases for joblib issue 308
        np.arange(100, dtype="<i8").reshape((10, 10)),
        # Fortran contiguous array
        np.asfortranarray(np.arange(100, dtype="<i8").reshape((10, 10))),
        # Non contiguous array
        np.arange(100, dtype="<i8").reshape((10, 10))[:, :2],
    ]


def test_hashes_stay_the_same_with_numpy_objects():
    # The same digest in two other processes, and for two copies of the same
    # objects. Both digests run in the same two processes (new interpreters:
    # each has its own hash seed), which take seconds to start.
    to_hash_list_one = create_objects_to_hash()
    to_hash_list_two = create_objects_to_hash()

    spawn = multiprocessing.get_context("spawn")
    e1 = ProcessPoolExecutor(max_workers=1, mp_context=spawn)
    e2 = ProcessPoolExecutor(max_workers=1, mp_context=spawn)

    try:
        for digest in (state_digest, value_digest):
            for obj_1, obj_2 in zip(to_hash_list_one, to_hash_list_two):
                # testing consistency of hashes across python processes
                hash_1 = e1.submit(digest, obj_1).result()
                hash_2 = e2.submit(digest, obj_1).result()
                assert hash_1 == hash_2
                assert hash_1 == digest(obj_1)

                # testing consistency when hashing two copies of the same objects.
                hash_3 = e1.submit(digest, obj_2).result()
                assert hash_1 == hash_3
    finally:
        e1.shutdown()
        e2.shutdown()


def test_hashing_pickling_error(digest):
    # Deliberate difference: joblib pickles, and a local function raises
    # PicklingError; samplepipe hashes a function's code, never its pickle
    # (tests/peers/README.md, "no pickling").
    def non_picklable():
        return 42

    first = digest(non_picklable)

    def non_picklable():  # noqa: F811 - the same code again
        return 42

    assert digest(non_picklable) == first

    def non_picklable():  # noqa: F811 - other code
        return 43

    assert digest(non_picklable) != first


def test_wrong_hash_name(digest):
    # Deliberate difference: one algorithm (BLAKE2b), no ``hash_name``
    # option; passing one is a TypeError (tests/peers/README.md).
    data = {"foo": "bar"}
    with pytest.raises(TypeError, match=re.escape("hash_name")):
        digest(data, hash_name="invalid")

"""Hugging Face ``datasets``' function-hashing tests, against samplepipe's identity.

The cases of ``tests/test_fingerprint.py`` (huggingface/datasets, classes
``RecurseHashTest`` and ``HashingTest`` and the module-level tests), in their
order, with ``Hasher.hash`` replaced by samplepipe's digests: `code_identity`
for functions, methods and lambdas, `state_digest` for values and instances,
`estimator_identity` for a step's declared version. Each test names the peer
test; the inputs and the expected outcome (equal or different digests) are the
peer's. Where samplepipe differs on purpose, the test asserts samplepipe's
behaviour and tests/peers/README.md gives the reason.

Not ported: the peer's tests of third-party objects (``transformers``
tokenizers, ``regex``, ``tiktoken``, ``torch``, ``spacy``), which need
libraries samplepipe neither depends on nor installs for its tests.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import types
from concurrent.futures import ProcessPoolExecutor
from tempfile import gettempdir
from textwrap import dedent

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from samplepipe.storage import code_identity, combine, estimator_identity, state_digest


class Foo:
    def __init__(self, foo):
        self.foo = foo

    def __call__(self):
        return self.foo


class DatasetChild:
    """Stands for the peer's ``DatasetChild``: two transforms with one body."""

    def __init__(self, data):
        self.data = data

    def func1(self, *args, **kwargs):
        return DatasetChild(self.data)

    def func2(self, *args, **kwargs):
        return DatasetChild(self.data)


class UnpicklableCallable:
    def __init__(self, callable):
        self.callable = callable

    def __call__(self, *args, **kwargs):
        if self.callable is not None:
            return self.callable(*args, **kwargs)

    def __getstate__(self):
        import pickle

        raise pickle.PicklingError()


def spawn_pool():
    """A pool of one new interpreter (its own hash seed, nothing inherited)."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


# ---------------------------------------------------------------------------
# RecurseHashTest
# ---------------------------------------------------------------------------
class TestRecurseHash:
    def test_recurse_hash_for_function(self):
        def func():
            return foo

        foo = [0]
        hash1 = code_identity(func)
        foo = [1]
        hash2 = code_identity(func)
        foo = [0]
        hash3 = code_identity(func)
        assert hash1 == hash3
        assert hash1 != hash2

    def test_hash_ignores_line_definition_of_function(self):
        def func():
            pass

        hash1 = code_identity(func)

        def func():
            pass

        hash2 = code_identity(func)
        assert hash1 == hash2

    def test_recurse_hash_for_class(self):
        hash1 = state_digest(Foo([0]))
        hash2 = state_digest(Foo([1]))
        hash3 = state_digest(Foo([0]))
        assert hash1 == hash3
        assert hash1 != hash2

    def test_recurse_hash_for_method(self):
        hash1 = code_identity(Foo([0]).__call__)
        hash2 = code_identity(Foo([1]).__call__)
        hash3 = code_identity(Foo([0]).__call__)
        assert hash1 == hash3
        assert hash1 != hash2

    def test_hash_ipython_function(self):
        def create_ipython_func(co_filename, returned_obj):
            def func():
                return returned_obj

            code = func.__code__
            code = code.replace(co_filename=co_filename)
            return types.FunctionType(
                code,
                func.__globals__,
                func.__name__,
                func.__defaults__,
                func.__closure__,
            )

        co_filename, returned_obj = "<ipython-input-2-e0383a102aae>", [0]
        hash1 = code_identity(create_ipython_func(co_filename, returned_obj))
        co_filename, returned_obj = "<ipython-input-2-e0383a102aae>", [1]
        hash2 = code_identity(create_ipython_func(co_filename, returned_obj))
        co_filename, returned_obj = "<ipython-input-5-713f6613acf3>", [0]
        hash3 = code_identity(create_ipython_func(co_filename, returned_obj))
        assert hash1 == hash3
        assert hash1 != hash2

        folder = os.path.join(gettempdir(), "ipykernel_12345")
        co_filename, returned_obj = os.path.join(folder, "321456789.py"), [0]
        hash4 = code_identity(create_ipython_func(co_filename, returned_obj))
        co_filename, returned_obj = os.path.join(folder, "321456789.py"), [1]
        hash5 = code_identity(create_ipython_func(co_filename, returned_obj))
        co_filename, returned_obj = os.path.join(folder, "654123987.py"), [0]
        hash6 = code_identity(create_ipython_func(co_filename, returned_obj))
        assert hash4 == hash6
        assert hash4 != hash5

    def test_recurse_hash_for_function_with_shuffled_globals(self):
        # The peer shuffles the globals dill reports (a mock of
        # dill.detect.globalvars); samplepipe reads a function's globals from
        # ``__globals__``, so here the dict itself comes in two orders.
        foo, bar = [0], [1]

        code = _reads_foo_and_bar.__code__  # def func(): return foo, bar
        func1 = types.FunctionType(code, {"foo": foo, "bar": bar}, "func")
        func2 = types.FunctionType(code, {"bar": bar, "foo": foo}, "func")
        for f in (func1, func2):
            f.__module__ = "__main__"
        hash1 = code_identity(func1)
        hash2 = code_identity(func2)
        assert list(func1.__globals__) != list(func2.__globals__)
        assert hash1 == hash2
        # and the values count: the shuffle is not a blind spot
        func3 = types.FunctionType(code, {"bar": bar, "foo": [2]}, "func")
        func3.__module__ = "__main__"
        assert code_identity(func3) != hash1


def _reads_foo_and_bar():
    return foo, bar  # noqa: F821 - globals given by the test


# ---------------------------------------------------------------------------
# HashingTest
# ---------------------------------------------------------------------------
class TestHashing:
    def test_hash_simple(self):
        hash1 = state_digest("hello")
        hash2 = state_digest("hello")
        hash3 = state_digest("there")
        assert hash1 == hash2
        assert hash1 != hash3

    def test_hash_class_instance(self):
        hash1 = state_digest(Foo("hello"))
        hash2 = state_digest(Foo("hello"))
        hash3 = state_digest(Foo("there"))
        assert hash1 == hash2
        assert hash1 != hash3

    def test_hash_update(self):
        # ``Hasher.update`` one value after another: samplepipe combines the
        # values' digests in order.
        hash1 = combine(*[state_digest(x) for x in ["hello", Foo("hello")]])
        hash2 = combine(*[state_digest(x) for x in ["hello", Foo("hello")]])
        hash3 = combine(*[state_digest(x) for x in ["there", Foo("there")]])
        assert hash1 == hash2
        assert hash1 != hash3

    def test_hash_unpicklable(self):
        # Deliberate difference: datasets pickles and raises PicklingError;
        # samplepipe never pickles what it hashes, so an unpicklable callable
        # has a digest, which follows its state (tests/peers/README.md).
        hash1 = state_digest(UnpicklableCallable(Foo("hello")))
        hash2 = state_digest(UnpicklableCallable(Foo("hello")))
        hash3 = state_digest(UnpicklableCallable(Foo("there")))
        assert hash1 == hash2
        assert hash1 != hash3
        assert code_identity(UnpicklableCallable(Foo("hello"))) == code_identity(
            UnpicklableCallable(Foo("hello"))
        )

    def test_hash_same_strings(self):
        string = "abc"
        obj1 = [string, string]  # two strings have the same ids
        obj2 = [string, string]
        obj3 = json.loads(f'["{string}", "{string}"]')  # two strings, two ids
        assert obj1[0] is string
        assert obj1[0] is obj1[1]
        assert obj2[0] is string
        assert obj2[0] is obj2[1]
        assert obj3[0] is not string
        assert obj3[0] is not obj3[1]
        hash1 = state_digest(obj1)
        hash2 = state_digest(obj2)
        hash3 = state_digest(obj3)
        assert hash1 == hash2
        assert hash1 == hash3

    def test_set_stable(self):
        rng = np.random.default_rng(42)
        set_ = {rng.random() for _ in range(10_000)}
        expected_hash = state_digest(set_)
        with spawn_pool() as pool:
            assert expected_hash == pool.submit(state_digest, set(set_)).result()

    def test_set_doesnt_depend_on_order(self):
        set_ = set("abc")
        hash1 = state_digest(set_)
        set_ = set("def")
        hash2 = state_digest(set_)
        set_ = set("cba")
        hash3 = state_digest(set_)
        assert hash1 == hash3
        assert hash1 != hash2


# ---------------------------------------------------------------------------
# module-level tests
# ---------------------------------------------------------------------------
def test_move_script_doesnt_change_hash(tmp_path):
    dir1 = tmp_path / "dir1"
    dir2 = tmp_path / "dir2"
    dir1.mkdir()
    dir2.mkdir()
    script_filename = "script.py"
    code = dedent(
        """
    from samplepipe.storage import code_identity
    def foo():
        pass
    print(code_identity(foo))
    """
    )
    script_path1 = dir1 / script_filename
    script_path2 = dir2 / script_filename
    script_path1.write_text(code)
    script_path2.write_text(code)
    fingerprint1 = subprocess.check_output([sys.executable, str(script_path1)])
    fingerprint2 = subprocess.check_output([sys.executable, str(script_path2)])
    assert len(fingerprint1.strip()) == 32
    assert fingerprint1 == fingerprint2


def test_fingerprint_in_multiprocessing():
    data = {"a": [0, 1, 2]}
    dataset = DatasetChild(data)
    expected_fingerprint = code_identity(dataset.func1)
    assert expected_fingerprint == code_identity(dataset.func1)
    assert expected_fingerprint != code_identity(dataset.func2)

    with spawn_pool() as p:
        assert expected_fingerprint == p.submit(code_identity, dataset.func1).result()
        assert expected_fingerprint != p.submit(code_identity, dataset.func2).result()


def test_fingerprint_when_transform_version_changes():
    # The peer's ``fingerprint_transform(version=...)`` is samplepipe's
    # declared ``version`` (``__samplepipe_tags__``, see estimator_options).
    class DummyDatasetChild(TransformerMixin, BaseEstimator):
        def transform(self, X):
            return X

    fingeprint_no_version = estimator_identity(DummyDatasetChild())

    class DummyDatasetChild(TransformerMixin, BaseEstimator):  # noqa: F811
        def __samplepipe_tags__(self):
            return {"version": "1.0.0"}

        def transform(self, X):
            return X

    fingeprint_1 = estimator_identity(DummyDatasetChild())

    class DummyDatasetChild(TransformerMixin, BaseEstimator):  # noqa: F811
        def __samplepipe_tags__(self):
            return {"version": "2.0.0"}

        def transform(self, X):
            return X

    fingeprint_2 = estimator_identity(DummyDatasetChild())

    assert len({fingeprint_no_version, fingeprint_1, fingeprint_2}) == 3


def test_dependency_on_dill():
    # AttributeError: module 'dill._dill' has no attribute 'stack'
    assert len(code_identity(lambda x: x)) == 32

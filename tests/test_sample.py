import pickle
import re
import tracemalloc

import numpy as np
import pytest
from sklearn.preprocessing import FunctionTransformer

from samplepipe import (
    DelayedSample,
    DelayedSampleSet,
    DelayedSampleSetCached,
    Sample,
    SampleBatch,
    SampleSet,
    SampleWrapper,
    flatten_samplesets,
)
from samplepipe.wrappers._sample import stack_values


def test_repr_matches_the_seed():
    s = Sample(np.array([0.0, 0.0]), offset=np.array([0]), key="0")
    assert repr(s) == "Sample(data=array([0., 0.]), offset=array([0]), key='0')"


def test_parent_attributes_are_copied_and_overridden():
    parent = Sample(1, a=1, b=2)
    child = Sample(2, parent=parent, b=3)
    assert (child.data, child.a, child.b) == (2, 1, 3)
    assert parent.b == 2


def test_private_attributes_are_not_copied():
    parent = Sample(1, a=1)
    parent._secret = 5
    assert not hasattr(Sample(2, parent=parent), "_secret")


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        (Sample(np.zeros(3)), Sample(np.zeros(3)), True),
        (Sample(np.zeros(3)), Sample(np.zeros(3), z=5), False),  # extra attribute
        (Sample(np.zeros(3), z=5), Sample(np.zeros(3)), False),  # symmetric
        (Sample(np.zeros(3)), Sample(np.zeros(1)), False),  # no broadcasting
        (Sample(np.zeros(3), a=1), Sample(np.zeros(3), a=2), False),
        (Sample(np.zeros(3), a=np.ones(2)), Sample(np.zeros(3), a=np.ones(2)), True),
        (Sample([np.ones(2)], k="x"), Sample([np.ones(2)], k="x"), True),
        (Sample("text"), Sample("text"), True),
    ],
)
def test_equality_is_exact_and_symmetric(left, right, equal):
    assert (left == right) is equal
    assert (right == left) is equal


def test_comparing_with_a_non_sample_is_false_not_an_error():
    s = Sample(np.zeros(2))
    assert (s == 3) is False
    assert (s != "x") is True
    assert s.__eq__(object()) is NotImplemented


def test_delayed_samples_compare_by_loaded_data():
    a = DelayedSample(lambda: np.arange(3), key="k")
    b = DelayedSample(lambda: np.arange(3), key="k")
    c = DelayedSample(lambda: np.arange(4), key="k")
    assert a == b
    assert a != c
    assert a != Sample(np.arange(3), key="k")  # another class


def test_samples_hash_by_key():
    a, b = Sample(np.zeros(2), key="a"), Sample(np.zeros(2), key="a")
    assert hash(a) == hash(b)
    assert len({a, b, Sample(np.zeros(2), key="b")}) == 2


def test_delayed_sample_loads_lazily_on_access():
    calls = []

    def load():
        calls.append(1)
        return np.ones(2)

    s = DelayedSample(load, key="a")
    assert calls == []
    assert repr(s) == "DelayedSample(key='a')"
    assert calls == []
    np.testing.assert_array_equal(s.data, np.ones(2))
    assert len(calls) == 1


def test_delayed_attributes_stay_lazy_through_parents():
    calls = []

    def label():
        calls.append(1)
        return "L"

    s = DelayedSample(lambda: 1, delayed_attributes={"label": label}, key="k")
    child = Sample(2, parent=s)
    delayed_child = DelayedSample(lambda: 3, parent=s)
    assert repr(s) == "DelayedSample(key='k', label=<delayed>)"
    assert repr(child) == "Sample(data=2, key='k', label=<delayed>)"
    assert calls == []
    assert (child.label, delayed_child.label) == ("L", "L")
    assert len(calls) == 2


def test_delayed_attribute_given_twice_raises():
    with pytest.raises(ValueError, match="both in 'delayed_attributes'"):
        DelayedSample(lambda: 1, delayed_attributes={"a": lambda: 1}, a=2)


def test_kwarg_replaces_a_parents_delayed_attribute():
    s = DelayedSample(lambda: 1, delayed_attributes={"a": lambda: 1})
    child = DelayedSample(lambda: 1, parent=s, a=5)
    assert child.a == 5
    assert "a" not in child._delayed_attributes


def test_setting_a_delayed_attribute_makes_it_eager():
    s = DelayedSample(lambda: 1, delayed_attributes={"a": lambda: 1})
    s.a = 7
    assert s.a == 7
    assert repr(s) == "DelayedSample(a=7)"


def test_from_sample_reuses_the_loader_and_loads_nothing():
    calls = []
    s = DelayedSample(lambda: calls.append(1) or 5, key="k")
    d = DelayedSample.from_sample(s, extra=1)
    assert calls == []
    assert (d.data, d.key, d.extra) == (5, "k", 1)


def test_sample_set_is_a_mutable_sequence_with_metadata():
    parent = DelayedSample(lambda: 1, delayed_attributes={"lazy": lambda: 1}, key="p")
    ss = SampleSet([Sample(1), Sample(2)], parent=parent, subject="x")
    ss.append(Sample(3))
    ss.insert(0, Sample(0))
    del ss[1]
    ss[0] = Sample(-1)
    assert [s.data for s in ss] == [-1, 2, 3]
    assert (ss.key, ss.subject) == ("p", "x")
    assert not hasattr(ss, "lazy")  # delayed attributes of a parent are skipped


def test_delayed_sample_sets_load_on_access_and_cached_once():
    calls = []

    def load():
        calls.append(1)
        return [Sample(1), Sample(2)]

    d = DelayedSampleSet(load, key="k")
    assert len(d) == 2 and len(d) == 2
    assert len(calls) == 2
    calls.clear()
    c = DelayedSampleSetCached(load, key="k")
    assert len(c) == 2 and c[1].data == 2
    assert len(calls) == 1
    assert not hasattr(c, "kwargs")


def test_sample_batch_stacks_into_one_array_loading_each_sample_once():
    calls = []

    def loader(i):
        def load():
            calls.append(i)
            return np.full(3, i, dtype=float)

        return load

    batch = SampleBatch([DelayedSample(loader(i)) for i in range(4)])
    array = np.asarray(batch)
    assert array.shape == (4, 3)
    np.testing.assert_array_equal(array[:, 0], np.arange(4))
    assert sorted(calls) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "values",
    [["a", "bb"], [np.zeros(2), np.zeros(3)]],
    ids=["strings", "ragged"],
)
def test_sample_batch_gives_a_list_for_strings_and_ragged(values):
    batch = SampleBatch([Sample(v) for v in values])
    stacked = batch.stack()
    assert isinstance(stacked, list)
    assert len(stacked) == 2


@pytest.mark.parametrize("given_length", [False, True], ids=["list", "one-at-a-time"])
def test_values_that_do_not_stack_are_given_back_as_they_were(given_length):
    first, ints, as_list = np.zeros(3), np.arange(3), [1.0, 2.0, 3.0]
    values = [first, ints, as_list, np.ones(2), "a"]
    n = len(values) + 3 if given_length else None
    stacked = stack_values(iter(values) if given_length else values, n=n)
    assert isinstance(stacked, list)
    assert [type(v) for v in stacked] == [type(v) for v in values]
    # the values that were copied into the array before the ragged one came
    assert stacked[1] is ints and stacked[2] is as_list
    np.testing.assert_array_equal(stacked[0], first)
    assert stacked[3] is values[3] and stacked[4] == "a"


def test_stacking_values_taken_one_at_a_time_gives_as_many_rows():
    stacked = stack_values(iter([np.zeros(2), np.ones(2)]), n=5)
    assert stacked.shape == (2, 2)
    np.testing.assert_array_equal(stacked, [[0, 0], [1, 1]])
    assert stack_values(iter([]), n=3).shape == (0,)


def test_stacking_lazy_samples_holds_one_copy_of_the_batch():
    # 40 samples of 400 KB loaded on access; the step keeps one column, so what
    # the transform holds is the stacked input (formerly: the loaded values and
    # the stacked input, two copies)
    def loader(i):
        return lambda: np.full(50_000, float(i))

    samples = [DelayedSample(loader(i), key=f"k{i}") for i in range(40)]
    step = SampleWrapper(FunctionTransformer(lambda X: X[:, :1].copy()))
    batch_bytes = 40 * 50_000 * 8
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = step.transform(samples)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * batch_bytes, f"{peak / batch_bytes:.2f} batches"
    assert [o.data[0] for o in out] == [float(i) for i in range(40)]


def test_sample_batch_other_attribute():
    batch = SampleBatch([Sample(0, y=1), Sample(0, y=2)], sample_attribute="y")
    assert list(batch) == [1, 2]
    np.testing.assert_array_equal(np.asarray(batch), [1, 2])


def test_samples_pickle():
    s = Sample(np.arange(2), key="a", meta={"x": 1})
    assert pickle.loads(pickle.dumps(s)) == s
    ss = SampleSet([s], key="set")
    assert pickle.loads(pickle.dumps(ss)) == ss


def test_sample_set_repr_lists_its_samples_once():
    assert (
        repr(SampleSet([Sample(1)], key="k"))
        == "SampleSet(samples=[Sample(data=1)], key='k')"
    )
    assert repr(SampleSet([], parent=Sample(0, a=1))) == "SampleSet(samples=[], a=1)"
    assert repr(DelayedSampleSet(lambda: [Sample(1)], key="k")) == (
        "DelayedSampleSet(key='k')"
    )


def test_flatten_samplesets_gives_one_set_per_sample_with_numbered_keys():
    a0, a1, b0 = Sample(0, key="a0"), Sample(1, key="a1"), Sample(2, key="b0")
    meta = {"tags": ["x"]}
    sets = [
        SampleSet([a0, a1], key="a", subject="s1", meta=meta),
        SampleSet([b0], key="b"),
    ]
    flat = flatten_samplesets(sets)
    assert [type(s) for s in flat] == [SampleSet] * 3
    assert [s.key for s in flat] == ["a-0", "a-1", "b-0"]
    assert [[x.key for x in s] for s in flat] == [["a0"], ["a1"], ["b0"]]
    assert flat[1][0] is a1  # the samples themselves are not copied
    assert (flat[0].subject, flat[1].meta) == ("s1", {"tags": ["x"]})
    assert flat[0].meta is not meta  # metadata is deep-copied ...
    flat[0].meta["tags"].append("y")
    assert meta == {"tags": ["x"]}  # ... so the originals are untouched
    assert [s.key for s in sets] == ["a", "b"] and len(sets[0]) == 2


def test_flatten_samplesets_loads_a_delayed_set_once():
    calls = []

    def load():
        calls.append(1)
        return [Sample(0, key="x"), Sample(1, key="y")]

    flat = flatten_samplesets([DelayedSampleSet(load, key="d", subject="s")])
    assert len(calls) == 1
    assert [(s.key, s.subject, s[0].key) for s in flat] == [
        ("d-0", "s", "x"),
        ("d-1", "s", "y"),
    ]


def test_flatten_samplesets_needs_set_keys():
    with pytest.raises(ValueError, match=re.escape("flatten_samplesets got set 1")):
        flatten_samplesets([SampleSet([Sample(0)], key="a"), SampleSet([Sample(1)])])

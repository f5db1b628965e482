"""Samples: data with metadata, eager or lazily loaded."""

from __future__ import annotations

from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableSequence,
    Sequence,
)
from typing import TYPE_CHECKING, Any, overload

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import DTypeLike
    from typing_extensions import Self

SAMPLE_DATA_ATTRS = ("data", "samples")
_DELAYED_REPR = "<delayed>"


def _public_items(obj: object) -> list[tuple[str, Any]]:
    """Public instance attributes of ``obj`` in insertion order."""
    return [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]


def _values_equal(a: Any, b: Any) -> bool:
    """Exact, symmetric comparison used by ``__eq__`` of samples."""
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
        except (TypeError, ValueError):
            return False
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_values_equal(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    try:
        result = a == b
        return bool(result)
    except (TypeError, ValueError):
        return False


class _SampleBase:
    """Metadata handling shared by samples and sample sets.

    Delayed attributes live in ``self._delayed_attributes`` (name -> callable) and
    are evaluated on each access, never stored; setting one makes it eager.
    """

    _delayed_attributes: dict[str, Callable[[], Any]]

    def _init_metadata(
        self,
        parent: _SampleBase | None,
        kwargs: Mapping[str, Any],
        *,
        inherit_delayed: bool,
    ) -> None:
        object.__setattr__(self, "_delayed_attributes", {})
        if parent is not None:
            for name, value in _public_items(parent):
                if name not in SAMPLE_DATA_ATTRS:
                    object.__setattr__(self, name, value)
            if inherit_delayed:
                self._delayed_attributes.update(
                    getattr(parent, "_delayed_attributes", {})
                )
        for name, value in kwargs.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails.
        if not name.startswith("__"):
            delayed = self.__dict__.get("_delayed_attributes")
            if delayed and name in delayed:
                return delayed[name]()
        msg = f"{type(self).__name__!r} object has no attribute {name!r}"
        raise AttributeError(msg)

    def __setattr__(self, name: str, value: Any) -> None:
        delayed = self.__dict__.get("_delayed_attributes")
        if delayed and name in delayed:
            del delayed[name]
        object.__setattr__(self, name, value)

    def _attribute_names(self) -> list[str]:
        names = [k for k, _ in _public_items(self) if k not in SAMPLE_DATA_ATTRS]
        names += [k for k in self._delayed_attributes if k not in names]
        return names

    def _repr_items(self) -> list[tuple[str, str]]:
        items = [(k, repr(v)) for k, v in _public_items(self) if k != "data"]
        items += [(k, _DELAYED_REPR) for k in self._delayed_attributes]
        return items

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in self._repr_items())
        return f"{type(self).__name__}({body})"

    def __eq__(self, other: object) -> bool:
        # The same class, attribute names and values, and the same content.
        if type(self) is not type(other):
            return NotImplemented
        names = self._attribute_names()
        if sorted(names) != sorted(other._attribute_names()):
            return False
        if not self._content_equal(other):
            return False
        return all(_values_equal(getattr(self, n), getattr(other, n)) for n in names)

    def _content_equal(self, other: Self) -> bool:
        """Whether the data (of samples) or the samples (of sets) are equal."""
        raise NotImplementedError

    def __hash__(self) -> int:
        # Equal samples have equal keys, so hashing the key is consistent with
        # ``__eq__``. Samples without a key all share one bucket.
        key = getattr(self, "key", None)
        try:
            return hash((type(self).__name__, key))
        except TypeError:
            return hash(type(self).__name__)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)


class Sample(_SampleBase):
    """Data plus arbitrary metadata.

    Parameters
    ----------
    data : object
        The sample's data, usually a NumPy array.
    parent : Sample, default=None
        A sample whose public attributes (all but ``data`` and ``samples``) are
        copied first. Delayed attributes of the parent stay delayed.
    **kwargs
        Metadata set as attributes, overriding the parent's.

    Notes
    -----
    Equality is exact: the same class, the same attribute names and equal values
    (``np.array_equal`` for arrays, so shapes must match). Samples hash by their
    ``key`` attribute; do not change the key of a sample stored in a set.

    Examples
    --------
    >>> import numpy as np
    >>> from samplepipe import Sample
    >>> s = Sample(np.array([1, 3]), gender="Male")
    >>> s
    Sample(data=array([1, 3]), gender='Male')
    >>> Sample(np.array([2, 4]), parent=s, key="a")
    Sample(data=array([2, 4]), gender='Male', key='a')
    """

    def __init__(self, data: Any, parent: Sample | None = None, **kwargs: Any) -> None:
        object.__setattr__(self, "data", data)
        self._init_metadata(parent, kwargs, inherit_delayed=True)

    def _repr_items(self) -> list[tuple[str, str]]:
        return [("data", repr(self.data)), *super()._repr_items()]

    def _content_equal(self, other: Self) -> bool:
        return _values_equal(self.data, other.data)


class DelayedSample(Sample):
    """A sample whose data (and optionally some metadata) is loaded on access.

    Parameters
    ----------
    load : callable
        Called with no arguments to produce ``data``, on every access: nothing is
        kept in memory, so large data sets can be described by many delayed
        samples.
    parent : Sample, default=None
        A sample whose public attributes are copied (see `Sample`).
    delayed_attributes : dict of str to callable, default=None
        Attributes computed on access by calling the callable. Merged with the
        parent's delayed attributes.
    **kwargs
        Eager metadata. A name given here and in ``delayed_attributes`` raises
        ``ValueError``; a name that the parent has as a delayed attribute replaces
        it with the eager value.

    Examples
    --------
    >>> import numpy as np
    >>> from samplepipe import DelayedSample
    >>> s = DelayedSample(lambda: np.ones(2), key="a",
    ...                   delayed_attributes={"label": lambda: 7})
    >>> s
    DelayedSample(key='a', label=<delayed>)
    >>> s.data, s.label
    (array([1., 1.]), 7)
    """

    def __init__(
        self,
        load: Callable[[], Any],
        parent: Sample | None = None,
        delayed_attributes: Mapping[str, Callable[[], Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        delayed_attributes = dict(delayed_attributes or {})
        both = sorted(set(delayed_attributes) & set(kwargs))
        if both:
            msg = (
                f"DelayedSample got {both} both in 'delayed_attributes' and as "
                "keyword arguments; give each attribute only once."
            )
            raise ValueError(msg)
        object.__setattr__(self, "_load", load)
        self._init_metadata(parent, {}, inherit_delayed=True)
        self._delayed_attributes.update(delayed_attributes)
        for name, value in kwargs.items():
            setattr(self, name, value)

    @property
    def data(self) -> Any:
        """The data, loaded by calling ``load()`` on each access."""
        return self._load()

    def _repr_items(self) -> list[tuple[str, str]]:
        return _SampleBase._repr_items(self)

    @classmethod
    def _child(cls, load: Callable[[], Any], parent: Sample) -> DelayedSample:
        """``DelayedSample(load, parent=parent)``, built in one step.

        The same attributes, in the same order, as the constructor gives; about
        six times faster (the flows build one per output sample).
        """
        new = cls.__new__(cls)
        state = new.__dict__
        source = parent.__dict__
        state["_delayed_attributes"] = dict(source.get("_delayed_attributes") or ())
        for name, value in source.items():
            if name[0] != "_" and name not in SAMPLE_DATA_ATTRS:
                state[name] = value
        state["_load"] = load
        return new

    @classmethod
    def from_sample(cls, sample: Sample, **kwargs: Any) -> Self:
        """A delayed sample with ``sample``'s loader (or data) and metadata.

        Nothing is loaded: a delayed ``sample`` lends its loader.
        """
        load = getattr(sample, "_load", None)
        if load is None:
            data = sample.data

            def load() -> Any:
                return data

        return cls(load, parent=sample, **kwargs)


class SampleSet(_SampleBase, MutableSequence[Sample]):
    """A list of samples with metadata of its own.

    Parameters
    ----------
    samples : sequence of Sample
        The samples, usually a list (changing the set changes it in place).
    parent : Sample or SampleSet, default=None
        Its public, non-delayed attributes are copied.
    **kwargs
        Metadata.

    Examples
    --------
    >>> from samplepipe import Sample, SampleSet
    >>> s = SampleSet([Sample(1), Sample(2)], key="subject-1")
    >>> len(s), s[1].data, s.key
    (2, 2, 'subject-1')
    >>> SampleSet([Sample(1)], key="k")
    SampleSet(samples=[Sample(data=1)], key='k')
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        parent: Sample | SampleSet | None = None,
        **kwargs: Any,
    ) -> None:
        object.__setattr__(self, "samples", samples)
        self._init_metadata(parent, kwargs, inherit_delayed=False)

    def _repr_items(self) -> list[tuple[str, str]]:
        # ``samples`` is an ordinary attribute here, listed first as it was set
        # first; the base class already lists it (bob.pipelines' form).
        return super()._repr_items()

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, item: int) -> Sample: ...
    @overload
    def __getitem__(self, item: slice) -> MutableSequence[Sample]: ...
    def __getitem__(self, item: int | slice) -> Sample | MutableSequence[Sample]:
        return self.samples[item]

    @overload
    def __setitem__(self, item: int, value: Sample) -> None: ...
    @overload
    def __setitem__(self, item: slice, value: Iterable[Sample]) -> None: ...
    def __setitem__(self, item: int | slice, value: Sample | Iterable[Sample]) -> None:
        self.samples[item] = value

    def __delitem__(self, item: int | slice) -> None:
        del self.samples[item]

    def insert(self, index: int, value: Sample) -> None:
        # the samples attribute may be a property without insert on subclasses
        samples = self.samples
        samples.insert(index, value)

    def _content_equal(self, other: Self) -> bool:
        mine, theirs = list(self.samples), list(other.samples)
        return len(mine) == len(theirs) and all(a == b for a, b in zip(mine, theirs))


class DelayedSampleSet(SampleSet):
    """A sample set whose samples come from ``load()`` on every access."""

    def __init__(
        self,
        load: Callable[[], Sequence[Sample]],
        parent: Sample | SampleSet | None = None,
        **kwargs: Any,
    ) -> None:
        object.__setattr__(self, "_load", load)
        self._init_metadata(parent, kwargs, inherit_delayed=False)

    @property
    def samples(self) -> Sequence[Sample]:
        """The samples, from ``load()``."""
        return self._load()

    def _repr_items(self) -> list[tuple[str, str]]:
        return _SampleBase._repr_items(self)


class DelayedSampleSetCached(DelayedSampleSet):
    """A `DelayedSampleSet` that calls ``load()`` once and keeps the samples."""

    _cached: Sequence[Sample] | None = None  # set on the instance by `samples`

    @property
    def samples(self) -> Sequence[Sample]:
        """The samples, loaded on first access and kept."""
        cached = self._cached
        if cached is None:
            cached = self._load()
            object.__setattr__(self, "_cached", cached)
        return cached


def stack_values(values: Iterable[Any], n: int | None = None) -> np.ndarray | list[Any]:
    """Stack equally shaped numeric values into one preallocated array.

    Strings, ``None`` and values of different shapes give a list of the values
    instead. ``n``, when given, is at least the number of values: they are then
    taken one at a time, each copied into the array and let go before the next
    is taken, so stacking lazily loaded samples holds one copy of the batch,
    not two. The array has exactly as many rows as values.
    """
    if n is None:
        values = list(values)
        n = len(values)
    it = iter(values)
    first = next(it, _NOTHING)
    if first is _NOTHING:
        return np.empty((0,))
    if isinstance(first, str | bytes) or first is None:
        return [first, *it]
    first_array = np.asarray(first)
    if first_array.dtype.kind not in "biufcmM":
        return [first, *it]
    out = np.empty((n, *first_array.shape), dtype=first_array.dtype)
    out[0] = first_array
    # values that are not arrays of out's dtype, kept as given for the list
    # returned if a later value does not stack
    given: dict[int, Any] = {}
    if not _is_row_of(first, out):
        given[0] = first
    del first, first_array
    i = 0
    for i, value in enumerate(it, start=1):
        if isinstance(value, str | bytes):
            return _unstacked(out, given, i, value, it)
        shape = getattr(value, "shape", None)
        if shape is None:
            try:
                shape = np.shape(value)
            except ValueError:  # ragged nested sequences
                return _unstacked(out, given, i, value, it)
        if shape != out.shape[1:]:
            return _unstacked(out, given, i, value, it)
        try:
            out[i] = value
        except (TypeError, ValueError):
            return _unstacked(out, given, i, value, it)
        if not _is_row_of(value, out):
            given[i] = value
    return out[: i + 1] if i + 1 < n else out


_NOTHING = object()


def _is_row_of(value: Any, out: np.ndarray) -> bool:
    """Whether ``out``'s row equals ``value`` exactly, type included."""
    return isinstance(value, np.ndarray) and value.dtype == out.dtype


def _unstacked(
    out: np.ndarray, given: dict[int, Any], i: int, value: Any, rest: Iterator[Any]
) -> list[Any]:
    """The values of `stack_values` as a list: ``i`` stacked, then the rest."""
    return [given.get(k, out[k]) for k in range(i)] + [value, *rest]


class SampleBatch(Sequence[Any]):
    """A read-only view of one attribute over many samples.

    ``np.asarray(batch)`` stacks the values into one preallocated array, loading
    each sample once. Values that cannot be stacked (strings, ragged shapes) give
    an object array; `SampleBatch.stack` returns them as a list.

    Parameters
    ----------
    samples : sequence of Sample
    sample_attribute : str, default="data"

    Examples
    --------
    >>> import numpy as np
    >>> from samplepipe import Sample, SampleBatch
    >>> batch = SampleBatch([Sample(np.zeros(2)), Sample(np.ones(2))])
    >>> np.asarray(batch)
    array([[0., 0.],
           [1., 1.]])
    """

    def __init__(
        self, samples: Sequence[Sample], sample_attribute: str = "data"
    ) -> None:
        self.samples = samples
        self.sample_attribute = sample_attribute

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, item: int) -> Any: ...
    @overload
    def __getitem__(self, item: slice) -> SampleBatch: ...
    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            return SampleBatch(self.samples[item], self.sample_attribute)
        return getattr(self.samples[item], self.sample_attribute)

    def stack(self) -> np.ndarray | list[Any]:
        """Values as one array when they stack, else as a list."""
        return stack_values(getattr(s, self.sample_attribute) for s in self.samples)

    def __array__(
        self, dtype: DTypeLike | None = None, copy: bool | None = None
    ) -> np.ndarray:
        stacked = self.stack()
        if isinstance(stacked, list):
            out = np.empty(len(stacked), dtype=object)
            out[:] = stacked
            stacked = out
        return stacked if dtype is None else stacked.astype(dtype)

    def __repr__(self) -> str:
        return (
            f"SampleBatch(n_samples={len(self)}, "
            f"sample_attribute={self.sample_attribute!r})"
        )


def iter_samples(samples: Iterable[Sample | SampleSet]) -> Iterator[Sample]:
    """Yield every `Sample` in a list of samples and sample sets, in order."""
    for s in samples:
        if isinstance(s, SampleSet):
            yield from s.samples
        else:
            yield s


def is_sample_list(obj: object) -> bool:
    """Whether ``obj`` is a non-array sequence of samples or sample sets."""
    if isinstance(obj, np.ndarray | str | bytes) or not isinstance(obj, Sequence):
        return False
    return len(obj) > 0 and isinstance(obj[0], Sample | SampleSet)


def lazy_output(sample: Any, attribute: str, loader: Callable[[], Any]) -> Any:
    """A copy of ``sample`` whose ``attribute`` loads lazily through ``loader``."""
    if attribute == "data":
        if type(sample) in (Sample, DelayedSample):
            return DelayedSample._child(loader, sample)
        return DelayedSample(loader, parent=sample)
    if isinstance(sample, DelayedSample):
        new = DelayedSample(sample._load, parent=sample)
    else:
        new = DelayedSample.from_sample(sample)
    if attribute in vars(new):
        object.__delattr__(new, attribute)
    new._delayed_attributes[attribute] = loader
    return new


def failed_output(sample: Any, attribute: str) -> Any:
    """A copy of ``sample`` with ``attribute`` None: a failed sample kept in line."""
    if attribute == "data":
        return Sample(None, parent=sample)
    if isinstance(sample, DelayedSample):
        return DelayedSample(sample._load, parent=sample, **{attribute: None})
    return Sample(getattr(sample, "data", None), parent=sample, **{attribute: None})

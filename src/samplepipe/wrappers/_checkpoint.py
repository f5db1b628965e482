"""CheckpointWrapper: checkpoints of transformed samples and of fitted models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.utils.metaestimators import available_if

from ..errors import CheckpointWarning as CheckpointWarning
from ..storage.checkpoints import CheckpointLoader
from ..storage.files import MAX_EXTENSION
from ..storage.formats import Format, resolve_format
from ..storage.fs import (
    LOCAL,
    FileSystem,
    check_location,
    filesystem,
    location_root,
)
from ..storage.hdf5 import load_hdf5, save_hdf5
from ..storage.identity import (
    FORMAT_VERSION,
    Identity,
    code_identity,
    combine,
    estimator_identity,
    fitted_digest,
    functions_hashed_once,
    ingredients,
    value_digest,
    value_digests,
)
from ..storage.keys import check_key, hash_string, keys_digest, sample_keys
from ..storage.layouts import Layout, LayoutContext, gc_paused, get_layout
from ..storage.layouts.base import format_funcs
from ..storage.models import (
    load_model,
    read_model_header,
    save_model,
    update_estimator,
)
from ..storage.shards import DEFAULT_SHARD_BYTES
from . import _explain
from ._base import estimator_options, estimator_requires_fit, inner_estimators
from ._base import resolve_option as _resolve_option
from ._sample import DelayedSample, Sample, SampleSet, is_sample_list
from ._sample_wrapper import (
    BaseWrapper,
    SampleWrapper,
    _estimator_has,
    _flatten,
    _unflatten,
)

if TYPE_CHECKING:
    from typing_extensions import Self

DATA_VERSION_ATTRIBUTE = "data_version"
_update_estimator = update_estimator  # the name _dask.py imports

__all__ = [
    "CheckpointLoader",
    "CheckpointWarning",
    "CheckpointWrapper",
    "check_key",
    "hash_string",
    "load_hdf5",
    "save_hdf5",
]


# ---------------------------------------------------------------------------
# input identity
# ---------------------------------------------------------------------------
def _loader_of(sample: Any, attribute: str) -> Callable[[], Any] | None:
    if attribute == "data" and isinstance(sample, DelayedSample):
        if "data" not in vars(sample):
            return sample._load
    delayed = getattr(sample, "_delayed_attributes", None) or {}
    return delayed.get(attribute)


def attribute_identity(sample: Any, attribute: str) -> str:
    """Digest of one attribute of a sample, without loading lazy values.

    * loaded from a samplepipe checkpoint: that checkpoint's identity;
    * loaded by another loader: the loader's code and arguments (e.g. the path
      of a ``functools.partial``) plus the sample's ``data_version`` attribute,
      if any: set it to change the identity when the file behind a loader
      changes;
    * in memory: a digest of its content.
    """
    state = sample.__dict__
    if attribute == "data" and "data" not in state:
        loader = state.get("_load")
        if type(loader) is CheckpointLoader:  # the common case, kept fast
            cached = loader.__dict__.get("_lineage")
            return "c" + (cached if cached is not None else loader.lineage())
    loader = _loader_of(sample, attribute)
    if isinstance(loader, CheckpointLoader):
        return "c" + loader.lineage()
    if loader is not None:
        version = vars(sample).get(DATA_VERSION_ATTRIBUTE)
        return "l" + combine(code_identity(loader), value_digest(version))
    try:
        value = getattr(sample, attribute)
    except AttributeError:
        return "-"
    if value is None:
        return "none"
    return "v" + value_digest(value)


def input_identity(sample: Any, attributes: Sequence[str]) -> str:
    """Digest of the attributes a step reads from one sample."""
    if len(attributes) == 1:
        return attribute_identity(sample, attributes[0])
    return combine(*(attribute_identity(sample, a) for a in attributes))


def _is_failed(sample: Any, attribute: str) -> bool:
    """An eager sample whose input is None (failed upstream): passed through."""
    if _loader_of(sample, attribute) is not None:
        return False
    return vars(sample).get(attribute, 0) is None


def training_digest(samples: Sequence[Any], attributes: Sequence[str]) -> str:
    """Digest of training samples: keys, input identities and fit metadata."""
    parts = []
    for s in samples:
        key = getattr(s, "key", None)
        parts.append(f"{key!r}={input_identity(s, attributes)}")
    return keys_digest(parts)


def _array_digest(X: Any, y: Any) -> str | None:
    """Digest of plain training arrays, None for lazy (Dask) collections."""
    if hasattr(X, "__dask_graph__") or hasattr(y, "__dask_graph__"):
        return None
    try:
        parts = [value_digest(np.asarray(X))]
        if y is not None:
            parts.append(value_digest(np.asarray(y)))
    except (TypeError, ValueError):
        return None
    return "arrays:" + combine(*parts)


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


# ---------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------
class CheckpointWrapper(BaseWrapper):
    """Save transformed samples and the fitted estimator; load instead of redoing.

    Parameters
    ----------
    estimator : estimator object
        A sample-aware estimator, usually a `SampleWrapper`.
    features_dir : str or os.PathLike, default=None
        Where each transformed sample is saved as ``<features_dir>/[<hash_fn(key)>/]
        <key><extension>``. ``None`` turns feature checkpoints off.
    model_path : str or os.PathLike, default=None
        The file of the fitted estimator. ``None`` turns model checkpoints off.
    extension : str, default=None
        File extension of feature checkpoints (default: the format's,
        ``".h5"`` for HDF5 and the custom format, ``".npy"`` for npy).
    save_func, load_func : callable, default=None
        ``save_func(data, path)`` and ``load_func(path)`` for data the default
        HDF5 format cannot hold (the ``"custom"`` format). Validity is then
        recorded in a ``<file>.meta.json`` beside each file, with the file's
        SHA-256.
    sample_attribute : str, default=None
        Which attribute is checkpointed (default: the inner estimator's
        ``output_attribute``, else ``"data"``).
    hash_fn : callable, default=None
        ``hash_fn(key) -> str`` names a sub-folder per key, e.g.
        `samplepipe.hash_string` to spread a million files over 1,000 folders.
        It may return several levels (``"ab/cd"``).
    attempts : int, default=10
        How often an I/O error (`OSError`) while saving is tried. Programming
        errors, a full disk and missing permissions are raised at once.
    force : bool, default=False
        Recompute and overwrite every checkpoint, and refit the model.
    storage_options : dict, default=None
        Options of the fsspec filesystem when ``features_dir`` or
        ``model_path`` is a URL, e.g. ``{"endpoint_url": "http://..."}`` for
        an S3-compatible store; unused for local paths. Credentials are best
        left to the backend's usual environment variables: these options are
        kept in the wrapper's parameters (shown by ``repr``) and travel with
        the lazy samples.
    layout : {"files", "shards"}, default="files"
        ``"files"``: one file per sample, ``<features_dir>/<key>.h5``.
        ``"shards"``: one HDF5 file per batch of computed samples (up to
        ``shard_bytes`` of payload, and ``shard_size`` samples if given),
        holding each sample's record and payload as the file layout does; see
        `samplepipe.storage.shards`. Fewer, larger files: far faster to write
        and read, one request per batch on object stores. ``save_func``,
        ``load_func`` and ``hash_fn`` do not apply.
    shard_size : int, default=None
        With ``layout="shards"``: at most this many samples per shard, and per
        call of the wrapped estimator's ``transform``. None: no limit, the
        shard's bytes decide (``shard_bytes``). Up to 0.5.0 the default was
        1000; an explicit value keeps its meaning.
    shard_bytes : int or str, default=64 * 2**20
        With ``layout="shards"``: a shard closes when its payload would pass
        this many bytes (64 MiB; a str such as ``"256M"`` or ``"1G"`` works
        too). It always holds at least one sample. The wrapped estimator's
        ``transform`` is called on slices sized to fill one shard, estimated
        from the outputs so far (the first of 100 samples, each next one at
        most 4x the samples computed before); a crash loses at most the shard
        being built.
    format : str or Format, default=None
        The file format of feature checkpoints: a name registered with
        `samplepipe.storage.register_format` (``"hdf5"``, ``"custom"``,
        ``"npy"``, ...) or a `samplepipe.storage.Format` instance. None means
        ``"hdf5"``, or ``"custom"`` when ``save_func`` and ``load_func`` are
        given. ``"npy"`` writes NumPy's ``.npy`` files (arrays of non-object
        dtype), with the record in a sidecar. The format is part of the
        step's identity: changing it recomputes. ``layout="shards"`` stores
        HDF5 only.

    Notes
    -----
    A checkpoint is reused only when it holds this sample's identity (see the
    README, "When is a checkpoint reused?"): the step's code, parameters,
    checkpointed attribute, file format and fitted state, and the sample's key
    and input (the identity of the checkpoint it was loaded from, or the
    content of its in-memory data, and the metadata the step reads). The file
    also holds a checksum of its payload, verified when the file is first
    validated. A stale, corrupt or foreign checkpoint is recomputed with one
    `CheckpointWarning`; a readable file samplepipe did not write is never
    overwritten (`samplepipe.storage.UnknownFileError`).

    A sample whose input is ``None`` (it failed in an earlier step) is passed
    through, in line, with its checkpointed attribute ``None``: no estimator
    call and no file.

    ``features_dir`` and ``model_path`` may be fsspec URLs (``s3://``,
    ``gs://``, ``memory://``, ``file://``, ...). Every write is atomic: a
    temporary name and a rename on filesystems that rename (local paths,
    ``file://``), a single PUT of the whole object on object stores. On a
    store, a checkpoint is validated by reading the object once (its record
    and checksum are inside the HDF5 bytes), and a lazy sample reads and
    verifies its object when loaded.

    The model file is a small JSON header (identity of the step, digest of the
    fitted state, digest of the training samples, library versions, size and
    SHA-256 of the payload) followed by a cloudpickle payload. ``fit`` loads it
    instead of fitting when the header matches this step and these training
    samples and the payload is intact. **Loading a pickle runs code: only use
    a model_path you trust.**
    """

    def __init__(
        self,
        estimator: Any,
        features_dir: str | os.PathLike[str] | None = None,
        model_path: str | os.PathLike[str] | None = None,
        extension: str | None = None,
        save_func: Callable[[Any, str], Any] | None = None,
        load_func: Callable[[str], Any] | None = None,
        sample_attribute: str | None = None,
        hash_fn: Callable[[str], str] | None = None,
        attempts: int = 10,
        force: bool = False,
        *,
        storage_options: dict[str, Any] | None = None,
        layout: str = "files",
        shard_size: int | None = None,
        shard_bytes: int | str = DEFAULT_SHARD_BYTES,
        format: str | Format | None = None,  # noqa: A002 - the option's name
    ) -> None:
        self.estimator = estimator
        self.features_dir = features_dir
        self.model_path = model_path
        self.extension = extension
        self.save_func = save_func
        self.load_func = load_func
        self.sample_attribute = sample_attribute
        self.hash_fn = hash_fn
        self.attempts = attempts
        self.force = force
        self.storage_options = storage_options
        self.layout = layout
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.format = format

    # -- configuration -----------------------------------------------------
    def _validate_params(self) -> None:
        for name in ("features_dir", "model_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | os.PathLike):
                msg = (
                    f"CheckpointWrapper got {name}={value!r}; it must be a path "
                    "(str or os.PathLike) or None."
                )
                raise TypeError(msg)
            if value is not None:
                check_location(value, name)
        options = self.storage_options
        if options is not None and not (
            isinstance(options, Mapping) and all(isinstance(k, str) for k in options)
        ):
            msg = (
                f"CheckpointWrapper got storage_options={options!r}; it must be a "
                "dict of fsspec options with str keys, or None."
            )
            raise TypeError(msg)
        if not isinstance(self.attempts, int) or self.attempts < 1:
            msg = (
                f"CheckpointWrapper got attempts={self.attempts!r}; it must be an "
                "int >= 1."
            )
            raise ValueError(msg)
        if self.hash_fn is not None and not callable(self.hash_fn):
            msg = (
                f"CheckpointWrapper got hash_fn={self.hash_fn!r}; it must be callable."
            )
            raise TypeError(msg)
        layout = self._layout()
        parameters = self._layout_parameters()
        layout.check_parameters(parameters)
        layout.check_format(self._format(), parameters)  # a bad format raises
        extension = self._extension()
        if (
            not isinstance(extension, str)
            or "/" in extension
            or len(extension.encode("utf-8")) > MAX_EXTENSION
        ):
            msg = (
                f"CheckpointWrapper got extension={extension!r}; it must be a str "
                f"such as '.h5' without '/', at most {MAX_EXTENSION} bytes."
            )
            raise ValueError(msg)

    def _sample_attribute(self) -> str:
        if self.sample_attribute is not None:
            return self.sample_attribute
        declared = estimator_options(self.estimator)
        inner = getattr(self.estimator, "output_attribute", None)
        return inner or declared.get("output_attribute") or "data"

    def _sample_wrapper_option(self, name: str) -> Any:
        for est in inner_estimators(self.estimator):
            option = getattr(est, "_option", None)
            if callable(option) and hasattr(est, name):
                return option(name)
        return estimator_options(self.estimator).get(name) or _DEFAULTS[name]

    def _read_attributes(self, fit: bool = False) -> list[str]:
        """The sample attributes this step reads: its input and extra arguments."""
        extra = "fit_extra_arguments" if fit else "transform_extra_arguments"
        attributes = [self._sample_wrapper_option("input_attribute")]
        attributes += [a for _, a in self._sample_wrapper_option(extra)]
        return attributes

    def _funcs(self) -> tuple[Any, Any]:
        """``(save, load)`` of a sidecar format; (None, None) for HDF5."""
        return format_funcs(self._format())

    def _format(self) -> Format:
        """The `Format` of feature checkpoints (see the ``format`` parameter)."""
        return resolve_format(
            self.format,
            _resolve_option(self, "save_func"),
            _resolve_option(self, "load_func"),
        )

    def _layout(self) -> Layout:
        """The `Layout` of feature checkpoints (see the ``layout`` parameter)."""
        return get_layout(self.layout, "CheckpointWrapper")

    def _layout_parameters(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "features_dir": self.features_dir,
            "format": self.format,
            "save_func": _resolve_option(self, "save_func"),
            "load_func": _resolve_option(self, "load_func"),
            "hash_fn": self.hash_fn,
            "shard_size": self.shard_size,
            "shard_bytes": self.shard_bytes,
        }

    def _context(self, located: bool = True) -> LayoutContext:
        """What the layout works on (`LayoutContext`); ``located=False``
        allows ``features_dir=None`` (for `checkpoint_names`)."""
        if located or self.features_dir is not None:
            root = self._features_root()
            fs = filesystem(root, self.storage_options)
        else:
            root, fs = "", LOCAL
        return LayoutContext(
            root=root,
            fs=fs,
            storage_options=self.storage_options,
            format=self._format(),
            extension=self._extension(),
            name=f"CheckpointWrapper({self._name()})",
            hash_fn=self.hash_fn,
            attempts=self.attempts,
            force=self.force,
            shard_size=self.shard_size,
            shard_bytes=self.shard_bytes,
            step=self._judging_step,
            describe=self._describe,
            parameters=self._layout_parameters(),
        )

    def _judging_step(self) -> str | None:
        """The identity that judges files; None while the fitted state is unknown."""
        return self.step_identity() if self._has_model_state() else None

    def _extension(self) -> str:
        """The file extension: given, declared by the estimator, or the format's."""
        extension = self.extension
        if extension is None:
            extension = estimator_options(self.estimator).get("extension")
        return self._format().extension if extension is None else extension

    def _checkpoints_features(self) -> bool:
        return self.features_dir is not None and bool(
            _resolve_option(self, "checkpoint_features")
        )

    def checkpoint_path(self, key: str) -> str:
        """The checkpoint file of ``key`` (the key is checked first).

        A local path, or a URL when ``features_dir`` is one (a ``file://``
        URL gives the local path).
        """
        return self.checkpoint_paths([key])[0]

    def checkpoint_paths(self, keys: Iterable[str]) -> list[str]:
        """`checkpoint_path` of each key; the options are resolved once."""
        return self._layout().paths(self._context(), keys)

    def checkpoint_names(self, keys: Iterable[str]) -> list[str]:
        """Each key's checkpoint path inside ``features_dir``, ``/``-separated.

        ``<key><extension>``, under the bucket that ``hash_fn`` gives the key
        if it is set (the layout decides; see `samplepipe.storage.Layout.
        names`). Each key (and bucket) is checked first (see `check_key`).
        """
        return self._layout().names(self._context(located=False), keys)

    def _features_root(self) -> str:
        """``features_dir`` as a local path or a URL (see `location_root`)."""
        if self.features_dir is None:
            msg = (
                "CheckpointWrapper has features_dir=None: feature checkpoints are "
                "off, so they have no location; set features_dir."
            )
            raise ValueError(msg)
        return location_root(self.features_dir)

    def _features_fs(self) -> FileSystem:
        """The filesystem of ``features_dir``."""
        return filesystem(self._features_root(), self.storage_options)

    # -- identity ----------------------------------------------------------
    def _format_identity(self) -> str:
        """The format's identity and the extension (part of `step_identity`)."""
        return f"{self._format().identity()}:{self._extension()}"

    def _fitted_digest(self) -> str | None:
        """Digest of the fitted state; None for a step that needs no fitting.

        Raises ``NotFittedError``-like `ValueError` when a step that needs fitting
        has no fitted state (in memory or in ``model_path``).
        """
        if not estimator_requires_fit(self.estimator):
            return None
        digest = getattr(self, "fitted_digest_", None)
        if digest is not None:
            return digest
        if self.__sklearn_is_fitted__():
            return fitted_digest(self.estimator)
        header = self._model_header_if_matching()
        if header is not None:
            return header["state"]
        return "unfitted"

    def _model_header_if_matching(self) -> dict[str, Any] | None:
        if self.model_path is None:
            return None
        header = read_model_header(self.model_path, self.storage_options)
        if header is None or header.get("identity") != estimator_identity(
            self.estimator
        ):
            return None
        return header

    def step_identity(self) -> str:
        """Digest of what produces this step's checkpoints from an input.

        It covers the wrapped estimator's code and parameters (recursively, see
        `samplepipe.storage.identity`), the checkpointed attribute, the file
        format and, for a step that needs fitting, the digest of its fitted
        state (never of pickle bytes).
        """
        return combine(
            str(FORMAT_VERSION),
            estimator_identity(self.estimator),
            self._sample_attribute(),
            self._format_identity(),
            str(self._fitted_digest()),
        )

    def describe_step(self) -> dict[str, Any]:
        """What `step_identity` is made of, by name (see `explain`).

        A dict with ``step`` (the identity), ``code`` (``{qualified name:
        digest}`` of every user function and method reached), ``library``
        (``{distribution: version}``), ``parameter`` (``{path: [digest,
        printable value or None]}``), ``fitted``, ``format`` and ``attribute``.
        """
        return {
            "samplepipe": _explain.DESCRIPTION_VERSION,
            "step": self.step_identity(),
            **ingredients(self.estimator),
            "fitted": str(self._fitted_digest()),
            "format": self._format_identity(),
            "attribute": self._sample_attribute(),
        }

    def _describe(self, step: str) -> None:
        """Keep the description of step identity ``step`` (see `explain`)."""
        _explain.write_description(step, self.describe_step)

    def explain(self, samples: Sequence[Any]) -> list[_explain.Explanation]:
        """For each sample: would `transform` reuse its checkpoint, and if not, why.

        Nothing is computed, written or unpickled; each checkpoint's record
        is read (from the journal, where a process validated it) and compared
        with the identity the sample has now. A recomputed sample names the
        ingredient that differs: the code of a function or method (by
        qualified name), a parameter (its path, old and new value), its input
        (its content, an earlier checkpoint, its loader or ``data_version``),
        the fitted state, the format, or a library version; or the file's
        state (missing, damaged).

        Parameters
        ----------
        samples : list of Sample
            The samples ``transform`` would be given.

        Returns
        -------
        explanations : list of Explanation
            One per sample, in order: ``key``, ``action`` (``"reuse"`` or
            ``"recompute"``), ``reason`` (one of ``samplepipe.REASONS``) and
            ``detail`` (a sentence).

        Examples
        --------
        >>> import tempfile
        >>> import numpy as np
        >>> from sklearn.preprocessing import FunctionTransformer
        >>> from samplepipe import Sample, wrap
        >>> folder = tempfile.mkdtemp()
        >>> samples = [Sample(np.ones(2) * i, key=f"s{i}") for i in range(3)]
        >>> step = wrap(["sample", "checkpoint"], FunctionTransformer(np.sqrt),
        ...             features_dir=folder)
        >>> _ = step.transform(samples[:2])
        >>> [(e.action, e.reason) for e in step.explain(samples)]
        [('reuse', 'same'), ('reuse', 'same'), ('recompute', 'missing')]
        >>> step.set_params(estimator__estimator__kw_args={"out": None})
        CheckpointWrapper(...)
        >>> step.explain(samples)[0].detail
        "parameter estimator__kw_args changed from None to {'out': None}"
        """
        self._validate_params()
        wanted = self.identities(samples)
        new = self.describe_step()
        differences: dict[str, tuple[str, str]] = {}

        def difference(step: str) -> tuple[str, str]:
            """What differs from the step that wrote a checkpoint (once per step)."""
            if step not in differences:
                old = _explain.read_description(step)
                differences[step] = _explain.step_difference(old, new)
            return differences[step]

        return [
            _explain.explain_one(i.key, state, record, i, difference)
            for i, (state, record, _) in zip(
                wanted, self._judge_all(wanted, loaders=False)
            )
        ]

    def _judge_all(
        self,
        wanted: Sequence[Identity],
        loaders: bool = True,
        paths: Sequence[str] | None = None,
    ) -> list[tuple[str, str | None, Callable[[], Any] | None]]:
        """``(status, record, loader)`` of each checkpoint, read-only (see
        `samplepipe.storage.Layout.judge_all`), for `explain` and `verify`."""
        return self._layout().judge_all(self._context(), wanted, loaders, paths)

    def planned_outputs(self, samples: Sequence[Any]) -> list[Any]:
        """The samples `transform` would return, without computing or reading.

        Each one's checkpointed attribute names the checkpoint its identity
        gives (to be loaded only once ``transform`` has run), so the next step
        of a pipeline can be explained (`explain`) before anything runs.
        """
        wanted = self.identities(samples)
        attribute = self._sample_attribute()
        loaders = self._layout().planned(self._context(), wanted)
        return [lazy_output(s, attribute, lo) for s, lo in zip(samples, loaders)]

    def verify(
        self,
        samples: Sequence[Any],
        fraction: float = 0.01,
        seed: int | None = None,
        rtol: float = 0.0,
        atol: float = 0.0,
    ) -> _explain.VerifyReport:
        """Recompute a random fraction of the reused samples and compare.

        Checks that a reused checkpoint is what a fresh run would give: a
        step that is not deterministic, or that depends on something its
        identity cannot see (a file it reads, an environment variable), shows
        up as mismatches. Nothing is written; the step must be fitted (or
        its model loadable, as for ``transform``).

        Parameters
        ----------
        samples : list of Sample
            The samples ``transform`` would be given.
        fraction : float, default=0.01
            The share of reused samples to recompute, in (0, 1]; at least one
            when any is reused.
        seed : int, default=None
            Seed of the random choice (None: a new choice each call).
        rtol, atol : float, default=0.0
            Tolerances for float arrays; 0 and 0 ask for exact equality.

        Returns
        -------
        report : VerifyReport
            ``reused``, ``checked`` and ``mismatches`` (the keys).
        """
        self._validate_params()
        wanted = self.identities(samples)
        judged = self._judge_all(wanted)
        reused = [i for i, (state, _, _) in enumerate(judged) if state == "valid"]
        chosen = [reused[j] for j in _explain.choose(len(reused), fraction, seed)]
        report = _explain.VerifyReport(reused=len(reused), checked=len(chosen))
        if not chosen:
            return report
        fresh = self._compute(samples, chosen, self._sample_attribute())
        for i in chosen:
            loader = judged[i][2]
            assert loader is not None
            if not _explain.same_value(loader(), fresh[i], rtol, atol):
                report.mismatches.append(wanted[i].key)
        return report

    def identities(self, samples: Sequence[Any]) -> list[Identity]:
        """The identity each sample's checkpoint must hold (keys are checked)."""
        keys = sample_keys(samples)
        step = self.step_identity()
        return [
            Identity(step, inputs, k)
            for inputs, k in zip(self.input_identities(samples), keys)
        ]

    def input_identities(self, samples: Sequence[Any]) -> list[str]:
        """Each sample's input identity (see `attribute_identity`); keys unchecked.

        A batch's lazy samples share their loader's function and their
        ``data_version``: each is hashed once (`functions_hashed_once`).
        """
        attributes = self._read_attributes()
        with functions_hashed_once():
            if attributes != ["data"]:
                return [input_identity(s, attributes) for s in samples]
            # In-memory data of plain samples, hashed as a batch (`value_digests`):
            # the same digest as `attribute_identity`, each sample its own.
            identities: list[str] = []
            arrays: list[Any] = []
            where: list[int] = []
            for i, s in enumerate(samples):
                state = s.__dict__ if type(s) is Sample else {}
                value = state.get("data")
                if value is None or "data" in state.get("_delayed_attributes", ()):
                    identities.append(attribute_identity(s, "data"))
                else:
                    identities.append("")  # filled below
                    arrays.append(value)
                    where.append(i)
        for i, digest in zip(where, value_digests(arrays)):
            identities[i] = "v" + digest
        return identities

    # -- model -------------------------------------------------------------
    def _model_header(self) -> dict[str, Any]:
        import cloudpickle
        import sklearn

        return {
            "format": FORMAT_VERSION,
            "class": type(self.estimator).__qualname__,
            "identity": estimator_identity(self.estimator),
            "sklearn": sklearn.__version__,
            "cloudpickle": cloudpickle.__version__,
        }

    def load_model(self, data: str | None = None, upstream: str | None = None) -> bool:
        """Load ``model_path`` into the wrapped estimator if it fits this step.

        Returns True when the model was loaded: the file is intact, was written
        by a step of the same code and parameters and, when given, was fitted
        on training samples of digest ``data`` after upstream steps of digest
        ``upstream``. The wrapped estimator objects are kept (references to
        them stay valid) and so are this step's parameters. Loading unpickles
        the file: only use a model_path you trust.
        """
        header = self._model_header_if_matching()
        if header is None:
            return False
        if data is not None and header.get("data") != data:
            return False
        if upstream is not None and header.get("upstream") not in (None, upstream):
            return False
        assert self.model_path is not None  # the header was read from it
        loaded = load_model(self.model_path, self.storage_options)
        if loaded is None:
            return False
        header, model = loaded
        update_estimator(self.estimator, model)
        self.fitted_digest_ = header["state"]
        self.model_header_ = header
        return True

    def save_model(self, data: str | None = None, upstream: str | None = None) -> None:
        """Write the wrapped estimator to ``model_path`` atomically.

        ``data`` (the digest of the training samples) and ``upstream`` (of the
        steps before this one) are recorded in the header.
        """
        if self.model_path is None:
            msg = (
                "CheckpointWrapper.save_model needs a model_path; it is None. Set "
                "model_path to checkpoint the fitted estimator."
            )
            raise ValueError(msg)
        header = self._model_header()
        header["state"] = fitted_digest(self.estimator)
        header["data"] = data
        header["upstream"] = upstream
        header = save_model(
            self.estimator, os.fspath(self.model_path), header, self.storage_options
        )
        self.fitted_digest_ = header["state"]
        self.model_header_ = header

    def training_digest(self, X: Any, y: Any = None) -> str | None:
        """Digest of what ``fit(X, y)`` learns from; None if it cannot be known.

        For samples: keys, input identities and the metadata passed to ``fit``
        (``fit_extra_arguments``, e.g. corrected labels). For arrays: their
        content. For Dask collections: None (the model is always fitted).
        """
        if is_sample_list(X):
            flat, _ = _flatten(X)
            return training_digest(flat, self._read_attributes(fit=True))
        if isinstance(X, list | tuple) and not X:
            return None
        return _array_digest(X, y)

    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> Self:
        """Load the model checkpoint, or fit and save it.

        The model in ``model_path`` is loaded when it was written by a step of
        the same code and parameters fitted on the same training samples.
        ``X=None`` loads a trained model without its data (bob.pipelines'
        way): the model file must match the step's code and parameters, and
        the training samples are then not compared, the one case where they
        are not; without such a file it is a `ValueError` naming the path.

        Returns
        -------
        self : CheckpointWrapper
        """
        self._validate_params()
        if not estimator_requires_fit(self.estimator):
            return self
        if X is None:
            if self.model_path is not None and self.load_model():
                return self
            msg = (
                f"CheckpointWrapper({self._name()}).fit(None) loads a trained "
                f"model without its data, but model_path={self.model_path!r} "
                "holds no model of this step's code and parameters; fit it on "
                "training samples first, or name the model_path that holds one."
            )
            raise ValueError(msg)
        data = None if fit_params else self.training_digest(X, y)
        if not self.force and data is not None and self.load_model(data=data):
            return self
        self.estimator.fit(X, y, **fit_params)
        if self.model_path is not None:
            self.save_model(data=data)
        else:
            self.fitted_digest_ = fitted_digest(self.estimator)
        return self

    # -- features ----------------------------------------------------------
    @available_if(_estimator_has("transform"))
    def transform(self, X: Any) -> Any:
        """Transform samples, loading valid checkpoints and computing the rest.

        Parameters
        ----------
        X : list of Sample or SampleSet

        Returns
        -------
        samples : list
            Samples whose checkpointed attribute loads lazily from its file, in
            the structure of ``X``. A sample the estimator returned None for
            comes back in line with that attribute None.
        """
        if not is_sample_list(X):
            if isinstance(X, list | tuple) and len(X) == 0:
                return []
            return self.estimator.transform(X)
        self._validate_params()
        if not self._checkpoints_features():
            return self.estimator.transform(X)
        flat, sets = _flatten(X)
        outputs = self.transform_samples(flat)
        return _unflatten(outputs, sets)

    def transform_samples(
        self,
        samples: Sequence[Sample],
        report: dict[str, Any] | None = None,
        identities: tuple[str, list[str]] | None = None,
    ) -> list[Sample]:
        """`transform` for a flat list of samples; fills ``report`` if given.

        ``report`` (a dict) receives ``computed``, ``loaded``, ``recomputed``,
        ``failed`` (samples whose output is None), ``step`` (the step identity),
        ``inputs`` (each sample's input identity), ``files`` (each sample's
        path and `Stamp`, None for failed samples) and, in the file layout,
        ``records`` (each file's verified record, None when unknown).

        ``identities`` is ``(step_identity, [input identity of each sample])``
        when the caller has computed them already (the flows compute them once
        per batch for the cache key, after checking every key of the run);
        None computes them here and checks the keys.
        """
        self._validate_params()
        attribute = self._sample_attribute()
        input_attribute = self._sample_wrapper_option("input_attribute")
        with gc_paused():
            if identities is None:
                wanted = self.identities(samples)
            else:
                step, inputs = identities
                wanted = [
                    Identity(step, i, s.key)
                    for s, i in zip(samples, inputs, strict=True)
                ]
            live = [
                i for i, s in enumerate(samples) if not _is_failed(s, input_attribute)
            ]
        loaders = self._layout().transform(
            self._context(),
            wanted,
            live,
            lambda todo: self._compute(samples, todo, attribute),
            report,
        )
        with gc_paused():
            return [
                failed_output(s, attribute)
                if loader is None
                else lazy_output(s, attribute, loader)
                for s, loader in zip(samples, loaders)
            ]

    def _compute(
        self, samples: Sequence[Sample], todo: Sequence[int], attribute: str
    ) -> dict[int, Any]:
        """``{index: value}`` of the checkpointed attribute for samples ``todo``."""
        if not todo:
            return {}
        inputs = [samples[i] for i in todo]
        est = self.estimator
        if (
            type(est) is SampleWrapper
            and attribute == est._option("output_attribute")
            and all(type(s) in (Sample, DelayedSample) for s in inputs)
        ):  # the values alone: no output sample made and dropped
            return dict(zip(todo, est._values("transform", inputs)))
        outputs = est.transform(inputs)
        if len(outputs) != len(inputs):
            msg = (
                f"{self._name()}.transform returned {len(outputs)} samples for "
                f"{len(inputs)} inputs."
            )
            raise RuntimeError(msg)
        values: dict[int, Any] = {}
        for i, out in zip(todo, outputs):
            if out is None:
                values[i] = None
                continue
            if not isinstance(out, Sample | SampleSet):
                msg = (
                    f"CheckpointWrapper expects the wrapped estimator to return "
                    f"samples, got {type(out).__name__}; wrap it in "
                    "SampleWrapper first (wrap(['sample', 'checkpoint'], ...))."
                )
                raise TypeError(msg)
            values[i] = getattr(out, attribute, None)
        return values

    @available_if(_estimator_has("transform"))
    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> Any:
        """Fit (or load the model), then transform with checkpoints."""
        return self.fit(X, y, **fit_params).transform(X)

    @available_if(_estimator_has("predict"))
    def predict(self, X: Any, **kwargs: Any) -> Any:
        """Predict through the wrapped estimator (not checkpointed)."""
        return self.estimator.predict(X, **kwargs)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X: Any, **kwargs: Any) -> Any:
        """Class probabilities through the wrapped estimator (not checkpointed)."""
        return self.estimator.predict_proba(X, **kwargs)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X: Any, **kwargs: Any) -> Any:
        """Log class probabilities through the wrapped estimator."""
        return self.estimator.predict_log_proba(X, **kwargs)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X: Any, **kwargs: Any) -> Any:
        """Decision function through the wrapped estimator (not checkpointed)."""
        return self.estimator.decision_function(X, **kwargs)

    @available_if(_estimator_has("score_samples"))
    def score_samples(self, X: Any, **kwargs: Any) -> Any:
        """Per-sample scores through the wrapped estimator (not checkpointed)."""
        return self.estimator.score_samples(X, **kwargs)

    @available_if(_estimator_has("score"))
    def score(self, X: Any, y: Any = None, **kwargs: Any) -> float:
        """Score through the wrapped estimator."""
        return self.estimator.score(X, y, **kwargs)

    # -- housekeeping ------------------------------------------------------
    def has_model_state(self) -> bool:
        """Whether this step's fitted state is known, so its files can be judged.

        True for a step that needs no fitting, one fitted (or loaded) in
        memory, and one whose ``model_path`` holds a model header of this
        step's code and parameters (read without unpickling). Otherwise
        `iter_checkpoints` calls every file ``unknown``.
        """
        if not estimator_requires_fit(self.estimator):
            return True
        if getattr(self, "fitted_digest_", None) is not None:
            return True
        return self.__sklearn_is_fitted__() or (
            self._model_header_if_matching() is not None
        )

    _has_model_state = has_model_state

    def iter_checkpoints(self) -> Iterator[tuple[str, str, int]]:
        """Yield ``(path, status, size)`` for every file under ``features_dir``.

        ``status`` is ``valid`` (made by this step, for any input: files of
        samples not given here are judged by the step alone), ``stale``,
        ``corrupt``, ``foreign`` (a samplepipe checkpoint of another key, or at
        a path ``hash_fn`` would not give its key), ``unknown`` (not written by
        samplepipe, or a step whose fitted model cannot be read: samplepipe
        cannot judge it), ``temporary`` (left by a crashed writer) or
        ``writing`` (a temporary file of a live writer).

        With ``layout="shards"`` each shard file is one item: ``valid`` while
        it holds a valid entry, else ``stale`` (``corrupt`` if every entry
        fails its checksum or the file is unreadable); see
        `samplepipe.storage.shards`.
        """
        for path, state, size, _ in self._walk():
            yield path, state, size

    def _walk(self) -> Iterator[tuple[str, str, int, Any]]:
        if self.features_dir is None:
            return
        yield from self._layout().walk(self._context())

    def remove_checkpoints(
        self,
        statuses: Sequence[str] = ("stale", "corrupt", "foreign", "temporary"),
        dry_run: bool = False,
    ) -> list[tuple[str, str, int]]:
        """Remove files of the given statuses; return ``[(path, status, size)]``.

        ``valid``, ``unknown`` and ``writing`` files are never removed. Each file
        is judged again right before it is removed, and kept unless it is
        unchanged and judged the same (a running job may have recomputed it).
        """
        never = {"valid", "unknown", "writing"} & set(statuses)
        if never:
            msg = f"remove_checkpoints never removes {sorted(never)} files."
            raise ValueError(msg)
        if self.features_dir is None:
            return []
        return self._layout().remove(self._context(), statuses, dry_run)

    def compact_checkpoints(
        self, shard_size: int | None = None, shard_bytes: int | str | None = None
    ) -> dict[str, Any]:
        """Merge small shards into full ones (``layout="shards"`` only).

        Keeps each key's valid entry of this step (judged as
        `iter_checkpoints` does) and drops stale, superseded and corrupt
        entries of the merged shards. New shards are written before the old
        ones are removed: readers never miss an entry. See
        `samplepipe.storage.shards.compact`.

        Parameters
        ----------
        shard_size : int, default=None
            At most this many entries per new shard (default: this wrapper's
            ``shard_size``).
        shard_bytes : int or str, default=None
            At most this many payload bytes per new shard (default: this
            wrapper's ``shard_bytes``); shard files of less than half of it
            are merged.

        Returns
        -------
        report : dict
            ``shards`` (before), ``written``, ``removed`` (paths), ``kept``,
            ``dropped`` (entries).
        """
        if self.features_dir is None:
            msg = (
                f"CheckpointWrapper.compact_checkpoints needs layout='shards' and a "
                f"features_dir; got layout={self.layout!r}, "
                f"features_dir={self.features_dir!r}."
            )
            raise ValueError(msg)
        self._validate_params()
        return self._layout().compact(self._context(), shard_size, shard_bytes)


_DEFAULTS = {
    "input_attribute": "data",
    "transform_extra_arguments": (),
    "fit_extra_arguments": (),
}

"""CheckpointWrapper: checkpoints of transformed samples and of fitted models."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from sklearn.utils.metaestimators import available_if

from ..errors import CheckpointWarning as CheckpointWarning
from ..storage.checkpoints import CheckpointLoader
from ..storage.formats import Format
from ..storage.hdf5 import load_hdf5, save_hdf5
from ..storage.identity import (
    FORMAT_VERSION,
    Identity,
    combine,
    estimator_identity,
    functions_hashed_once,
    value_digests,
)
from ..storage.keys import check_key, hash_string, sample_keys
from ..storage.layouts import Layout, gc_paused
from ..storage.models import update_estimator
from ..storage.report import TransformReport
from ..storage.shards import DEFAULT_SHARD_BYTES
from ..storage.status import Status
from ._explain import Explaining
from ._inputs import DATA_VERSION_ATTRIBUTE as DATA_VERSION_ATTRIBUTE
from ._inputs import _is_failed, attribute_identity, input_identity
from ._inputs import training_digest as training_digest
from ._model import ModelCheckpoints
from ._options import CheckpointOptions
from ._sample import (
    DelayedSample,
    Sample,
    SampleSet,
    failed_output,
    is_sample_list,
    lazy_output,
)
from ._sample_wrapper import (
    BaseWrapper,
    SampleWrapper,
    _estimator_has,
    _flatten,
    _unflatten,
)

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
# the wrapper
# ---------------------------------------------------------------------------
class CheckpointWrapper(CheckpointOptions, ModelCheckpoints, Explaining, BaseWrapper):
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
    layout : str or Layout, default="files"
        Where and how feature checkpoints are stored: a name registered with
        `samplepipe.storage.register_layout` or a `samplepipe.storage.Layout`
        instance (see `samplepipe.storage.layouts`).
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
        layout: str | Layout = "files",
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

    # -- identity ----------------------------------------------------------
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
            self.checkpointed_attribute(),
            self._format_identity(),
            str(self._fitted_digest()),
        )

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
        attributes = self.read_attributes()
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
        self.check_parameters()
        if not self._checkpoints_features():
            return self.estimator.transform(X)
        flat, sets = _flatten(X)
        outputs = self.transform_samples(flat)
        return _unflatten(outputs, sets)

    def transform_samples(
        self,
        samples: Sequence[Sample],
        report: TransformReport | dict[str, Any] | None = None,
        identities: tuple[str, list[str]] | None = None,
    ) -> list[Sample]:
        """`transform` for a flat list of samples; fills ``report`` if given.

        ``report`` (a `samplepipe.storage.TransformReport`) receives what the
        call did: how many samples were ``computed``, ``loaded``,
        ``recomputed`` and ``failed`` (their output is None), the ``step``
        identity, and per sample its input identity, checkpoint file and
        `Stamp` (None for failed samples), and its record (file layout) or
        shard entry. A dict receives the same as keys
        (`TransformReport.as_dict`), as up to 0.5.0, with a
        ``DeprecationWarning``.

        ``identities`` is ``(step_identity, [input identity of each sample])``
        when the caller has computed them already (the flows compute them once
        per batch for the cache key, after checking every key of the run);
        None computes them here and checks the keys.
        """
        attribute = self.checkpointed_attribute()
        loaders = self._checkpoint(samples, report, identities, outputs=True)
        with gc_paused():
            return [
                failed_output(s, attribute)
                if loader is None
                else lazy_output(s, attribute, loader)
                for s, loader in zip(samples, loaders)
            ]

    def checkpoint_samples(
        self,
        samples: Sequence[Sample],
        report: TransformReport | None = None,
        identities: tuple[str, list[str]] | None = None,
    ) -> TransformReport:
        """Checkpoint a flat list of samples as `transform_samples` does.

        What is valid is kept, the rest computed and written; no output sample
        (and no loader) is built: what the flows call, which need the report
        alone. Returns ``report`` (a new `samplepipe.storage.TransformReport`
        if None) filled with what the call did.
        """
        filled = TransformReport() if report is None else report
        self._checkpoint(samples, filled, identities, outputs=False)
        return filled

    def _checkpoint(
        self,
        samples: Sequence[Sample],
        report: TransformReport | dict[str, Any] | None,
        identities: tuple[str, list[str]] | None,
        outputs: bool,
    ) -> list[Any]:
        """The layout's loaders of ``samples`` (empty unless ``outputs``)."""
        self.check_parameters()
        attribute = self.checkpointed_attribute()
        input_attribute = self._sample_wrapper_option("input_attribute")
        with gc_paused():
            if identities is None:
                wanted = self.identities(samples)
            else:
                step, inputs = identities
                keys = sample_keys(samples)  # every layout gets checked keys
                wanted = [
                    Identity(step, i, k) for k, i in zip(keys, inputs, strict=True)
                ]
            live = [
                i for i, s in enumerate(samples) if not _is_failed(s, input_attribute)
            ]
        filled = report if isinstance(report, TransformReport) else None
        if filled is None and report is not None:
            warnings.warn(
                "transform_samples(report={}) is deprecated since samplepipe 0.6 "
                "and will stop working; pass report=samplepipe.storage."
                "TransformReport() and read its attributes (report.computed, ...).",
                DeprecationWarning,
                stacklevel=3,
            )
            filled = TransformReport()
        context = self._context()
        if not outputs:
            context = replace(context, loaders=False)
        loaders = self._layout().transform(
            context,
            wanted,
            live,
            lambda todo: self._compute(samples, todo, attribute),
            filled,
        )
        if isinstance(report, dict) and filled is not None:
            report.update(filled.as_dict())
        return loaders

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
    def iter_checkpoints(self) -> Iterator[tuple[str, Status, int]]:
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

    def _walk(self) -> Iterator[tuple[str, Status, int, Any]]:
        if self.features_dir is None:
            return
        yield from self._layout().walk(self._context())

    def remove_checkpoints(
        self,
        statuses: Sequence[str] = (
            Status.STALE,
            Status.CORRUPT,
            Status.FOREIGN,
            Status.TEMPORARY,
        ),
        dry_run: bool = False,
    ) -> list[tuple[str, Status, int]]:
        """Remove files of the given statuses; return ``[(path, status, size)]``.

        ``valid``, ``unknown`` and ``writing`` files are never removed. Each file
        is judged again right before it is removed, and kept unless it is
        unchanged and judged the same (a running job may have recomputed it).
        """
        never = {Status.VALID, Status.UNKNOWN, Status.WRITING} & set(statuses)
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
        self.check_parameters()
        return self._layout().compact(self._context(), shard_size, shard_bytes)

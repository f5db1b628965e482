"""What `CheckpointWrapper`'s parameters mean, resolved at use time."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..storage.files import MAX_EXTENSION
from ..storage.formats import Format, resolve_format
from ..storage.fs import LOCAL, FileSystem, check_location, filesystem, location_root
from ..storage.layouts import Layout, LayoutContext, get_layout
from ._base import estimator_options, inner_estimators
from ._base import resolve_option as _resolve_option

_DEFAULTS = {
    "input_attribute": "data",
    "transform_extra_arguments": (),
    "fit_extra_arguments": (),
}


class CheckpointOptions:
    """The parameters of `CheckpointWrapper`, checked and resolved.

    A mixin: `__init__` stores the parameters as given (scikit-learn's
    contract); these methods check them (`check_parameters`) and resolve
    them each time they are used: the format, the layout, the extension,
    where ``features_dir`` is, the `LayoutContext` a layout works on.
    """

    estimator: Any
    features_dir: str | os.PathLike[str] | None
    model_path: str | os.PathLike[str] | None
    extension: str | None
    sample_attribute: str | None
    hash_fn: Any
    attempts: int
    force: bool
    storage_options: dict[str, Any] | None
    layout: Any  # a registered name or a Layout, as given
    shard_size: int | None
    shard_bytes: int | str
    format: str | Format | None

    if TYPE_CHECKING:

        def _name(self) -> str: ...
        def _has_model_state(self) -> bool: ...
        def _describe(self, step: str) -> None: ...
        def step_identity(self) -> str: ...
        def _fitted_digest(self) -> str | None: ...

    def check_parameters(self) -> None:
        """Check the wrapper's parameters; raise naming the one that is wrong.

        Every method that reads or writes checkpoints calls it first, as
        scikit-learn checks an estimator's parameters in ``fit``; call it to
        check a step without running it (the flows do, for each step).

        Raises
        ------
        TypeError
            For a parameter of the wrong type (``features_dir``,
            ``model_path``, ``storage_options``, ``hash_fn``, ``layout``,
            ``format``).
        ValueError
            For a wrong value (``attempts``, ``extension``, a layout or
            format that cannot honour the other parameters).
        """
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

    # scikit-learn's own name for this check (BaseEstimator._validate_params)
    def _validate_params(self) -> None:
        self.check_parameters()

    def checkpointed_attribute(self) -> str:
        """The sample attribute this step checkpoints.

        ``sample_attribute`` when given, else the wrapped estimator's
        ``output_attribute`` (or the one it declares), else ``"data"``.
        """
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

    def read_attributes(self, fit: bool = False) -> list[str]:
        """The sample attributes this step reads: its input and extra arguments."""
        extra = "fit_extra_arguments" if fit else "transform_extra_arguments"
        attributes = [self._sample_wrapper_option("input_attribute")]
        attributes += [a for _, a in self._sample_wrapper_option(extra)]
        return attributes

    def checkpoint_format(self) -> Format:
        """The `samplepipe.storage.Format` of this step's feature checkpoints.

        The ``format`` parameter resolved: a registered name's format, an
        instance as given, or, for None, ``"hdf5"`` (``"custom"`` with
        ``save_func`` and ``load_func``). `samplepipe.storage.format_funcs`
        gives its ``(save, load)`` functions.
        """
        return self._format()

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

    def _format_identity(self) -> str:
        """The format's identity and the extension (part of `step_identity`)."""
        return f"{self._format().identity()}:{self._extension()}"

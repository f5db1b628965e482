"""Model checkpoints: fit, or load the fitted estimator from ``model_path``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..storage.identity import FORMAT_VERSION, estimator_identity, fitted_digest
from ..storage.models import (
    load_model,
    read_model_header,
    save_model,
    update_estimator,
)
from ._base import estimator_requires_fit
from ._inputs import _array_digest, training_digest
from ._sample import is_sample_list
from ._sample_wrapper import _flatten

if TYPE_CHECKING:
    from typing_extensions import Self


class ModelCheckpoints:
    """The model half of `CheckpointWrapper`: its fitted state, saved and loaded.

    A mixin: it reads the wrapper's ``estimator``, ``model_path``,
    ``storage_options`` and ``force``.
    """

    estimator: Any
    model_path: str | os.PathLike[str] | None
    storage_options: dict[str, Any] | None
    force: bool
    fitted_digest_: str | None
    model_header_: dict[str, Any]

    if TYPE_CHECKING:

        def check_parameters(self) -> None: ...
        def read_attributes(self, fit: bool = False) -> list[str]: ...
        def _name(self) -> str: ...
        def __sklearn_is_fitted__(self) -> bool: ...

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
            return training_digest(flat, self.read_attributes(fit=True))
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
        self.check_parameters()
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
        self._fit_or_load(X, y, None, fit_params)
        return self

    def fit_or_load(
        self, X: Any, y: Any = None, *, upstream: str | None = None, **fit_params: Any
    ) -> bool:
        """`fit`'s work, saying which it did: True if fitted, False if loaded.

        The model in ``model_path`` is loaded when it was written by a step of
        the same code and parameters, fitted on the same training samples
        after the same upstream steps; otherwise the wrapped estimator is
        fitted (whether or not it needs fitting) and its model saved. The
        flows' fit task calls it.

        Parameters
        ----------
        X, y, **fit_params
            As for `fit`; with ``fit_params`` the model is always fitted.
        upstream : str, default=None
            A digest of the steps before this one (the flows pass their
            models' digest): recorded in the model file and compared on load,
            so that a model is never reused after other upstream models.

        Returns
        -------
        fitted : bool
        """
        self.check_parameters()
        return self._fit_or_load(X, y, upstream, fit_params)

    def _fit_or_load(
        self, X: Any, y: Any, upstream: str | None, fit_params: dict[str, Any]
    ) -> bool:
        data = None if fit_params else self.training_digest(X, y)
        if (
            not self.force
            and data is not None
            and self.load_model(data=data, upstream=upstream)
        ):
            return False
        self.estimator.fit(X, y, **fit_params)
        if self.model_path is not None:
            self.save_model(data=data, upstream=upstream)
        else:
            self.fitted_digest_ = fitted_digest(self.estimator)
        return True

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
